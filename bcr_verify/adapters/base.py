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


OPTIONS = {
    "eviction": ("lru", "explicit", "lazy"),
    "lru_unit": ("node", "block", "chain-tail"),
    "recency": ("use", "release"),
    "matchable": ("finish", "alloc"),
    "hit_cap": (0, 1),
    "duplicates": ("freed", "kept"),
    "free_counts_evictable": (False, True),
    "tail_page": (False, True),
    "reports_sizes": (False, True),
}
"""Every contract option and the values the model understands for it."""


@dataclass(frozen=True)
class Contract:
    """What an implementation may legally do. Every field changes what the model predicts
    for that implementation, and so every field is checked, never merely tolerated.

    ``eviction``: ``"lru"`` caches free a token count on demand and pick their own victims
    (checked against LRU); ``"explicit"`` caches evict the block they are told, with its
    subtree; ``"lazy"`` caches never evict on demand: an allocation takes pages from a free
    queue and evicts the cached blocks on the pages it takes (vLLM), in the order
    :class:`~bcr_verify.models.FreeQueue` predicts.
    ``lru_unit``: ``"node"``: a radix node (several blocks) goes whole and refreshes its whole
    key before a split, so the model accepts those two relaxations of block LRU (SGLang);
    ``"block"``: strict block LRU; ``"chain-tail"``: a request's pages are released tail
    first, so a chain is evicted from its tail (lazy caches).
    ``recency``: ``"use"``: a match or insert refreshes a block; ``"release"``: only the
    order in which pages were released counts, a lookup refreshes nothing (lazy caches).
    ``matchable``: a request's blocks can be matched from ``"finish"`` (insert, SGLang), or
    from ``"alloc"`` on: as soon as its pages are allocated, so an aborted request's blocks
    stay cached (vLLM).
    ``hit_cap``: tokens a request's match must leave unmatched at its end (vLLM: 1, so a
    fully cached block-aligned prompt recomputes its last block).
    ``duplicates``: a block computed twice is ``"freed"`` at insert (one copy stays, SGLang)
    or ``"kept"``: both copies cached, each evictable on its own (vLLM).
    ``free_counts_evictable``: ``available_pages()`` counts evictable cached pages as free.
    ``tail_page``: a prompt's partial last block gets a page of its own (never matchable).
    ``reports_sizes``: the cache reports evictable / protected token counts to compare.
    """

    block_size: int
    eviction: Literal["lru", "explicit", "lazy"]
    lru_unit: Literal["node", "block", "chain-tail"] = "block"
    recency: Literal["use", "release"] = "use"
    matchable: Literal["finish", "alloc"] = "finish"
    hit_cap: int = 0
    duplicates: Literal["freed", "kept"] = "freed"
    free_counts_evictable: bool = False
    tail_page: bool = False
    reports_sizes: bool = False

    def __post_init__(self):
        from bcr_verify.errors import UsageError

        for name, allowed in OPTIONS.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"contract: {name}={getattr(self, name)!r}; the model "
                                 f"understands {', '.join(map(repr, allowed))}")
        lazy = self.eviction == "lazy"
        lazy_only = [f"{name}={getattr(self, name)!r}" for name, value in (
            ("recency", "release"), ("matchable", "alloc"), ("duplicates", "kept"),
            ("tail_page", True), ("lru_unit", "chain-tail")) if getattr(self, name) == value]
        if not lazy and lazy_only:
            raise UsageError(f"contract: {', '.join(lazy_only)} needs eviction='lazy' (pages "
                             "released into a free queue, which the model then predicts)")
        if lazy and (self.matchable != "alloc" or self.lru_unit == "node"):
            raise UsageError("contract: eviction='lazy' needs matchable='alloc' and lru_unit "
                             "'chain-tail' or 'block' (a lazy cache caches a request's blocks "
                             "as it allocates them, and evicts single pages)")

    def differences(self, other: "Contract") -> dict:
        """Options on which ``self`` and ``other`` differ: ``{name: (mine, theirs)}``."""
        return {name: (getattr(self, name), getattr(other, name)) for name in OPTIONS
                if getattr(self, name) != getattr(other, name)}


@dataclass(frozen=True)
class CacheSpec:
    """What a factory is told about the cache to build, so that no adapter has to reach
    into bcr_verify to size its pool: a factory whose parameter is annotated ``CacheSpec``
    (or named ``spec``) gets one; one taking the block size alone (BCR's constructor) gets an
    int. ``bcr-verify replay`` passes the trace's own capacity through."""

    block_size: int
    capacity_pages: int
    events: bool = False
    """Build the cache with its KV-cache event stream on (see :meth:`CacheAdapter.take_events`)."""


@dataclass(frozen=True)
class Stored:
    """KV-cache event: the full blocks of ``tokens`` were cached, one ``hashes`` entry per
    block, the first under the block hashed ``parent`` (None: under the root)."""

    hashes: tuple
    parent: Any
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Removed:
    """KV-cache event: the blocks with these hashes left the cache."""

    hashes: tuple


@dataclass(frozen=True)
class Cleared:
    """KV-cache event: everything left the cache."""


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

    def lock(self, handle: Any) -> Any:
        """Protect a match's prefix like a running request; returns what :meth:`unlock` takes."""
        raise NotImplementedError(f"{self.name} locks in admit()")

    def admit(self, handle: Any, num_pages: int) -> tuple[Any, list[int]] | None:
        """Lazy-eviction caches: lock a request's match and allocate ``num_pages`` for the
        rest of its prompt in one call, as the engine does (vLLM's ``allocate_slots``):
        ``(receipt, pages)``, or None if the cache refuses the request."""
        raise NotImplementedError(f"{self.name} is not a lazy-eviction cache")

    @abstractmethod
    def unlock(self, receipt: Any) -> None:
        """End a request: release its prefix (and, for lazy caches, all of its pages)."""

    def insert(self, tokens: Sequence[int], pages: Sequence[int], owned_from: int) -> Inserted:
        """Cache ``tokens`` with one page per full block and free what turned out duplicate.

        ``pages[:owned_from]`` came from the caller's locked match and are the cache's own;
        ``pages[owned_from:]`` were freshly allocated, and any of them whose block was cached
        meanwhile is a duplicate that must be freed, as SGLang's scheduler does.
        """
        raise NotImplementedError(f"{self.name} caches at allocation")

    def evict_tokens(self, num_tokens: int) -> list[int]:
        """LRU caches: free at least ``num_tokens`` tokens; returns the freed pages."""
        raise NotImplementedError(f"{self.name} has explicit eviction only")

    def evict_value(self, page: int) -> list[int] | None:
        """Explicit caches: evict ``page`` and its subtree; the freed pages, or None if the
        cache does not say (the machine then frees what the model predicts). Lazy caches:
        uncache the one unreferenced copy in ``page`` (its page stays where it is in the free
        queue); returns ``[page]``."""
        raise NotImplementedError(f"{self.name} has LRU eviction only")

    def alloc(self, num_pages: int) -> list[int] | None:
        """Take pages from the allocator, or None if it has too few free."""
        raise NotImplementedError(f"{self.name} allocates in admit()")

    def free(self, pages: Sequence[int]) -> None:
        raise NotImplementedError(f"{self.name} frees a request's pages in unlock()")

    @abstractmethod
    def available_pages(self) -> int: ...

    @property
    @abstractmethod
    def capacity_pages(self) -> int: ...

    def sizes(self) -> Sizes | None:
        """Evictable and protected token counts, where the cache reports them."""
        return None

    def take_events(self) -> list | None:
        """The KV-cache events since the last call, as :class:`Stored` / :class:`Removed` /
        :class:`Cleared` (a thin translation of the engine's own); None for a cache that
        publishes no event stream, or was built without one (``CacheSpec.events``)."""
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
