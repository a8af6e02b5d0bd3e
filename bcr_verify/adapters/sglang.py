"""Adapters for SGLang's prefix caches (``sglang==0.5.23``), driven as its scheduler drives them.

- ``radix``: :class:`RadixCache`, the classic tree. It has no self-check, so
  :mod:`bcr_verify.walker` walks it after every mutation. Its clock is ``time.monotonic()``,
  replaced here by a counter so that LRU order, and so every replay, is reproducible.
- ``unified-py`` / ``unified-rust``: :class:`UnifiedRadixCache` with the Python or the Rust tree
  core, checked by its own ``sanity_check()``. Both already keep LRU on logical counters.

Each adapter owns SGLang's real allocator (``TokenToKVPoolAllocator`` for page size 1,
``PagedTokenToKVPoolAllocator`` otherwise) on the CPU without a KV buffer, and records every
index the cache frees through it. A page id is ``index // page_size``. After an insert the
adapter overwrites the value tensor it passed, as a scheduler reuses its page-table row, so a
cache that kept a view of the caller's tensor is caught by the next lookup.
"""

from __future__ import annotations

import itertools
import logging
import time
import types
import warnings
from array import array
from typing import Sequence

from bcr_verify.adapters.base import CacheAdapter, Contract, Inserted, Match, Sizes
from bcr_verify.errors import AdapterUnavailable, InvariantViolation

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    try:
        import torch
        from sglang.srt.mem_cache import radix_cache as _radix_module
        from sglang.srt.mem_cache.allocator import (
            PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator,
        )
        from sglang.srt.mem_cache.base_prefix_cache import (
            EvictParams, InsertParams, MatchPrefixParams,
        )
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
    finally:
        logging.disable(logging.NOTSET)

_ticks = itertools.count(1)
_radix_module.time = types.SimpleNamespace(
    monotonic=lambda: float(next(_ticks)), perf_counter=time.perf_counter)

KINDS = ("radix", "unified-py", "unified-rust")


class RecordingAllocator:
    """SGLang's real allocator, with every index freed into it recorded."""

    def __init__(self, page_size: int, capacity_pages: int):
        size = page_size * capacity_pages
        if page_size == 1:
            self.real = TokenToKVPoolAllocator(size=size, dtype=torch.bfloat16, device="cpu",
                                               kvcache=None, need_sort=False)
        else:
            self.real = PagedTokenToKVPoolAllocator(size=size, page_size=page_size,
                                                    dtype=torch.bfloat16, device="cpu",
                                                    kvcache=None, need_sort=False)
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.freed: list[int] = []
        self._inside = False
        free, free_segment = self.real.free, self.real.free_segment

        # Tree frees go through free_segment; the paged allocator then bypasses free().
        def recording_free_segment(indices, *, start_pos):
            self._record(indices)
            self._inside = True
            try:
                return free_segment(indices, start_pos=start_pos)
            finally:
                self._inside = False

        def recording_free(indices):
            if not self._inside:
                self._record(indices)
            return free(indices)

        self.real.free_segment = recording_free_segment
        self.real.free = recording_free

    def _record(self, indices) -> None:
        self.freed.extend(sorted({int(i) // self.page_size for i in indices.tolist()}))

    def take_freed(self) -> list[int]:
        freed, self.freed = self.freed, []
        return freed

    def indices(self, pages: Sequence[int]) -> "torch.Tensor":
        pages = torch.tensor(list(pages), dtype=torch.int64)
        offsets = torch.arange(self.page_size, dtype=torch.int64)
        return (pages[:, None] * self.page_size + offsets).reshape(-1)

    def pages(self, indices) -> list[int]:
        return [int(i) // self.page_size for i in indices.tolist()[:: self.page_size]]

    def free_page_ids(self) -> set[int]:
        held_back = self.real.release_pages  # need_sort's deferred frees; None when paged
        return set(self.real.free_pages.tolist()) | set(
            [] if held_back is None else held_back.tolist())


class SGLangAdapter(CacheAdapter):
    def __init__(self, kind: str, block_size: int, capacity_pages: int):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.name = {"radix": "sglang-radix", "unified-py": "sglang-unified-py",
                     "unified-rust": "sglang-unified-rust"}[kind]
        self.unified = kind != "radix"
        self.page_size = block_size
        self.allocator = RecordingAllocator(block_size, capacity_pages)
        self.cache = self._build()
        self.contract = Contract(
            block_size=block_size, values="int64 tensor of KV slot indices, page-aligned",
            eviction="lru", may_over_evict=True, reports_sizes=True,
            self_check="sanity_check()" if self.unified else "external walker (bcr_verify.walker)")

    def _build(self):
        if not self.unified:
            return RadixCache(CacheInitParams(
                disable=False, req_to_token_pool=None, page_size=self.page_size,
                token_to_kv_pool_allocator=self.allocator.real))
        backend = "python" if self.kind == "unified-py" else "rust"
        cache = UnifiedRadixCache(CacheInitParams(
            disable=False, req_to_token_pool=None, page_size=self.page_size,
            token_to_kv_pool_allocator=self.allocator.real,
            tree_components=(ComponentType.FULL,), tree_core_backend=backend))
        core = type(cache.tree_core).__name__
        if backend == "rust" and core != "RustUnifiedTreeCore":
            raise AdapterUnavailable(
                f"UnifiedRadixCache fell back to {core}: the Rust tree core does not load here "
                "(it needs Linux and torch 2.11-2.14)")
        return cache

    @staticmethod
    def _key(tokens: Sequence[int]) -> "RadixKey":
        return RadixKey(token_ids=array("q", tokens), extra_key=None)

    def match(self, tokens: Sequence[int]) -> Match:
        result = self.cache.match_prefix(MatchPrefixParams(key=self._key(tokens)))
        node, length = result.last_device_node, result.device_prefix_len
        indices = self.cache.path_device_indices(node)[:length]
        return Match(length=length, pages=self.allocator.pages(indices), handle=node)

    def lock(self, handle):
        return handle, self.cache.inc_lock_ref(handle)

    def unlock(self, receipt) -> None:
        node, lock = receipt
        if self.unified:
            self.cache.dec_lock_ref(node, lock.to_dec_params())
        else:
            self.cache.dec_lock_ref(node)

    def insert(self, tokens: Sequence[int], pages: Sequence[int], owned_from: int) -> Inserted:
        aligned = len(pages) * self.page_size
        value = self.allocator.indices(pages)
        key = self._key(list(tokens)[:aligned])
        owned = owned_from * self.page_size
        self.allocator.take_freed()
        if self.unified:
            result = self.cache.insert(InsertParams(key=key, value=value, prev_prefix_len=owned))
        else:
            result = self.cache.insert(InsertParams(key=key, value=value))
            self.allocator.real.free_segment(value[owned:result.prefix_len], start_pos=owned)
        value.fill_(-1)  # the scheduler reuses its row: a cache holding a view now sees -1s
        return Inserted(prefix_len=result.prefix_len, freed=self.allocator.take_freed())

    def evict_tokens(self, num_tokens: int) -> list[int]:
        self.allocator.take_freed()
        self.cache.evict(EvictParams(num_tokens=num_tokens))
        return self.allocator.take_freed()

    def alloc(self, num_pages: int) -> list[int] | None:
        if num_pages == 0:
            return []
        indices = self.allocator.real.alloc(num_pages * self.page_size)
        return None if indices is None else self.allocator.pages(indices)

    def free(self, pages: Sequence[int]) -> None:
        if pages:
            self.allocator.real.free(self.allocator.indices(pages))
        self.allocator.take_freed()

    def available_pages(self) -> int:
        return self.allocator.real.available_size() // self.page_size

    @property
    def capacity_pages(self) -> int:
        return self.allocator.capacity_pages

    def sizes(self) -> Sizes:
        return Sizes(evictable=self.cache.evictable_size(), protected=self.cache.protected_size())

    def check_invariants(self) -> None:
        if self.unified:
            try:
                self.cache.sanity_check()
            except AssertionError as exc:
                raise InvariantViolation(self.name, "sanity_check", str(exc)) from exc
        else:
            from bcr_verify.walker import walk_radix_cache
            walk_radix_cache(self.name, self.cache, self.allocator.free_page_ids())

    def reset(self) -> None:
        self.cache.reset()
        self.allocator.real.clear()
        self.allocator.take_freed()


def build(kind: str, block_size: int, capacity_pages: int) -> SGLangAdapter:
    return SGLangAdapter(kind, block_size, capacity_pages)
