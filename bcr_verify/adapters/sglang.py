"""Adapters for SGLang's prefix caches, on any release from 0.4.3 to 0.5.23, driven as its
scheduler drives them.

- ``radix``: :class:`RadixCache`, the classic tree, on every release. It has no self-check, so
  :mod:`bcr_verify.walker` walks it after every mutation. Its clock (``time.time`` or
  ``time.monotonic``) is replaced by a counter so that LRU order, and so every replay, is
  reproducible. How each release spells each call is in :mod:`bcr_verify.adapters.sglang_api`.
- ``unified-py`` / ``unified-rust``: :class:`UnifiedRadixCache` (0.5.12+; the Rust tree core
  0.5.19+) with the Python or the Rust tree core, checked by its own ``sanity_check()``.

Each adapter owns the release's real allocator on the CPU without a KV buffer, and records
every index the cache frees through it. A page id is ``index // page_size``. After an insert
the adapter overwrites the value tensor it passed, as a scheduler reuses its page-table row,
so a cache that kept a view of the caller's tensor is caught by the next lookup.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Sequence

from bcr_verify.adapters.base import (
    CacheAdapter, Cleared, Contract, Inserted, Match, Removed, Sizes, Stored,
)
from bcr_verify.adapters.sglang_api import load
from bcr_verify.errors import AdapterUnavailable, InvariantViolation

KINDS = ("radix", "unified-py", "unified-rust")
UNIFIED_FROM = "0.5.12"
"""The first release whose UnifiedRadixCache is driven. It came in 0.5.11 (opt-in, by
``SGLANG_ENABLE_UNIFIED_RADIX_TREE``), whose ``dec_lock_ref`` takes no lock receipt yet. Until
0.5.17 the cache is its own tree, in Python; 0.5.17 moved the tree into a tree core, and 0.5.19
added the Rust one."""
BACKEND_VARIABLE = "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND"


class RecordingAllocator:
    """The release's real allocator, with every index freed into it recorded."""

    def __init__(self, page_size: int, capacity_pages: int):
        self.api = load()
        self.real = self.api.make_allocator(page_size, capacity_pages)
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.freed: list[int] = []
        self._inside = False
        free = self.real.free
        free_segment = getattr(self.real, "free_segment", None)

        def recording_free(indices):
            if not self._inside:
                self._record(indices)
            return free(indices)

        self.real.free = recording_free
        if free_segment is not None:
            # Tree frees go through free_segment (0.5.18+); the paged one then bypasses free().
            def recording_free_segment(indices, *, start_pos):
                self._record(indices)
                self._inside = True
                try:
                    return free_segment(indices, start_pos=start_pos)
                finally:
                    self._inside = False
            self.real.free_segment = recording_free_segment

    def _record(self, indices) -> None:
        self.freed.extend(sorted({int(i) // self.page_size for i in indices.tolist()}))

    def take_freed(self) -> list[int]:
        freed, self.freed = self.freed, []
        return freed

    def indices(self, pages: Sequence[int]):
        torch = self.api.torch
        pages = torch.tensor(list(pages), dtype=torch.int64)
        offsets = torch.arange(self.page_size, dtype=torch.int64)
        return (pages[:, None] * self.page_size + offsets).reshape(-1)

    def pages(self, indices) -> list[int]:
        return [int(i) // self.page_size for i in indices.tolist()[:: self.page_size]]

    def free_indices(self, indices, start_pos: int = 0) -> None:
        """Free as the scheduler does: by segment where the release has it."""
        if hasattr(self.real, "free_segment"):
            self.real.free_segment(indices, start_pos=start_pos)
        else:
            self.real.free(indices)

    def free_page_ids(self) -> set[int]:
        return self.api.free_page_ids(self.real, self.page_size)


class SGLangAdapter(CacheAdapter):
    def __init__(self, kind: str, block_size: int, capacity_pages: int, events: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.name = {"radix": "sglang-radix", "unified-py": "sglang-unified-py",
                     "unified-rust": "sglang-unified-rust"}[kind]
        self.unified = kind != "radix"
        self.events = events
        self.page_size = block_size
        self.allocator = RecordingAllocator(block_size, capacity_pages)
        self.api = self.allocator.api
        if events:
            compile_event_hashing()
        self.cache = self._build()
        self.notes = {"release": self.api.t.release, "generation": self.api.t.generation,
                      "stand_ins": self.api.t.stand_ins,
                      "not_checked": [] if self.unified else self.api.t.not_checked(),
                     "self_check": "sanity_check()" if self.unified
                     else "external walker (bcr_verify.walker)"}
        self.contract = Contract(block_size=block_size, eviction="lru", lru_unit="node",
                                 reports_sizes=True)

    def _build(self):
        api = load()
        if not self.unified:
            return api.make_radix_cache(self.allocator.real, self.page_size, self.events)
        from bcr_verify.adapters.sglang_api import release_tuple
        if release_tuple(api.t.release) < release_tuple(UNIFIED_FROM):
            raise AdapterUnavailable(
                f"UnifiedRadixCache is driven from sglang {UNIFIED_FROM} on; this is "
                f"{api.t.release}")
        try:
            from sglang.srt.mem_cache.unified_cache.components import ComponentType
        except ImportError:  # before 0.5.17
            from sglang.srt.mem_cache.unified_cache_components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

        backend = "python" if self.kind == "unified-py" else "rust"
        params = dict(disable=False, req_to_token_pool=None, page_size=self.page_size,
                      token_to_kv_pool_allocator=self.allocator.real,
                      tree_components=(ComponentType.FULL,),
                      enable_kv_cache_events=self.events)
        if "tree_core_backend" in inspect.signature(api.CacheInitParams).parameters:
            cache = UnifiedRadixCache(api.CacheInitParams(**params, tree_core_backend=backend))
        else:  # 0.5.17-0.5.21 choose the core from the environment
            previous = os.environ.get(BACKEND_VARIABLE)
            os.environ[BACKEND_VARIABLE] = backend
            try:
                cache = UnifiedRadixCache(api.CacheInitParams(**params))
            except ValueError as exc:  # 0.5.18 registers the Python core only
                raise AdapterUnavailable(f"sglang {api.t.release} has no {backend} tree core "
                                         f"for UnifiedRadixCache ({exc})") from None
            finally:
                if previous is None:
                    os.environ.pop(BACKEND_VARIABLE)
                else:
                    os.environ[BACKEND_VARIABLE] = previous
        if not hasattr(cache, "tree_core"):  # before 0.5.17: the backend variable is unread
            if backend == "rust":
                raise AdapterUnavailable(f"sglang {api.t.release}'s UnifiedRadixCache keeps its "
                                         "tree in Python (tree cores came in 0.5.17)")
            return cache
        core = type(cache.tree_core).__name__
        if backend == "rust" and core != "RustUnifiedTreeCore":
            raise AdapterUnavailable(
                f"UnifiedRadixCache fell back to {core}: the Rust tree core does not load here "
                "(it needs Linux and torch 2.11-2.14)")
        return cache

    def match(self, tokens: Sequence[int]) -> Match:
        length, indices, node = self.api.match(self.cache, self.api.key(tokens))
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
        key = self.api.key(list(tokens)[:aligned])
        owned = owned_from * self.page_size
        self.allocator.take_freed()
        if self.unified:
            from sglang.srt.mem_cache.base_prefix_cache import InsertParams
            prefix_len = self.cache.insert(
                InsertParams(key=key, value=value, prev_prefix_len=owned)).prefix_len
        else:
            prefix_len = self.api.insert(self.cache, key, value)
            if prefix_len > owned:
                self.allocator.free_indices(value[owned:prefix_len], start_pos=owned)
        if self.unified or self.api.t.insert_copies:
            value.fill_(-1)  # the scheduler reuses its row: a cache holding a view sees -1s
        return Inserted(prefix_len=prefix_len, freed=self.allocator.take_freed())

    def evict_tokens(self, num_tokens: int) -> list[int]:
        self.allocator.take_freed()
        if self.unified:
            from sglang.srt.mem_cache.base_prefix_cache import EvictParams
            self.cache.evict(EvictParams(num_tokens=num_tokens))
        else:
            self.api.evict(self.cache, num_tokens, self.allocator.real)
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

    def take_events(self) -> list | None:
        if not self.events:
            return None
        return [translate_event(e) for e in self.cache.take_events()]

    def check_invariants(self) -> None:
        if self.unified:
            try:
                self.cache.sanity_check()
            except AssertionError as exc:
                raise InvariantViolation(self.name, "sanity_check", str(exc)) from exc
        else:
            from bcr_verify.walker import walk_radix_cache
            walk_radix_cache(self.name, self.cache, self.allocator.free_page_ids(), self.api)

    def reset(self) -> None:
        self.cache.reset()
        self.allocator.real.clear()
        self.allocator.take_freed()


def build(kind: str, block_size: int, capacity_pages: int, events: bool = False
          ) -> SGLangAdapter:
    return SGLangAdapter(kind, block_size, capacity_pages, events)


STALE_BUILD_LOCK_S = 300
"""A torch extension build lock older than this was left by a killed build."""


def compile_event_hashing() -> None:
    """From 0.5.18 SGLang hashes event blocks with a C++ extension JIT-compiled on first use,
    which takes seconds: build it here, before any call into the cache is timed.

    A build killed midway (a run ended by its op timeout while compiling) leaves torch's build
    lock behind, and torch before 2.14 then waits for it forever: an old lock is removed.
    """
    try:
        from sglang.srt.mem_cache.utils import get_hash_str
    except ImportError:  # before 0.5.6 event hashes are Python's hash()
        return
    from torch.utils import cpp_extension

    try:  # private, but the only way to name the lock torch will wait on
        lock = Path(cpp_extension._get_build_directory("hicache_hash_cpp", False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
            lock.unlink()
    except (AttributeError, TypeError, OSError):
        pass
    get_hash_str([0])


def translate_event(event):
    """One of SGLang's events (``sglang.srt.disaggregation.kv_events``; 0.5.18+ adds
    ``BlockStoredWithMetadata``) in the protocol's vocabulary."""
    kind = type(event).__name__
    if kind.startswith("BlockStored"):
        return Stored(tuple(event.block_hashes), event.parent_block_hash, tuple(event.token_ids))
    if kind.startswith("BlockRemoved"):
        return Removed(tuple(event.block_hashes))
    if kind == "AllBlocksCleared":
        return Cleared()
    raise TypeError(f"unknown SGLang KV event {kind}")
