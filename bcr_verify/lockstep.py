"""The engine: apply one operation to every implementation and judge each against the model.

Each implementation runs in a *lane* with its own shadow :class:`ReferenceCache`, whose block
values are the very page ids the implementation stores, judged under the implementation's own
:class:`~bcr_verify.adapters.Contract` (when blocks become matchable, the hit cap, duplicate
copies, on-demand or lazy eviction, what counts as free). Results must equal the shadow's;
where an implementation may legally choose (LRU ties, whole-node over-eviction), its choice is
checked by the shadow and then followed, so lanes stay exact without ever skipping a check.
Lanes with equal contracts that made the same choices hold identical shadows, so agreeing with
the shadow is agreeing with each other; lanes whose contracts differ are also compared directly
wherever their contracts agree on an observable (see :meth:`Lockstep.match`).

Operations mirror a serving engine's scheduler: a request *begins* (match, lock the prefix,
allocate pages for the rest, evicting if short), then *finishes* (insert, free duplicate
pages, unlock) or is *aborted*; plus plain lookups, evictions and a cache flush. After every
operation each lane's invariants run. Every operation is recorded, so a failure comes with the
trace that replays it (:mod:`bcr_verify.trace`). The Hypothesis machine, the soak driver and
trace replay are all thin layers over this class.

Every call into an implementation goes through :func:`bcr_verify.guard.guard`, so one that
raises, or runs past ``op_timeout``, is a finding like a divergence; in a supervised process
each step is also journalled before it runs (:mod:`bcr_verify.journal`), so a crash leaves
its trace behind.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from bcr_verify import interrupts, journal
from bcr_verify.adapters.base import CacheAdapter
from bcr_verify.errors import (
    Divergence, FatalFinding, InvariantViolation, UsageError, VerificationFailure,
)
from bcr_verify.guard import BEACON, DEFAULT_OP_TIMEOUT, STEP, WATCHDOG, guard
from bcr_verify.models.free_queue import FreeQueue
from bcr_verify.models.reference import RELAXATIONS, ReferenceCache


CUTS_KEPT = 256
"""Prompts whose cut into blocks is remembered (see :meth:`Lockstep._cut`)."""
PROMPT_NUMBERS = itertools.count()
"""Numbers for distinct prompts, never reused in a process (see :meth:`Lockstep._cut`)."""


class BudgetSpent(BaseException):
    """The step budget is used up: ends a run where it stands (a BaseException, so that
    Hypothesis stops at once rather than treating it as a failure to shrink)."""


class ShrinkCapReached(KeyboardInterrupt):
    """Shrinking ran past its time cap: the smallest failing example found so far stands.

    Hypothesis stops at once on an interrupt and forgets the example it cut short; any other
    BaseException would be recorded as that example's outcome (and, under a database, saved
    as a failure), which the next example it generates contradicts."""


DEFAULT_SHRINK_SECONDS = 120.0
"""How long a failure may be shrunk. Hypothesis's own cap is 300 s, and shrinking a lockstep
failure was measured at up to 305 s on a loaded machine; the seeded mutants shrink in at most
~30 s, and a trace halfway shrunk is still a replayable finding."""


class StepBudget:
    """At most ``limit`` steps while searching; steps run while shrinking are counted apart,
    and shrinking stops ``shrink_seconds`` after the first failure was found.

    Shared by every lockstep of a run (one per Hypothesis example). ``limit=None``: no cap.
    """

    def __init__(self, limit: int | None = None,
                 shrink_seconds: float | None = DEFAULT_SHRINK_SECONDS):
        self.limit = limit
        self.shrink_seconds = shrink_seconds
        self.searched = 0
        self.shrinking = False
        self.shrink_steps = 0
        self.shrink_capped = False
        self.found_at: float | None = None
        """``time.monotonic()`` when the first failure was found and shrinking began."""
        self.on_found = None
        """Called with the first failure, e.g. to say that shrinking has begun."""
        self.on_shrunk = None
        """Called with the length in steps of each failing example found while shrinking."""

    def found(self, failure, steps: int = 0) -> None:
        """A failing example of ``steps`` steps: the first one starts the shrink clock."""
        if not self.shrinking:
            self.shrinking = True
            self.found_at = time.monotonic()
            if self.on_found:
                self.on_found(failure)
        elif self.on_shrunk:
            self.on_shrunk(steps)

    def take(self) -> None:
        if self.shrinking:
            self.shrink_steps += 1
            if (self.shrink_seconds is not None
                    and time.monotonic() - self.found_at > self.shrink_seconds):
                self.shrink_capped = True
                raise ShrinkCapReached()
            return
        if self.limit is not None and self.searched >= self.limit:
            raise BudgetSpent()
        self.searched += 1


@dataclass
class Held:
    """What one request holds in one lane while it runs."""

    matched: list[int]
    receipt: Any
    new: list[int]


@dataclass
class LaneStats:
    ops: Counter = field(default_factory=Counter)
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    lookup_tokens: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    duplicates_freed: int = 0
    duplicates_kept: int = 0
    refused: int = 0
    """Requests this lane refused, each while the model agreed it had no room."""
    lru_deviations: Counter = field(default_factory=Counter)
    """Relaxation of strict LRU -> evictions that needed it (see ``RELAXATIONS``)."""
    witnesses: dict = field(default_factory=dict)
    """Relaxation -> the steps up to its first occurrence: a trace that shows it."""

    def as_dict(self) -> dict:
        return {
            "ops": dict(self.ops), "lookups": self.lookups, "hits": self.hits,
            "hit_tokens": self.hit_tokens, "lookup_tokens": self.lookup_tokens,
            "hit_rate": round(self.hit_tokens / self.lookup_tokens, 4) if self.lookup_tokens else 0.0,
            "evictions": self.evictions, "evicted_tokens": self.evicted_tokens,
            "duplicates_freed": self.duplicates_freed, "duplicates_kept": self.duplicates_kept,
            "refused": self.refused,
            "lru_deviations": dict(self.lru_deviations), "lru_witnesses": dict(self.witnesses),
        }


class Lane:
    def __init__(self, adapter: CacheAdapter):
        self.name = adapter.name
        self.contract = adapter.contract
        self.block_size = self.contract.block_size
        self.lazy = self.contract.eviction == "lazy"
        self.stats = LaneStats()
        self.start(adapter)

    def start(self, adapter: CacheAdapter) -> None:
        """Run on ``adapter``, a cache as fresh as its model and its pool."""
        self.adapter = adapter
        self.shadow = ReferenceCache(self.block_size)
        self.queue = FreeQueue(adapter.capacity_pages) if self.lazy else None
        self.held: set[int] = set()

    def diverge(self, check: str, detail: str) -> Divergence:
        return Divergence(self.name, check, detail)


class Observer:
    """Hooks into every lane's request path; :mod:`bcr_verify.kv_replay` and
    :mod:`bcr_verify.events` are two.

    ``on_begin`` sees each lane's locked, matched pages and the fresh pages for the rest of
    the prompt, as an engine's forward pass would; any hook may raise a :class:`Divergence`.
    """

    def attach(self, lanes: list) -> None:
        """Called once the lanes exist, before any step."""

    def after_step(self, op: str, args: dict) -> None:
        """Called after every step has run in every lane, before the invariants."""

    def on_begin(self, lane: str, tokens: list[int], matched: list[int], new: list[int]) -> None:
        """Called once per lane when a request has its prefix locked and its pages allocated."""

    def on_match(self, lane: str, tokens: list[int], matched: list[int]) -> None:
        """Called once per lane for a plain lookup, with the pages it matched."""

    def on_reset(self, lane: str) -> None:
        """Called when a lane's cache and allocator are emptied."""

    def renew(self, lanes: list) -> None:
        """Called when every lane starts again on a fresh cache (:meth:`Lockstep.renew`);
        by default, as a flush of each."""
        for lane in lanes:
            self.on_reset(lane.name)

    def report(self) -> dict:
        return {}


STEP_ARGS = {"begin": {"tokens": "tokens"}, "finish": {"rid": "int"}, "abort": {"rid": "int"},
             "match": {"tokens": "tokens"}, "evict": {"num_tokens": "int"},
             "evict_value": {"pick": "int"}, "reset": {}}
"""Each recorded operation and its arguments, as a trace stores them."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


class Lockstep:
    """Drive ``adapters`` in lockstep. ``check_every`` = 1 runs invariants after every step.

    ``op_timeout``: seconds one implementation call may take (None: no limit). ``origin``:
    how to rebuild these lanes (implementations, block size, capacity), for the journal.
    ``budget``: a :class:`StepBudget` shared across locksteps. ``strict_lru``: an eviction
    that is legal only under a relaxation of strict LRU is a divergence; otherwise each one
    is counted per relaxation, with the steps that first showed it.
    """

    def __init__(self, adapters: Sequence[CacheAdapter], check_every: int = 1,
                 observers: Sequence[Observer] = (), op_timeout: float | None = DEFAULT_OP_TIMEOUT,
                 origin: dict | None = None, budget: StepBudget | None = None,
                 strict_lru: bool = False):
        if not adapters:
            raise UsageError("adapters: need at least one implementation to verify")
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise UsageError(f"adapters: names must be unique, got {names}")
        sizes = {a.contract.block_size for a in adapters}
        if len(sizes) != 1:
            raise UsageError(f"adapters: all must share one block size, got {sorted(sizes)}")
        self.block_size = sizes.pop()
        for index, adapter in enumerate(adapters):
            guard(adapter, index)
        BEACON.lanes = names
        WATCHDOG.arm(op_timeout)
        self.origin = origin
        self.budget = budget
        self.strict_lru = strict_lru
        self.journal = journal.JOURNAL if origin is not None else None
        if self.journal:
            self.journal.fresh(origin)
        self.lanes = [Lane(a) for a in adapters]
        self.check_every = check_every
        self.observers = list(observers)
        self.requests: dict[int, tuple[list[int], list, dict[str, Held]]] = {}
        """Running requests: rid -> (prompt, its blocks as the models cut it, what each lane
        holds)."""
        self.next_rid = 0
        self._cuts: dict[tuple[int, ...], tuple[list, int]] = {}
        self.steps: list[dict] = []
        self.forgotten = 0
        """Steps dropped from the record by :meth:`forget_steps` (still counted as executed)."""
        for observer in self.observers:
            observer.attach(self.lanes)
        self.checks = 0
        self.rejected = 0
        self.cross_checks = 0
        self.comparable = True
        """No eviction, abort or uneven admission since the last flush: lanes whose contracts
        differ still hold the same content (see :meth:`_compare`)."""

    # ----------------------------------------------------------------- operations

    def begin(self, tokens: Sequence[int]) -> int | None:
        """A request arrives: returns its id, or None if some lane could not make room."""
        tokens = list(tokens)
        blocks, prompt = self._cut(tokens)
        return self._step("begin", {"tokens": tokens}, lambda: self._begin(tokens, blocks),
                          prompt)

    def finish(self, rid: int) -> None:
        """The request completes: its prompt is inserted and its prefix unlocked."""
        self._step("finish", {"rid": rid}, lambda: self._end(rid, finished=True))

    def abort(self, rid: int) -> None:
        """The request is dropped: its fresh pages are freed and its prefix unlocked."""
        self._step("abort", {"rid": rid}, lambda: self._end(rid, finished=False))

    def match(self, tokens: Sequence[int]) -> None:
        """A lookup with no lock (a router's probe, or a scheduler ranking its queue).

        Besides each lane's own model, lanes are compared with each other here while their
        contracts agree on what a lookup returns: nothing evicted or aborted since the last
        flush, no request running, and the matched length cut to the largest hit cap.
        """
        tokens = list(tokens)
        blocks, prompt = self._cut(tokens)
        def run():
            lengths = {}
            for lane in self.lanes:
                got = self._match(lane, tokens, blocks)
                lengths[lane.name] = got.length
                for observer in self.observers:
                    observer.on_match(lane.name, tokens, list(got.pages))
            self._compare(tokens, lengths)
        self._step("match", {"tokens": tokens}, run, prompt)

    def evict(self, num_tokens: int) -> None:
        """Free at least ``num_tokens`` tokens: LRU caches choose, explicit caches are told."""
        self._step("evict", {"num_tokens": num_tokens},
                   lambda: [self._evict_lru(l, num_tokens) for l in self.lanes])

    def evict_value(self, pick: int) -> None:
        """Explicit caches evict one block (with its subtree), lazy caches one unreferenced
        copy; ``pick`` indexes each lane's candidates."""
        self._step("evict_value", {"pick": pick},
                   lambda: [self._evict_value(l, pick) for l in self.lanes])

    def reset(self) -> None:
        """Flush: abort every running request, then empty every cache and allocator."""
        def run():
            for rid in list(self.requests):
                self._end(rid, finished=False)
            for lane in self.lanes:
                lane.adapter.reset()
                lane.shadow.reset()
                lane.stats.ops["reset"] += 1
                for observer in self.observers:
                    observer.on_reset(lane.name)
            self.comparable = True
        self._step("reset", {}, run)

    def renew(self, adapters: Sequence[CacheAdapter]) -> None:
        """Every lane starts again on a fresh cache, ``adapters`` built as the lanes' own were,
        in the same order; the counts (each lane's, the calls' times, the observers') go on.

        A soak does this after a known failure (``--known``) rather than a flush: the failure
        may have stopped a step part-way, a request ended in some lanes and still held in the
        rest, an observer's events of the step unjudged, and a flush would carry that into
        what follows as a false alarm. Fresh caches are also what a trace replays on."""
        names = [a.name for a in adapters]
        if names != [lane.name for lane in self.lanes]:
            raise UsageError(f"adapters: renew needs {[l.name for l in self.lanes]}, got {names}")
        for index, (lane, adapter) in enumerate(zip(self.lanes, adapters)):
            guard(adapter, index, lane.adapter.call_times)
            lane.start(adapter)
        self.requests.clear()
        self.comparable = True
        for observer in self.observers:
            observer.renew(self.lanes)
        self.forget_steps()

    @property
    def executed(self) -> int:
        """Every step run so far, whether or not it is still in the record."""
        return self.forgotten + len(self.steps)

    def forget_steps(self) -> None:
        """Drop the step record, e.g. after a flush, when lanes are empty and a trace of what
        follows replays from here; long drivers call it so memory stays flat. Request ids
        start again from 0 with the record, as a replay of it hands them out."""
        self.forgotten += len(self.steps)
        self.steps.clear()
        if not self.requests:
            self.next_rid = 0
        if self.journal:
            self.journal.fresh(self.origin)

    def apply(self, step: dict) -> Any:
        """Replay one recorded step (see :mod:`bcr_verify.trace`)."""
        op, args = step["op"], step.get("args", {})
        if op not in STEP_ARGS:
            raise UsageError(f"step: unknown op {op!r}; known: {', '.join(STEP_ARGS)}")
        if set(args) != set(STEP_ARGS[op]) or not all(
                _is_int_list(args[k]) if kind == "tokens" else _is_int(args[k])
                for k, kind in STEP_ARGS[op].items()):
            want = ", ".join(f"{k}: {'list of ints' if v == 'tokens' else 'int'}"
                             for k, v in STEP_ARGS[op].items())
            raise UsageError(f"step: {op} takes {{{want}}}, got {args!r:.120}")
        return getattr(self, op)(**args)

    # ----------------------------------------------------------------- reporting

    def report(self) -> dict:
        return {
            "steps": len(self.steps),
            "operations": dict(Counter(s["op"] for s in self.steps)),
            "rejected_requests": self.rejected,
            "cross_lane_checks": self.cross_checks,
            "implementations": {
                lane.name: {"contract": vars(lane.adapter.contract),
                            "notes": getattr(lane.adapter, "notes", {}), **lane.stats.as_dict()}
                for lane in self.lanes
            },
            **{k: v for o in self.observers for k, v in o.report().items()},
        }

    # ----------------------------------------------------------------- internals

    def _step(self, op: str, args: dict, run, prompt: int | None = None) -> Any:
        """Record, journal and run one step; ``prompt``: its prompt's number from
        :meth:`_cut`, if it has one."""
        interrupts.check()
        if self.budget is not None:
            self.budget.take()
        index = len(self.steps)
        self.steps.append({"op": op, "args": args})
        BEACON.slots[STEP] = index
        if self.journal:
            self.journal.step(op, args, prompt)
        try:
            result = run()
            for observer in self.observers:
                observer.after_step(op, args)
            if self.check_every and index % self.check_every == 0:
                self.check()
        except (VerificationFailure, FatalFinding) as failure:
            raise failure.at_step(index)
        return result

    def check(self) -> None:
        """Every lane's invariants: its own check, sizes against the model, pool conservation."""
        self.checks += 1
        for lane in self.lanes:
            adapter, shadow = lane.adapter, lane.shadow
            adapter.check_invariants()
            try:
                shadow.assert_invariants()
            except AssertionError as exc:  # the model is the oracle: this is our own bug
                raise InvariantViolation("reference model", "assert_invariants", str(exc)) from exc
            sizes = adapter.sizes() if lane.contract.reports_sizes else None
            if lane.contract.reports_sizes and sizes is None:
                raise lane.diverge("sizes", "the contract says it reports evictable/protected "
                                   "sizes, but it reported none")
            if sizes is not None:
                want = (shadow.evictable_tokens, shadow.protected_tokens)
                if (sizes.evictable, sizes.protected) != want:
                    raise lane.diverge(
                        "sizes", f"evictable/protected = {sizes.evictable}/{sizes.protected}, "
                        f"model says {want[0]}/{want[1]}")
            free = adapter.available_pages()
            if lane.contract.free_counts_evictable:
                cached, what = shadow.protected_tokens // self.block_size, "cached in use"
            else:
                cached, what = len(shadow), "cached"
            total = free + cached + len(lane.held)
            if total != adapter.capacity_pages:
                raise InvariantViolation(
                    lane.name, "pool conservation",
                    f"free {free} + {what} {cached} + held by requests {len(lane.held)} = "
                    f"{total} pages, capacity is {adapter.capacity_pages}")
            if lane.lazy and free != len(lane.queue):
                raise lane.diverge("free count", f"the cache counts {free} free pages, the "
                                   f"model's free queue holds {len(lane.queue)}")

    def _cut(self, tokens: list[int]) -> tuple[list, int]:
        """``tokens`` validated and cut into blocks by the models'
        :meth:`ReferenceCache.split`, and a number for this prompt that no other prompt is
        given in this process (the journal's name for it: a tuple of a long prompt's ints
        costs microseconds each time it is hashed).

        Kept for the last :data:`CUTS_KEPT` prompts: workloads repeat prompts, and validating
        a long one costs more than a model's lookup of it. A kept cut is found by equality,
        which does not see a token's type (``[True] == [1]``), so it is reused only for plain
        ints; anything else is cut, and so judged, afresh."""
        key = tuple(tokens)
        cut = self._cuts.get(key)
        if cut is not None and ReferenceCache.plain_ints(tokens):
            return cut
        blocks = self.lanes[0].shadow.split(tokens)
        if cut is None:
            if len(self._cuts) >= CUTS_KEPT:
                self._cuts.clear()
            cut = self._cuts[key] = (blocks, next(PROMPT_NUMBERS))
        return cut

    def _match(self, lane: Lane, tokens: list[int], blocks: list):
        """One lane's lookup of ``tokens`` (cut into ``blocks`` by :meth:`ReferenceCache.split`)
        against its model."""
        cap = lane.contract.hit_cap
        want_len, want_pages = lane.shadow.match_blocks(
            blocks[:max(0, len(tokens) - cap) // self.block_size] if cap else blocks)
        got = lane.adapter.match(tokens)
        if (got.length, list(got.pages)) != (want_len, want_pages):
            at = next((i for i, (g, w) in enumerate(zip(got.pages, want_pages)) if g != w),
                      min(len(got.pages), len(want_pages)))
            raise lane.diverge(
                "match", f"matched {got.length} tokens with pages {short(got.pages, at)}, "
                f"model: {want_len} tokens with pages {short(want_pages, at)}; first difference "
                f"at block {at}" + (f" (hit cap: the last {cap} token(s) of a {len(tokens)}-"
                                    "token prompt never match)" if cap else ""))
        if lane.lazy and lane.contract.recency == "use":
            lane.queue.refresh(want_pages)
        lane.stats.lookups += 1
        lane.stats.lookup_tokens += len(tokens)
        lane.stats.hits += want_len > 0
        lane.stats.hit_tokens += want_len
        return got

    def _begin(self, tokens: list[int], blocks: list) -> int | None:
        held: dict[str, Held] = {}
        for lane in self.lanes:
            admitted = self._admit(lane, tokens, blocks)
            if admitted is not None:
                held[lane.name] = admitted
        if len(held) != len(self.lanes):
            self.comparable = False
        if not held:
            self.rejected += 1
            return None
        rid = self.next_rid
        self.next_rid += 1
        self.requests[rid] = (tokens, blocks, held)
        return rid

    def _admit(self, lane: Lane, tokens: list[int], blocks: list) -> Held | None:
        """One lane admits a request, or refuses it; either is judged against its model."""
        contract, shadow, bs = lane.contract, lane.shadow, self.block_size
        got = self._match(lane, tokens, blocks)
        matched = list(got.pages)
        full = len(tokens) // bs
        need = (-(-len(tokens) // bs) if contract.tail_page else full) - len(matched)
        room = lane.adapter.capacity_pages - len(lane.held)  # less what is pinned, below
        if lane.lazy:
            room -= shadow.protected_tokens // bs + sum(
                1 for p in matched if not shadow.refcount(p))
            admitted = lane.adapter.admit(got.handle, need)
            if admitted is None:
                return self._refused(lane, need, room)
            receipt, new = admitted[0], list(admitted[1])
            self._take_from_queue(lane, matched, new, need)
        else:
            shadow.acquire(matched)
            room -= shadow.protected_tokens // bs  # the matched prefix is pinned now too
            receipt = lane.adapter.lock(got.handle)
            new = self._alloc(lane, need)
            if new is None:
                lane.adapter.unlock(receipt)
                shadow.release(matched)
                return self._refused(lane, need, room)
        if need > room:
            raise lane.diverge("admission", f"admitted a request needing {need} pages while "
                               f"the model counts {room} free or evictable")
        if contract.matchable == "alloc":
            kept = contract.duplicates == "kept"
            existing = shadow.insert_blocks(blocks, (matched + new)[:full],
                                            keep_duplicates=kept) // bs
            lane.stats.duplicates_kept += max(0, existing - len(matched)) if kept else 0
            cached = [p for p in new if p in shadow]
            shadow.acquire(cached)
            lane.held.update(p for p in new if p not in shadow)
        else:
            lane.held.update(new)
        lane.stats.ops["begin"] += 1
        for observer in self.observers:
            observer.on_begin(lane.name, tokens, matched, new[:max(0, full - len(matched))])
        return Held(matched=matched, receipt=receipt, new=new)

    def _refused(self, lane: Lane, need: int, room: int) -> None:
        if need <= room:
            raise lane.diverge("admission", f"refused a request needing {need} pages while "
                               f"the model counts {room} free or evictable")
        lane.stats.refused += 1
        return None

    def _take_from_queue(self, lane: Lane, matched: list[int], new: list[int],
                         need: int) -> None:
        """A lazy cache's allocation: the pages must be the model's free-queue head, and the
        blocks cached on them are evicted."""
        shadow, queue = lane.shadow, lane.queue
        hits_in_queue = [p for p in matched if not shadow.refcount(p)]
        shadow.acquire(matched)
        queue.remove(hits_in_queue)
        want = queue.take(need)
        if sorted(new) != sorted(want):
            raise lane.diverge(
                "allocation", f"allocated pages {short(sorted(new))}, the model's free queue "
                f"hands out {short(sorted(want))} (pages without a cached block first, then "
                "cached ones in the order they were released)")
        evicted = [p for p in want if p in shadow]
        for page in evicted:
            shadow.evict_copy(page)
        self._evicted(lane, len(evicted))

    def _alloc(self, lane: Lane, n: int) -> list[int] | None:
        missing = n - lane.adapter.available_pages()
        if missing > 0:
            self._evict_lru(lane, missing * self.block_size)
        pages = lane.adapter.alloc(n)
        if pages is None:
            return None
        pages = list(pages)
        fresh = set(pages)
        if len(fresh) != len(pages) or not (lane.shadow.holds_none(fresh)
                                            and lane.held.isdisjoint(fresh)):
            bad = [p for p in pages if p in lane.shadow or p in lane.held]
            raise InvariantViolation(
                lane.name, "allocator", f"handed out pages {short(bad or pages)} that are "
                "cached, held by a running request, or repeated")
        return pages

    def _release(self, lane: Lane, held: Held) -> None:
        lane.adapter.free(held.new)
        lane.held.difference_update(held.new)
        lane.adapter.unlock(held.receipt)
        lane.shadow.release(held.matched)

    def _end(self, rid: int, finished: bool) -> None:
        if rid not in self.requests:
            raise UsageError(f"rid: no running request {rid} (a trace whose begin was refused "
                             "or never ran here: replayed at another block size or capacity?)")
        tokens, blocks, held = self.requests.pop(rid)
        if not finished:
            self.comparable = False
        for lane in self.lanes:
            h = held.get(lane.name)
            if h is None:  # this lane refused the request
                continue
            lane.stats.ops["finish" if finished else "abort"] += 1
            if lane.lazy:
                self._release_lazy(lane, h)
                continue
            if not finished:
                self._release(lane, h)
                continue
            pages = h.matched + h.new
            got = lane.adapter.insert(tokens, pages, len(h.matched))
            want_prefix = lane.shadow.insert_blocks(blocks, pages)
            want_freed = pages[len(h.matched): want_prefix // self.block_size]
            if got.prefix_len != want_prefix:
                raise lane.diverge(
                    "insert", f"reported {got.prefix_len} tokens already cached, model: {want_prefix}")
            if sorted(got.freed) != sorted(want_freed):
                raise lane.diverge(
                    "insert duplicates", f"freed {short(got.freed)} as duplicates, model: "
                    f"{short(want_freed)}")
            lane.stats.duplicates_freed += len(want_freed)
            lane.held.difference_update(h.new)
            lane.adapter.unlock(h.receipt)
            lane.shadow.release(h.matched)

    def _release_lazy(self, lane: Lane, held: Held) -> None:
        """A lazy cache ends a request: every page it held is released into the free queue,
        tail first where its LRU unit is the chain tail (cached ones stay cached and
        evictable)."""
        lane.adapter.unlock(held.receipt)
        uncached, cached = [], []
        table = held.matched + held.new
        for page in reversed(table) if lane.contract.lru_unit == "chain-tail" else table:
            if page in lane.held:
                lane.held.discard(page)
                uncached.append(page)
            else:
                lane.shadow.release([page])
                if not lane.shadow.refcount(page):
                    cached.append(page)
        lane.queue.release(uncached, cached)

    def _compare(self, tokens: list[int], lengths: dict[str, int]) -> None:
        """Lanes agree on a lookup's matched length where their contracts say they must."""
        if len(lengths) < 2 or not self.comparable or self.requests:
            return
        cap = max(lane.contract.hit_cap for lane in self.lanes)
        limit = max(0, len(tokens) - cap) // self.block_size * self.block_size
        seen = {name: min(length, limit) for name, length in lengths.items()}
        self.cross_checks += 1
        if len(set(seen.values())) > 1:
            (a, la), (b, lb) = sorted(seen.items(), key=lambda kv: kv[1])[::len(seen) - 1]
            raise Divergence(f"{a} vs {b}", "cross-lane", (
                f"with nothing evicted or aborted since the last flush, {a} matched {la} tokens "
                f"and {b} {lb} (cut to {limit}, the largest hit cap), though each agrees "
                "with its own contract's model: a difference no declared option explains"))

    def _evict_lru(self, lane: Lane, num_tokens: int) -> None:
        if lane.lazy:  # evicts only inside an allocation
            return
        lane.stats.ops["evict"] += 1
        if lane.adapter.contract.eviction == "lru":
            freed = list(lane.adapter.evict_tokens(num_tokens))
            try:
                relaxed = lane.shadow.apply_lru_eviction(freed, num_tokens)
            except ValueError as exc:
                raise lane.diverge("eviction", str(exc)) from None
            for name in relaxed:
                if self.strict_lru or lane.contract.lru_unit == "block":
                    raise lane.diverge("strict LRU", f"{name}: {RELAXATIONS[name]}" + (
                        "" if self.strict_lru else " (the contract's LRU unit is a block)"))
                lane.stats.lru_deviations[name] += 1
                if name not in lane.stats.witnesses:
                    lane.stats.witnesses[name] = list(self.steps)
        else:
            freed = []
            for value in lane.shadow.lru_victims(num_tokens):
                freed += self._evict_explicit(lane, value)
        self._evicted(lane, len(freed))

    def _evict_value(self, lane: Lane, pick: int) -> None:
        if lane.lazy:
            self._uncache_one(lane, pick)
            return
        if lane.adapter.contract.eviction != "explicit":
            return
        candidates = lane.shadow.evictable_values()
        if not candidates:
            return
        lane.stats.ops["evict_value"] += 1
        freed = self._evict_explicit(lane, candidates[pick % len(candidates)])
        self._evicted(lane, len(freed))

    def _evicted(self, lane: Lane, pages: int) -> None:
        """Count an eviction of ``pages`` pages (none: nothing happened); lanes whose contracts
        differ no longer hold the same content."""
        if pages:
            self.comparable = False
            lane.stats.evictions += 1
            lane.stats.evicted_tokens += pages * self.block_size

    def _uncache_one(self, lane: Lane, pick: int) -> None:
        """A lazy cache told to evict one unreferenced copy (vLLM's ``evict_blocks``)."""
        candidates = lane.shadow.unreferenced_values()
        if not candidates:
            return
        value = candidates[pick % len(candidates)]
        lane.stats.ops["evict_value"] += 1
        got = lane.adapter.evict_value(value)
        if list(got) != [value]:
            raise lane.diverge("evict", f"evicting the copy in page {value} evicted "
                               f"{short(list(got))}, model: [{value}]")
        lane.shadow.evict_copy(value)
        self._evicted(lane, 1)

    def _evict_explicit(self, lane: Lane, value: int) -> list[int]:
        want = lane.shadow.subtree_values(value)
        got = lane.adapter.evict_value(value)
        if got is None:
            lane.adapter.free(want)
        elif sorted(got) != sorted(want):
            raise lane.diverge(
                "evict", f"evicting page {value} freed {short(got)}, model: {short(want)}")
        lane.shadow.evict(value)
        return want

    def _lane(self, name: str) -> Lane:
        return next(l for l in self.lanes if l.name == name)


def short(values: Sequence[int], around: int = 0, limit: int = 12) -> str:
    """``values`` in one short line, always showing the part near index ``around``."""
    values = list(values)
    if len(values) <= limit:
        return str(values)
    start = max(0, min(around - limit // 2, len(values) - limit))
    head = "..., " if start else ""
    tail = ", ..." if start + limit < len(values) else ""
    shown = ", ".join(map(str, values[start:start + limit]))
    return f"[{head}{shown}{tail}] ({len(values)} in all, from index {start})"
