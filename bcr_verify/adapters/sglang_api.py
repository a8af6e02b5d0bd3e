"""SGLang's prefix-cache API across its releases, 0.4.3 to 0.5.23: one translation table.

The classic ``RadixCache`` changed shape at 0.4.3.post3, 0.4.4, 0.4.8, 0.5.2, 0.5.3, 0.5.7,
0.5.8, 0.5.9, 0.5.18 and 0.5.22 (``docs/releases.md`` has the table, read from each release's
own source). Each difference is one row of :data:`TRANSLATIONS`, detected from the installed
release's own classes and signatures rather than guessed from its version number, so a
post-release that moved a name is still driven right; :func:`generation` names the API
generation the version belongs to, for reports.

Nothing here copies a value the cache is given or returns: a cache that aliases the caller's
tensor must stay visible to the checks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import itertools
import logging
import re
import time
import types
import warnings
from array import array
from dataclasses import dataclass, field
from typing import Any, Sequence

from bcr_verify.errors import AdapterUnavailable

GENERATIONS = (
    ("A", "0.4.3", "RadixCache(req_to_token_pool, token_to_kv_pool); evict(n, callback); "
                   "match returns a tuple; the KV pool is the allocator"),
    ("B", "0.4.3.post3", "token_to_kv_pool_allocator: TokenToKVPoolAllocator split from the pool"),
    ("C", "0.4.4", "page_size; evict(n) frees through the allocator; paged allocator"),
    ("D", "0.4.8", "MatchResult; KV-cache events; mem_cache.allocator; monotonic clock"),
    ("E", "0.5.2", "allocators take need_sort, keep release_pages"),
    ("F", "0.5.3", "RadixKey keys; eviction policies"),
    ("G", "0.5.6", "RadixCache(CacheInitParams); SHA-256 event hashes"),
    ("H", "0.5.8", "match_prefix(MatchPrefixParams)"),
    ("I", "0.5.9", "insert(InsertParams) -> InsertResult; evict(EvictParams); evictable_leaves"),
    ("J", "0.5.18", "RadixKey over array('q') with child_key(); free_segment; UnifiedRadixCache "
                   "over tree cores"),
    ("K", "0.5.22", "MatchResult.device_prefix_len + path_device_indices(); lock receipts"),
)
"""(name, first release, what changed): the API generations of the classic RadixCache. The
first release of each is the first one read that has all of it; releases between two read ones
(0.4.5-0.4.7, 0.4.10-0.5.1, 0.5.10-0.5.17 but 0.5.12 and 0.5.13, 0.5.20-0.5.21) are named by
the earlier. A release may already have part of the next generation (0.5.12 ``child_key()``,
0.5.13 keys over ``array('q')``, both named I): the translations follow what is installed."""


def release_tuple(version: str) -> tuple[int, ...]:
    """``0.4.3.post3`` -> (0, 4, 3, 3); ``0.5.23`` -> (0, 5, 23, 0): post-releases sort after."""
    numbers = [int(n) for n in re.findall(r"\d+", version)]
    return tuple(numbers + [0] * (4 - len(numbers)))


def generation(version: str) -> str:
    """The generation a release belongs to, e.g. ``"F (0.5.3+)"``."""
    found = None
    for name, first, _ in GENERATIONS:
        if release_tuple(version) >= release_tuple(first):
            found = f"{name} ({first}+)"
    return found or f"older than {GENERATIONS[0][1]} (not supported)"


@dataclass
class Translations:
    """How this release spells each operation; every field is read off the installed code."""

    release: str
    generation: str
    cache_ctor: str        # "params" | "signature"
    key: str               # "list" | "radixkey-list" | "radixkey-array"
    match_call: str        # "key" | "params"
    insert_call: str       # "key-value" | "params"
    evict_call: str        # "callback" | "num_tokens" | "params"
    child_key: str         # "first-token" | "get_child_key_fn" | "key.child_key"
    frees_through: str     # "free" | "free_segment"
    evictable_leaves: bool
    pages: bool
    insert_copies: bool
    """The cache copies the value it is given (0.5.8+). Before, the scheduler hands insert a
    copy of its row (``cache_finished_req`` clones), so the row is not the cache's to see."""
    stand_ins: list = field(default_factory=list)
    """Modules replaced by inert CPU stand-ins so the cache module could import."""

    def not_checked(self) -> list[str]:
        """Walker invariants this generation cannot express (reported, never skipped silently)."""
        missing = []
        if not self.evictable_leaves:
            missing.append("evictable leaves (no evictable_leaves set before 0.5.9)")
        if not self.pages:
            missing.append("page alignment (no page_size before 0.4.4)")
        return missing


class Sglang:
    """The installed release's modules and classes, loaded once per process."""

    def __init__(self):
        try:
            version = importlib.metadata.version("sglang")
        except importlib.metadata.PackageNotFoundError:
            raise AdapterUnavailable(
                "sglang is not installed; install it (`pip install sglang==0.5.23`; this "
                "repository's CPU recipe is ci/setup.sh, older releases: `bcr-verify matrix`)"
            ) from None
        from bcr_verify.adapters import standins

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            try:
                self.torch = importlib.import_module("torch")
                self.radix, used = standins.import_with_standins(
                    "sglang.srt.mem_cache.radix_cache")
                self.allocators = [_optional(m) for m in (
                    "sglang.srt.mem_cache.allocator", "sglang.srt.mem_cache.paged_allocator",
                    "sglang.srt.mem_cache.memory_pool")]
                self.base = _optional("sglang.srt.mem_cache.base_prefix_cache")
                self.init_params = _optional("sglang.srt.mem_cache.cache_init_params")
            except ImportError as exc:
                raise AdapterUnavailable(
                    f"sglang {version} is installed but its prefix cache does not import "
                    f"here: {type(exc).__name__}: {exc}") from None
            finally:
                logging.disable(logging.NOTSET)
        self.RadixCache = self.radix.RadixCache
        self.RadixKey = getattr(self.radix, "RadixKey", None)
        self.MatchPrefixParams = getattr(self.base, "MatchPrefixParams", None)
        self.InsertParams = getattr(self.base, "InsertParams", None)
        self.EvictParams = getattr(self.base, "EvictParams", None)
        self.CacheInitParams = getattr(self.init_params, "CacheInitParams", None)
        ctor = inspect.signature(self.RadixCache.__init__).parameters
        evict = inspect.signature(self.RadixCache.evict).parameters
        key = ("radixkey-array" if self.RadixKey and hasattr(self.RadixKey, "child_key")
               else "radixkey-list" if self.RadixKey else "list")
        self.t = Translations(
            release=version, generation=generation(version),
            cache_ctor="params" if "params" in ctor and self.CacheInitParams else "signature",
            key=key,
            match_call="params" if self.MatchPrefixParams else "key",
            insert_call="params" if self.InsertParams else "key-value",
            evict_call=("params" if self.EvictParams and "params" in evict
                        else "callback" if "evict_callback" in evict else "num_tokens"),
            child_key=("key.child_key" if key == "radixkey-array"
                       else "get_child_key_fn" if "page_size" in ctor or "params" in ctor
                       else "first-token"),
            frees_through="free_segment" if self._token_allocator_class() and hasattr(
                self._token_allocator_class(), "free_segment") else "free",
            evictable_leaves=False, pages="page_size" in ctor or "params" in ctor,
            insert_copies=_source_has(self.RadixCache, "_insert_helper", ".clone()"),
            stand_ins=used)
        # A clock that ticks once per read: LRU order, and so every replay, is reproducible.
        ticks = itertools.count(1)
        tick = lambda: float(next(ticks))  # noqa: E731
        self.radix.time = types.SimpleNamespace(monotonic=tick, time=tick,
                                                perf_counter=time.perf_counter)

    # ------------------------------------------------------------------ allocators

    def _token_allocator_class(self):
        for module in self.allocators:
            for name in ("TokenToKVPoolAllocator", "BaseTokenToKVPool"):
                cls = getattr(module, name, None)
                if cls is not None and hasattr(cls, "alloc"):
                    return cls
        return None

    def _paged_allocator_class(self):
        for module in self.allocators:
            cls = getattr(module, "PagedTokenToKVPoolAllocator", None)
            if cls is not None:
                return cls
        return None

    def make_allocator(self, page_size: int, capacity_pages: int):
        """The release's real allocator on the CPU, without a KV buffer."""
        cls = self._token_allocator_class() if page_size == 1 else self._paged_allocator_class()
        if cls is None:
            raise AdapterUnavailable(
                f"sglang {self.t.release} has no {'paged ' if page_size > 1 else ''}token "
                "allocator" + (" (it pages from 0.4.4 on); use --block-size 1"
                               if page_size > 1 else ""))
        if page_size > 1 and not callable(getattr(cls, "alloc", None)):
            raise AdapterUnavailable(
                f"sglang {self.t.release}'s PagedTokenToKVPoolAllocator has no alloc(): it "
                "allocates only through Triton kernels on a GPU; use --block-size 1 here")
        offered = {"size": page_size * capacity_pages, "page_size": page_size,
                   "dtype": self.torch.bfloat16, "device": "cpu", "kvcache": None,
                   "need_sort": False}
        return cls(**_accepted(cls.__init__, offered))

    def free_page_ids(self, allocator, page_size: int) -> set[int]:
        """Pages the allocator holds as free: its free list and any deferred frees."""
        ids: set[int] = set()
        for attr in ("free_pages", "free_slots", "release_pages"):
            held = getattr(allocator, attr, None)
            if held is not None and hasattr(held, "tolist"):
                ids.update(held.tolist())
        for staged in getattr(allocator, "staged_pages", None) or ():
            ids.update(staged.tolist())
        if page_size == 1 or self._paged_allocator_class() is None:
            return ids
        return ids if isinstance(allocator, self._paged_allocator_class()) else {
            i // page_size for i in ids}

    # ------------------------------------------------------------------ the cache

    def make_radix_cache(self, allocator, page_size: int, events: bool = False):
        if self.t.cache_ctor == "params":
            return self.RadixCache(self.CacheInitParams(
                disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                page_size=page_size, enable_kv_cache_events=events))
        offered = {"req_to_token_pool": None, "token_to_kv_pool": allocator,
                   "token_to_kv_pool_allocator": allocator, "page_size": page_size,
                   "disable": False, "enable_kv_cache_events": events}
        if page_size > 1 and not self.t.pages:
            raise AdapterUnavailable(f"sglang {self.t.release}'s RadixCache has no page size "
                                     "(paging came in 0.4.4); use --block-size 1")
        accepted = _accepted(self.RadixCache.__init__, offered)
        if events and "enable_kv_cache_events" not in accepted:
            raise AdapterUnavailable(f"sglang {self.t.release}'s RadixCache publishes no KV "
                                     "events (they came in 0.4.8)")
        return self.RadixCache(**accepted)

    def key(self, tokens: Sequence[int]):
        if self.t.key == "radixkey-array":
            return self.RadixKey(token_ids=array("q", tokens), extra_key=None)
        if self.t.key == "radixkey-list":
            return self.RadixKey(token_ids=list(tokens), extra_key=None)
        return list(tokens)

    def match(self, cache, key) -> tuple[int, Any, Any]:
        """(tokens matched, their KV indices, the last matched node)."""
        if self.t.match_call == "params":
            result = cache.match_prefix(self.MatchPrefixParams(key=key))
        else:
            result = cache.match_prefix(key)
        if hasattr(result, "device_prefix_len"):  # 0.5.22+: no indices in the result
            node, length = result.last_device_node, result.device_prefix_len
            return length, cache.path_device_indices(node)[:length], node
        if hasattr(result, "device_indices"):  # MatchResult, 0.4.8+
            indices, node = result.device_indices, result.last_device_node
        else:
            indices, node = result
        if isinstance(indices, list):  # a disabled cache's empty answer
            indices = self.torch.tensor(indices, dtype=self.torch.int64)
        return len(indices), indices, node

    def insert(self, cache, key, value) -> int:
        if self.t.insert_call == "params":
            return cache.insert(self.InsertParams(key=key, value=value)).prefix_len
        return cache.insert(key, value)

    def evict(self, cache, num_tokens: int, allocator) -> None:
        if self.t.evict_call == "params":
            cache.evict(self.EvictParams(num_tokens=num_tokens))
        elif self.t.evict_call == "callback":
            cache.evict(num_tokens, allocator.free)
        else:
            cache.evict(num_tokens)

    def child_key(self, cache, key):
        if self.t.child_key == "key.child_key":
            return key.child_key(cache.page_size)
        if self.t.child_key == "get_child_key_fn":
            return cache.get_child_key_fn(key)
        return key[0]


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _source_has(cls, method: str, text: str) -> bool:
    """Whether ``cls.method``'s installed source contains ``text`` (False if unreadable)."""
    try:
        return text in inspect.getsource(getattr(cls, method))
    except (AttributeError, OSError, TypeError):
        return False


def _accepted(function, offered: dict) -> dict:
    """The entries of ``offered`` that ``function`` takes by name."""
    parameters = inspect.signature(function).parameters
    return {k: v for k, v in offered.items() if k in parameters}


@functools.lru_cache(maxsize=1)
def load() -> Sglang:
    """The installed release, loaded once (importing its cache modules costs seconds)."""
    api = Sglang()
    api.t.evictable_leaves = _has_evictable_leaves(api)
    return api


def _has_evictable_leaves(api: Sglang) -> bool:
    try:
        cache = api.make_radix_cache(api.make_allocator(1, 4), 1)
    except Exception:  # noqa: BLE001 - the adapter reports construction failures itself
        return False
    return hasattr(cache, "evictable_leaves")
