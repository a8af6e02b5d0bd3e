"""Router indexes rebuilt from one worker's KV-cache events alone, as a KV-aware router does.

A router (NVIDIA Dynamo's indexer, SGLang's router, llm-d) never sees a cache, only its event
stream, and from it answers "how many leading blocks of this prompt does the worker hold?".
:class:`ReferenceIndex` answers that in plain Python, in one of two ways:

* ``counting=True``: a *refcounting* consumer. It counts every announced copy of a block,
  drops the block when the count reaches zero, and keeps the block's descendants, which are
  reachable again once the block is announced again. This is what a worker whose cache keeps
  several physical copies of a block (vLLM) needs, and it must always agree with the cache.
* ``counting=False``: a *plain* consumer, the way routers replay events. A store is
  idempotent, a store under an unknown parent is rejected, and a removal drops the block and
  everything below it. This is how Dynamo's ``RadixTree`` behaves, and
  :class:`~bcr_verify.dynamo_index.DynamoIndex` is compared with it.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from bcr_verify.adapters.base import Cleared, Removed, Stored


@dataclass
class Node:
    parent: object
    key: bytes | tuple
    count: int = 1
    children: set = field(default_factory=set)


def block_key(tokens) -> bytes | tuple:
    """One block's tokens as an index files them: as 8-byte unsigned ints, which keep their
    hash once made (a lookup hashes a key at every level, and a tuple of 16 ints costs
    ~130 ns each time), or as the tuple itself where they do not fit. Which form a block
    takes depends only on its tokens, so equal blocks get equal keys."""
    try:
        return array("Q", tokens).tobytes()
    except (OverflowError, TypeError):
        return tuple(tokens)


def blocks_of(tokens, block_size: int) -> list:
    """``tokens``' full blocks as an index files them (:func:`block_key`)."""
    bs = block_size
    return [block_key(tokens[i:i + bs]) for i in range(0, len(tokens) // bs * bs, bs)]


class Answers:
    """What an index answered since its last event, per probe: an index is a function of the
    events it was fed, so a prompt asked again before another event has the same answer, and
    is not walked (or, for Dynamo, sent through its worker thread) again. An oracle asks each
    recent prompt at several steps in a row; a probe is known by its own cut list, which its
    caller keeps unchanged while asking with it."""

    KEPT = 64

    def __init__(self):
        self._known: dict[int, tuple[object, int]] = {}

    def get(self, probe) -> int | None:
        known = self._known.get(id(probe))
        return known[1] if known is not None and known[0] is probe else None

    def put(self, probe, answer: int) -> int:
        if len(self._known) >= self.KEPT:
            self._known.clear()
        self._known[id(probe)] = (probe, answer)
        return answer

    def forget(self) -> None:
        """An event arrived: every answer may have changed."""
        self._known.clear()


class ReferenceIndex:
    def __init__(self, block_size: int, counting: bool):
        self.block_size = block_size
        self.counting = counting
        self.answers = Answers()
        self.nodes: dict[object, Node] = {}
        self.kids: dict[object, dict] = {}
        """parent hash -> {block key -> hash}: how a prompt's blocks are found, one level at
        a time (a walk of a 600-block prompt, asked several times a step, is the index's
        whole cost)."""

    def apply(self, event) -> None:
        self.answers.forget()
        if isinstance(event, Cleared):
            self.nodes.clear()
            self.kids.clear()
        elif isinstance(event, Stored):
            self._store(event)
        elif isinstance(event, Removed):
            for h in event.hashes:  # a block already dropped with its parent is skipped
                if h in self.nodes:
                    self._remove(h)

    def held_blocks(self, tokens) -> int:
        """Leading full blocks of ``tokens`` this index says the worker holds."""
        return self.held_of(blocks_of(tokens, self.block_size))

    def held_of(self, blocks) -> int:
        """:meth:`held_blocks` of a prompt already cut by :func:`blocks_of`."""
        known = self.answers.get(blocks)
        if known is not None:
            return known
        parent, held, kids, nodes, none = None, 0, self.kids, self.nodes, {}
        for block in blocks:
            h = kids.get(parent, none).get(block)
            if h is None or h not in nodes:
                break
            parent, held = h, held + 1
        return self.answers.put(blocks, held)

    def _store(self, event: Stored) -> None:
        bs, parent = self.block_size, event.parent
        if not self.counting and parent is not None and parent not in self.nodes:
            return  # a router rejects a store under a block it does not know
        for i, h in enumerate(event.hashes):
            key = block_key(event.tokens[i * bs:(i + 1) * bs])
            if h == parent and not self.counting:
                return
            node = self.nodes.get(h)
            if node is None:
                self.nodes[h] = Node(parent, key)
                self.kids.setdefault(parent, {})[key] = h
                if parent in self.nodes:
                    self.nodes[parent].children.add(h)
            elif self.counting:
                node.count += 1
            parent = h

    def _remove(self, h) -> None:
        node = self.nodes[h]
        if self.counting:
            node.count -= 1
            if node.count:
                return
            doomed = [h]
        else:
            doomed, stack = [], [h]
            while stack:
                x = stack.pop()
                if x in self.nodes:
                    doomed.append(x)
                    stack.extend(self.nodes[x].children)
        for x in doomed:
            gone = self.nodes.pop(x)
            siblings = self.kids.get(gone.parent, {})
            if siblings.get(gone.key) == x:
                del siblings[gone.key]
                if not siblings:
                    del self.kids[gone.parent]
            if gone.parent in self.nodes:
                self.nodes[gone.parent].children.discard(x)
