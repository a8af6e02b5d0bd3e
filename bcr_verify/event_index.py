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

from dataclasses import dataclass, field

from bcr_verify.adapters.base import Cleared, Removed, Stored


@dataclass
class Node:
    parent: object
    tokens: tuple[int, ...]
    count: int = 1
    children: set = field(default_factory=set)


def blocks_of(tokens, block_size: int) -> list[tuple[int, ...]]:
    """``tokens``' full blocks as an index files them: tuples of tokens."""
    bs = block_size
    return [tuple(tokens[i:i + bs]) for i in range(0, len(tokens) // bs * bs, bs)]


class ReferenceIndex:
    def __init__(self, block_size: int, counting: bool):
        self.block_size = block_size
        self.counting = counting
        self.nodes: dict[object, Node] = {}
        self.by_key: dict[tuple, object] = {}
        """(parent hash, block tokens) -> hash: how a prompt's blocks are found."""

    def apply(self, event) -> None:
        if isinstance(event, Cleared):
            self.nodes.clear()
            self.by_key.clear()
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
        """:meth:`held_blocks` of a prompt already cut into blocks (tuples of tokens)."""
        parent, held = None, 0
        for block in blocks:
            h = self.by_key.get((parent, block))
            if h is None or h not in self.nodes:
                break
            parent, held = h, held + 1
        return held

    def _store(self, event: Stored) -> None:
        bs, parent = self.block_size, event.parent
        if not self.counting and parent is not None and parent not in self.nodes:
            return  # a router rejects a store under a block it does not know
        for i, h in enumerate(event.hashes):
            tokens = tuple(event.tokens[i * bs:(i + 1) * bs])
            if h == parent and not self.counting:
                return
            node = self.nodes.get(h)
            if node is None:
                self.nodes[h] = Node(parent, tokens)
                self.by_key[(parent, tokens)] = h
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
            if self.by_key.get((gone.parent, gone.tokens)) == x:
                del self.by_key[(gone.parent, gone.tokens)]
            if gone.parent in self.nodes:
                self.nodes[gone.parent].children.discard(x)
