"""A prefix cache built on NVIDIA Dynamo's KV-router index (``dynamo._core.RadixTree``).

Dynamo's ``RadixTree`` is an *index*: it stores no KV, only which blocks a worker holds,
learnt from "stored" / "removed" / "cleared" events, and answers
``find_matches(compute_block_hash_for_seq(tokens, block_size))`` with per-worker matched block
counts. This module turns it into a cache with BCR-memory-2's API, as a serving engine pairs
its block pool with the router's index:

* a side table maps each block's *chain hash* (hash of the parent's chain hash and the block's
  local token hash) to the block's value (a KV page id), with parent/children links;
* ``insert`` stores new blocks in the side table and emits one "stored" event to the index;
* ``match_prefix`` asks the index (``find_matches``) how many blocks match, then reads the
  values of that many chain hashes from the side table;
* ``evict`` removes a block and its subtree from the side table and emits "removed";
* ``assert_invariants`` compares the index (``dump_tree_as_events``) with the side table.

It has no eviction policy of its own (neither does Dynamo's index): bcr_verify chooses victims
and evicts them by value. Mutations are single-writer: a mutation started while another is
running on the same cache (e.g. from an event listener) is refused with ``RuntimeError``.

``DYNAMO_EXAMPLE_BUG=skip-leaf-remove`` plants a bug for the demonstration: evicting a leaf
forgets to tell the index ("batched" removals never flushed), so the index keeps serving a
block whose KV is gone.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
import struct
from typing import Callable, Hashable, Iterable, Sequence

from dynamo._core import RadixTree, compute_block_hash_for_seq

WORKER = 0
__all__ = ["DynamoPrefixCache", "make_cache", "chain_hashes"]


def chain_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chain hashes (u64) of the full blocks: each covers the block and every block before it."""
    n = len(token_ids) // block_size * block_size
    local = compute_block_hash_for_seq(list(token_ids[:n]), block_size) if n else []
    out, parent = [], 0
    for h in local:
        parent = int.from_bytes(hashlib.blake2b(struct.pack("<QQ", parent, h),
                                                digest_size=8).digest(), "little")
        out.append(parent)
    return out


class DynamoPrefixCache:
    def __init__(self, block_size: int = 16, bug: str | None = None):
        self.block_size = block_size
        self.bug = bug if bug is not None else os.environ.get("DYNAMO_EXAMPLE_BUG", "")
        self.index = RadixTree()
        self._event_id = 0
        self._value: dict[int, Hashable] = {}        # chain hash -> block value
        self._chain: dict[Hashable, int] = {}        # block value -> chain hash
        self._parent: dict[int, int | None] = {}
        self._children: dict[int | None, set[int]] = {None: set()}
        self._refs: dict[int, int] = {}
        self._busy = False
        self.event_listener: Callable[[dict], None] | None = None

    # ------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _mutation(self):
        if self._busy:
            raise RuntimeError("reentrant mutation refused: this cache is single-writer")
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def _emit(self, data) -> None:
        self._event_id += 1
        event = {"event_id": self._event_id, "data": data}
        self.index.apply_event(WORKER, json.dumps(event).encode())
        if self.event_listener is not None:
            self.event_listener(event)

    def _matched(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        n = len(token_ids) // self.block_size * self.block_size
        if n == 0:
            return [], 0
        local = compute_block_hash_for_seq(list(token_ids[:n]), self.block_size)
        scores = self.index.find_matches(local).scores
        matched = max((v for (worker, _), v in scores.items() if worker == WORKER), default=0)
        return chain_hashes(token_ids, self.block_size), matched

    def _subtree(self, h: int) -> list[int]:
        out, stack = [], [h]
        while stack:
            x = stack.pop()
            out.append(x)
            stack.extend(self._children.get(x, ()))
        return out

    # ------------------------------------------------------------ BCR-memory-2 API
    def __len__(self) -> int:
        return len(self._value)

    def values(self) -> list[Hashable]:
        return list(self._chain)

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[int, list[Hashable]]:
        chains, matched = self._matched(token_ids)
        return matched * self.block_size, [self._value.get(h) for h in chains[:matched]]

    def insert(self, token_ids: Sequence[int], block_values: Sequence[Hashable]) -> int:
        with self._mutation():
            chains, matched = self._matched(token_ids)
            values = list(block_values)
            if len(values) != len(chains):
                raise ValueError(f"{len(values)} values for {len(chains)} full blocks")
            new = values[matched:]
            if len(set(new)) != len(new) or any(v in self._chain for v in new):
                raise ValueError("block_values repeat a value or reuse a cached one")
            if new:
                local = compute_block_hash_for_seq(
                    list(token_ids[:len(chains) * self.block_size]), self.block_size)
                parent = chains[matched - 1] if matched else None
                self._emit({"stored": {"parent_hash": parent, "blocks": [
                    {"block_hash": chains[i], "tokens_hash": local[i]}
                    for i in range(matched, len(chains))]}})
                for i in range(matched, len(chains)):
                    h = chains[i]
                    self._value[h], self._chain[values[i]] = values[i], h
                    self._parent[h] = parent
                    self._children.setdefault(parent, set()).add(h)
                    self._refs[h] = 0
                    parent = h
            return matched * self.block_size

    def evict(self, block_value: Hashable) -> list[Hashable]:
        with self._mutation():
            if block_value not in self._chain:
                raise ValueError(f"block_value {block_value!r} is not cached")
            doomed = self._subtree(self._chain[block_value])
            if any(self._refs[h] for h in doomed):
                raise ValueError(f"block_value {block_value!r}: its subtree is acquired")
            leaf = len(doomed) == 1
            if not (leaf and self.bug == "skip-leaf-remove"):
                self._emit({"removed": {"block_hashes": doomed[::-1]}})  # children first
            removed = []
            for h in doomed:
                self._children.get(self._parent.pop(h), set()).discard(h)
                self._children.pop(h, None)
                self._refs.pop(h)
                value = self._value.pop(h)
                del self._chain[value]
                removed.append(value)
            return removed

    def acquire(self, values: Iterable[Hashable]) -> None:
        hs = [self._chain[v] for v in list(values)]
        for h in hs:
            self._refs[h] += 1

    def release(self, values: Iterable[Hashable]) -> None:
        hs = [self._chain[v] for v in list(values)]
        for h in hs:
            if self._refs[h] <= 0:
                raise ValueError("released more often than acquired")
            self._refs[h] -= 1

    def reset(self) -> None:
        with self._mutation():
            self._emit("cleared")
            self.__init__(self.block_size, self.bug)

    def assert_invariants(self) -> None:
        in_index: dict[int, int | None] = {}
        for line in self.index.dump_tree_as_events():
            stored = json.loads(line)["event"]["data"]["stored"]
            parent = stored["parent_hash"]
            for block in stored["blocks"]:
                in_index[block["block_hash"]] = parent
                parent = block["block_hash"]
        assert in_index == self._parent, (
            f"index and side table disagree: index only {sorted(set(in_index) - set(self._parent))[:3]}, "
            f"side table only {sorted(set(self._parent) - set(in_index))[:3]}")
        assert set(self._value) == set(self._refs) and len(self._chain) == len(self._value)
        assert all(r >= 0 for r in self._refs.values())


def make_cache(block_size: int) -> DynamoPrefixCache:
    """The factory bcr_verify calls (``dynamo_prefix_cache:make_cache``)."""
    return DynamoPrefixCache(block_size)
