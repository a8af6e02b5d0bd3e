"""The events oracle: every KV-cache event a lane publishes, checked against what the step
did to that lane's model, and replayed into router indexes that must agree with the cache.

In distributed serving a cache also answers routers, through its event stream (``BlockStored``
with the parent hash and the tokens, ``BlockRemoved``, ``AllBlocksCleared``), and a wrong event
is silent: the router keeps sending a prefix to a worker that dropped it, or never learns that
it holds one. After every step, for every lane built with its stream on, :class:`EventsOracle`
drains the events (:meth:`~bcr_verify.adapters.CacheAdapter.take_events`) and the model's own
change log (:attr:`~bcr_verify.models.ReferenceCache.changes`), in order, and holds each event
to the rules in :data:`RULES`. Then three consumers fed the stream are asked, for the step's
prompt and a few recent ones, how many leading blocks this worker holds: a refcounting
:class:`~bcr_verify.event_index.ReferenceIndex` must say what the cache would match, and
Dynamo's ``RadixTree`` must say what the plain (router) reference index says.

A failure is a :class:`~bcr_verify.errors.Divergence` whose check is ``events: <rule>``, so it
is shrunk, saved and replayed like any other, and ``--known "events: <rule>"`` counts a known
one instead (vLLM's per-copy removals, an open upstream issue, are one).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import NamedTuple

from bcr_verify.adapters.base import Cleared, Removed, Stored
from bcr_verify.errors import Divergence
from bcr_verify.event_index import ReferenceIndex, blocks_of
from bcr_verify.lockstep import Observer

RULES = {
    "missing store": "a block became cached and no BlockStored announced it",
    "duplicate store": "a BlockStored announced a block that was cached already and gained no "
                       "new copy",
    "store of an uncached block": "a BlockStored announced a block the cache does not hold",
    "lost parent link": "a block's parent hash is missing, or is not the hash announced for "
                        "its parent block (a root block must name none)",
    "self-parent": "a block names its own hash as its parent",
    "position-insensitive hash": "the same tokens under another prefix got the same hash",
    "hash collision": "one hash was announced for two different blocks in one run",
    "missing removal": "a block's last copy left the cache and no BlockRemoved said so",
    "removal while another copy is cached": (
        "a BlockRemoved for a block the cache still serves from another copy: a plain "
        "consumer (a router's index) drops it; only a consumer counting stores and removals "
        "stays consistent"),
    "removal of a cached block": "a BlockRemoved for a block none of whose copies left",
    "removal of an unknown block": "a BlockRemoved for a hash never announced, or announced "
                                   "removed already",
    "flush not announced": "the cache was flushed and no AllBlocksCleared said so",
    "clear without a flush": "an AllBlocksCleared while the cache was not flushed",
    "malformed store": "a BlockStored whose tokens are not one full block per hash",
    "index": "a refcounting index fed the stream disagrees with the cache about the prefix "
             "this worker holds",
    "dynamo": "Dynamo's RadixTree fed the stream disagrees with the reference router index",
}
"""Each rule of the events oracle, by the name its failures carry."""

HASHES_KEPT = 16_384
"""Announced hashes remembered per lane, to catch a hash reused for another block (a
collision, or a hash blind to position) long after the first left the cache. A bound, because
a soak announces millions of blocks: kept for the whole run, they grew a soak's memory by 27 MB
of fitted drift within five minutes, and its growth verdict rightly called that a leak."""
PROBES = 4
"""Recent prompts (besides the step's own) each index is asked about after every step."""


class Probe(NamedTuple):
    """A recent prompt every consumer is asked about."""

    tokens: list[int]
    keys: list
    """The prompt cut as the models file it (:meth:`ReferenceCache.split`)."""
    blocks: list
    """The prompt cut as the event indexes file it (:func:`~bcr_verify.event_index.blocks_of`)."""
    dynamo_hashes: list[int] | None


class LaneEvents:
    """The oracle's view of one lane: which hash it announced for each model block."""

    def __init__(self, lane, worker: int, dynamo: bool, stats: Counter | None = None):
        self.lane = lane
        self.bs = lane.block_size
        self.hash_of: dict = {}        # model Block -> announced hash
        self.block_of: dict = {}       # announced hash -> model Block
        self.copies: Counter = Counter()  # model Block -> copies, replayed from the change log
        self.key_of_hash: OrderedDict = OrderedDict()
        """hash -> (parent hash, tokens) of the last ``HASHES_KEPT`` blocks announced."""
        self.counting = ReferenceIndex(self.bs, counting=True)
        self.router = ReferenceIndex(self.bs, counting=False)
        self.stats = Counter() if stats is None else stats
        self.dynamo = None
        if dynamo:
            from bcr_verify.dynamo_index import DynamoIndex
            self.dynamo = DynamoIndex(self.bs, worker, self.stats)

    def fail(self, rule: str, detail: str) -> Divergence:
        return Divergence(self.lane.name, f"events: {rule}", detail)


class EventsOracle(Observer):
    """Checks every lane that publishes events; ``dynamo``: also feed Dynamo's RadixTree."""

    def __init__(self, dynamo: bool = True):
        self.dynamo = dynamo
        self.lanes: list[LaneEvents] = []
        self.silent: list[str] = []
        self.recent: deque = deque(maxlen=PROBES)

    def attach(self, lanes) -> None:
        self._follow(lanes, {})

    def renew(self, lanes) -> None:
        """Fresh caches: their streams are judged afresh, and each lane's counts go on."""
        stats = {s.lane.name: s.stats for s in self.lanes}
        self.lanes, self.silent = [], []
        self._follow(lanes, stats)

    def _follow(self, lanes, stats: dict) -> None:
        for worker, lane in enumerate(lanes):
            first = lane.adapter.take_events()
            if first is None:
                self.silent.append(lane.name)
                continue
            if any(not isinstance(e, Cleared) for e in first):
                raise Divergence(lane.name, "events: clear without a flush",
                                 f"a fresh cache published {first[:3]}")
            lane.shadow.changes = []
            self.lanes.append(LaneEvents(lane, worker, self.dynamo, stats.get(lane.name)))

    def after_step(self, op: str, args: dict) -> None:
        tokens = args.get("tokens")
        probe = self._probe(tokens) if tokens is not None and self.lanes else None
        probes = list(self.recent) + ([probe] if probe is not None else [])
        for state in self.lanes:
            changes, state.lane.shadow.changes = state.lane.shadow.changes, []
            self._judge(state, changes, state.lane.adapter.take_events())
            self._ask(state, probes)
        if probe is not None:
            self.recent.append(probe)

    def _probe(self, tokens: list[int]) -> Probe:
        """``tokens`` cut into blocks and hashed Dynamo's way once, for every lane and for the
        steps it stays among the recent probes (each cut cost more than the lookups)."""
        lane = self.lanes[0].lane
        hashes = None
        if self.dynamo:
            from bcr_verify.dynamo_index import block_hashes
            hashes = block_hashes(tokens, lane.block_size)
        return Probe(tokens, lane.shadow.split(tokens), blocks_of(tokens, lane.block_size),
                     hashes)

    def report(self) -> dict:
        return {"events": {
            "lanes": {s.lane.name: dict(s.stats) for s in self.lanes},
            "no_event_stream": list(self.silent),
            "dynamo": bool(self.dynamo),
        }}

    # ----------------------------------------------------------------- judging one step

    def _judge(self, s: LaneEvents, changes: list, events: list) -> None:
        adds, removes, flushed = [], [], False
        for change in changes:  # what the model says happened, with counts at the time
            if change[0] == "clear":
                adds, removes, flushed = [], [], True
                s.copies.clear()
                continue
            sign, block, _ = change
            before = s.copies[block]
            s.copies[block] = before + (1 if sign == "+" else -1)
            (adds if sign == "+" else removes).append([block, before, s.copies[block]])
        by_tokens: dict[tuple, list] = {}  # a block's tokens are decoded from its key each time
        for add in adds:
            by_tokens.setdefault(add[0].tokens, []).append(add)
        for event in events:
            s.stats[type(event).__name__.lower()] += 1
            if isinstance(event, Cleared):
                if not flushed:
                    raise s.fail("clear without a flush", "AllBlocksCleared, but the cache "
                                 "was not flushed in this step")
                flushed = None  # announced
                s.hash_of.clear()
                s.block_of.clear()
            elif isinstance(event, Stored):
                self._stored(s, event, adds, by_tokens)
            else:
                self._removed(s, event, removes)
            s.counting.apply(event)
            s.router.apply(event)
            if s.dynamo is not None:
                s.dynamo.apply(event)
        if flushed:
            raise s.fail("flush not announced", "the cache was flushed and published no "
                         "AllBlocksCleared")
        for block, before, _ in adds:
            if before == 0:
                raise s.fail("missing store", f"block {_show(block)} became cached and no "
                             "BlockStored announced it")
        for block, _, after in removes:
            if after == 0 and block in s.hash_of:
                raise s.fail("missing removal", f"block {_show(block)} (hash "
                             f"{s.hash_of[block]}) left the cache and no BlockRemoved said so")

    def _stored(self, s: LaneEvents, event: Stored, adds: list, by_tokens: dict) -> None:
        """Match each announced block to a block the model cached in this step (``adds``,
        also filed ``by_tokens``); each match is taken from both."""
        bs, parent = s.bs, event.parent
        if len(event.tokens) != bs * len(event.hashes):
            raise s.fail("malformed store", f"{len(event.hashes)} hashes for "
                         f"{len(event.tokens)} tokens at block size {bs}: {event}")
        for i, h in enumerate(event.hashes):
            tokens = tuple(event.tokens[i * bs:(i + 1) * bs])
            if h == parent:
                raise s.fail("self-parent", f"block {list(tokens)[:8]} hash {h} names itself "
                             "as its parent")
            seen = s.key_of_hash.get(h)
            if seen is not None and seen != (parent, tokens):
                rule = "position-insensitive hash" if seen[1] == tokens else "hash collision"
                raise s.fail(rule, f"hash {h} announced for tokens {list(tokens)[:8]} under "
                             f"parent {parent}, and before for tokens {list(seen[1])[:8]} "
                             f"under parent {seen[0]}")
            same_tokens = by_tokens.get(tokens, [])
            entry = next((a for a in same_tokens if self._parent_hash(s, a[0]) == parent), None)
            if entry is None:
                if same_tokens:
                    want = self._parent_hash(s, same_tokens[0][0])
                    raise s.fail("lost parent link", f"BlockStored {h} for tokens "
                                 f"{list(tokens)[:8]} names parent {parent}; its parent "
                                 f"block was announced as {want}")
                block = s.block_of.get(h)
                if block is not None and s.copies[block] > 0:
                    raise s.fail("duplicate store", f"BlockStored {h} for block "
                                 f"{_show(block)}, cached already, with no new copy")
                raise s.fail("store of an uncached block", f"BlockStored {h} for tokens "
                             f"{list(tokens)[:8]} under parent {parent}: no such block was "
                             "cached in this step")
            adds.remove(entry)
            same_tokens.remove(entry)
            block = entry[0]
            s.hash_of[block], s.block_of[h], s.key_of_hash[h] = h, block, (parent, tokens)
            s.key_of_hash.move_to_end(h)  # announced again: among the last ones again
            if len(s.key_of_hash) > HASHES_KEPT:
                s.key_of_hash.popitem(last=False)
            s.stats["blocks_stored"] += 1
            s.stats["extra_copies_stored"] += entry[1] > 0
            parent = h

    def _removed(self, s: LaneEvents, event: Removed, removes: list) -> None:
        for h in event.hashes:
            block = s.block_of.get(h)
            if block is None:
                raise s.fail("removal of an unknown block", f"BlockRemoved {h}: no cached "
                             "block was announced with that hash")
            entry = next((r for r in removes if r[0] is block), None)
            if entry is None:
                raise s.fail("removal of a cached block", f"BlockRemoved {h} for block "
                             f"{_show(block)}, none of whose copies left in this step")
            removes.remove(entry)
            if entry[2] > 0:
                raise s.fail("removal while another copy is cached", (
                    f"BlockRemoved {h} for block {_show(block)}, which the cache still "
                    f"serves from {entry[2]} other cop{'y' if entry[2] == 1 else 'ies'}: a "
                    "plain consumer (a router's index) now drops it; a refcounting consumer "
                    "stays consistent"))
            del s.hash_of[block], s.block_of[h]
            s.stats["blocks_removed"] += 1

    @staticmethod
    def _parent_hash(s: LaneEvents, block):
        return None if block.parent is None else s.hash_of.get(block.parent)

    # ----------------------------------------------------------------- asking consumers

    def _ask(self, s: LaneEvents, probes: list[Probe]) -> None:
        shadow = s.lane.shadow
        for tokens, keys, blocks, hashes in probes:
            want = shadow.cached_in(keys)
            got = s.counting.held_of(blocks)
            s.stats["index_checks"] += 1
            if got != want:
                raise s.fail("index", f"fed this lane's events, a refcounting index says it "
                             f"holds {got} leading blocks of a {len(tokens)}-token prompt; "
                             f"the cache holds {want}")
            if s.dynamo is not None:
                routed, dynamo = s.router.held_of(blocks), s.dynamo.held_of(hashes)
                s.stats["dynamo_checks"] += 1
                if routed != dynamo:
                    raise Divergence(f"dynamo vs {s.lane.name}", "events: dynamo", (
                        f"fed {s.lane.name}'s events, Dynamo's RadixTree says worker "
                        f"{s.dynamo.worker} holds {dynamo} leading blocks of a "
                        f"{len(tokens)}-token prompt; the reference router index says "
                        f"{routed}"))


def _show(block) -> str:
    depth, b = 0, block
    while b.parent is not None:
        depth, b = depth + 1, b.parent
    return f"{list(block.tokens)[:8]} at depth {depth}"
