"""The one protocol the lockstep machine speaks, and each implementation's declared contract.

Everything is in *pages*: a page is ``block_size`` consecutive KV slots, named by an int, and
is the unit a cache stores per block (BCR's block value, SGLang's ``page_size`` slots). An
adapter translates its cache's own values to and from page ids and nothing more: what a result
*should* be is decided by the reference model inside the machine, never by an adapter.

Each adapter owns the allocator its cache frees into (SGLang's real allocator for SGLang's
caches, :class:`PagePool` for caches that never free anything themselves), so the pool
conservation law ``free + cached + held by requests == capacity`` is checked on real parts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Sequence


@dataclass(frozen=True)
class Contract:
    """What an implementation promises, so the machine knows which differences are legal.

    ``eviction``: ``"lru"`` caches pick their own victims for a token count (checked against
    what LRU allows); ``"explicit"`` caches evict the value they are told, with its subtree.
    ``may_over_evict``: whole radix nodes go at once, so more than asked may be freed.
    ``reports_sizes``: the cache reports evictable / protected token counts to compare.
    ``self_check``: how its structure is checked after every mutation.
    ``values``: what the cache stores per block, before the adapter turns it into a page id.
    """

    block_size: int
    values: str
    eviction: Literal["lru", "explicit"]
    may_over_evict: bool
    reports_sizes: bool
    self_check: str


@dataclass
class Match:
    """A prefix lookup: ``length`` tokens matched, the pages behind them, and a lock handle."""

    length: int
    pages: list[int]
    handle: Any = None


@dataclass
class Inserted:
    """``prefix_len`` tokens were already cached; ``freed`` are the duplicate pages freed."""

    prefix_len: int
    freed: list[int]


@dataclass
class Sizes:
    evictable: int
    protected: int


class CacheAdapter(ABC):
    """A thin translation from one cache's API to the machine's operations."""

    name: str
    contract: Contract

    @abstractmethod
    def match(self, tokens: Sequence[int]) -> Match: ...

    @abstractmethod
    def lock(self, handle: Any) -> Any:
        """Protect a match's prefix like a running request; returns what :meth:`unlock` takes."""

    @abstractmethod
    def unlock(self, receipt: Any) -> None: ...

    @abstractmethod
    def insert(self, tokens: Sequence[int], pages: Sequence[int], owned_from: int) -> Inserted:
        """Cache ``tokens`` with one page per full block and free what turned out duplicate.

        ``pages[:owned_from]`` came from the caller's locked match and are the cache's own;
        ``pages[owned_from:]`` were freshly allocated, and any of them whose block was cached
        meanwhile is a duplicate that must be freed, as SGLang's scheduler does.
        """

    def evict_tokens(self, num_tokens: int) -> list[int]:
        """LRU caches: free at least ``num_tokens`` tokens; returns the freed pages."""
        raise NotImplementedError(f"{self.name} has explicit eviction only")

    def evict_value(self, page: int) -> list[int] | None:
        """Explicit caches: evict ``page`` and its subtree; the freed pages, or None if the
        cache does not say (the machine then frees what the model predicts)."""
        raise NotImplementedError(f"{self.name} has LRU eviction only")

    @abstractmethod
    def alloc(self, num_pages: int) -> list[int] | None:
        """Take pages from the allocator, or None if it has too few free."""

    @abstractmethod
    def free(self, pages: Sequence[int]) -> None: ...

    @abstractmethod
    def available_pages(self) -> int: ...

    @property
    @abstractmethod
    def capacity_pages(self) -> int: ...

    def sizes(self) -> Sizes | None:
        """Evictable and protected token counts, where the cache reports them."""
        return None

    @abstractmethod
    def check_invariants(self) -> None:
        """Raise :class:`~bcr_verify.errors.InvariantViolation` naming what broke."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the cache and return every page to the allocator."""


class PagePool:
    """A free list of page ids ``1..capacity``; freed pages are reused first (LIFO).

    LIFO reuse makes a freed page come back soon, which is what exposes stale-slot bugs.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = list(range(capacity, 0, -1))
        self._is_free = set(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        self._is_free.difference_update(pages)
        return pages

    def free(self, pages: Sequence[int]) -> None:
        for page in pages:
            if page in self._is_free or not 1 <= page <= self.capacity:
                raise ValueError(f"page {page} freed twice or never allocated")
            self._free.append(page)
            self._is_free.add(page)

    def available(self) -> int:
        return len(self._free)

    def is_free(self, page: int) -> bool:
        return page in self._is_free

    def reset(self) -> None:
        self.__init__(self.capacity)
