"""Adapter for caches with BCR-memory-2's API: the ``bcr_cache`` wheel, and our reference model.

BCR's documented surface is ``insert(token_ids, block_values)``, ``match_prefix(token_ids)``,
``evict(block_value)``, ``acquire(values)`` / ``release(values)`` and ``assert_invariants()``.
Block values are opaque to BCR; here they are page ids from a :class:`PagePool`.
The same code path drives ``bcr_cache`` and :class:`~bcr_verify.models.ReferenceCache`, so the
tests that run it on the reference prove this adapter even where ``bcr_cache`` cannot be had.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from bcr_verify.adapters.base import CacheAdapter, Contract, Inserted, Match, PagePool, Sizes
from bcr_verify.errors import InvariantViolation


class BCRApiAdapter(CacheAdapter):
    """Drive any object with BCR-memory-2's API built by ``factory(block_size)``.

    ``eviction="lru"`` needs the cache to have ``evict_lru(num_tokens)`` (the reference model
    does; BCR does not), otherwise victims are chosen by the machine and evicted by value.
    """

    def __init__(self, name: str, factory: Callable[[int], Any], block_size: int,
                 capacity_pages: int, eviction: str = "explicit"):
        self.name = name
        self._factory = factory
        self._block_size = block_size
        self.cache = factory(block_size)
        if eviction == "lru" and not hasattr(self.cache, "evict_lru"):
            raise TypeError(f"{name}: eviction='lru' needs the cache to have evict_lru()")
        self.pool = PagePool(capacity_pages)
        self.contract = Contract(block_size=block_size, eviction=eviction, lru_unit="block",
                                 reports_sizes=hasattr(self.cache, "evictable_tokens"))
        self.notes = {"self_check": "assert_invariants()"}

    def match(self, tokens: Sequence[int]) -> Match:
        length, values = self.cache.match_prefix(list(tokens))
        pages = list(values)
        return Match(length=length, pages=pages, handle=pages)

    def lock(self, handle: list[int]) -> list[int]:
        self.cache.acquire(handle)
        return handle

    def unlock(self, receipt: list[int]) -> None:
        self.cache.release(receipt)

    def insert(self, tokens: Sequence[int], pages: Sequence[int], owned_from: int) -> Inserted:
        pages = list(pages)
        prefix_len = self.cache.insert(list(tokens), pages)
        if not isinstance(prefix_len, int):  # BCR's insert returns nothing: read back what it kept.
            _, stored = self.cache.match_prefix(list(tokens))
            ours = (i for i in range(owned_from, len(stored)) if stored[i] == pages[i])
            prefix_len = next(ours, len(stored)) * self._block_size
        duplicates = pages[owned_from: prefix_len // self._block_size]
        self.pool.free(duplicates)
        return Inserted(prefix_len=prefix_len, freed=duplicates)

    def evict_tokens(self, num_tokens: int) -> list[int]:
        if self.contract.eviction != "lru":
            return super().evict_tokens(num_tokens)
        freed = list(self.cache.evict_lru(num_tokens))
        self.pool.free(freed)
        return freed

    def evict_value(self, page: int) -> list[int] | None:
        removed = self.cache.evict(page)
        if removed is None:
            return None
        removed = list(removed)
        self.pool.free(removed)
        return removed

    def alloc(self, num_pages: int) -> list[int] | None:
        return self.pool.alloc(num_pages)

    def free(self, pages: Sequence[int]) -> None:
        self.pool.free(pages)

    def available_pages(self) -> int:
        return self.pool.available()

    @property
    def capacity_pages(self) -> int:
        return self.pool.capacity

    def sizes(self) -> Sizes:
        return Sizes(evictable=self.cache.evictable_tokens, protected=self.cache.protected_tokens)

    def check_invariants(self) -> None:
        try:
            self.cache.assert_invariants()
        except AssertionError as exc:
            raise InvariantViolation(self.name, "assert_invariants", str(exc) or repr(exc)) from exc
        if hasattr(self.cache, "values"):
            free_but_cached = [p for p in self.cache.values() if self.pool.is_free(p)]
            if free_but_cached:
                raise InvariantViolation(
                    self.name, "cached page not free",
                    f"pages {free_but_cached[:5]} are cached and also in the free pool")

    def reset(self) -> None:
        """The cache's own ``reset()`` where it has one (judged like every other call: the
        model and the pool must be empty after it); BCR's documented API has none, so a
        cache without one is rebuilt."""
        if callable(getattr(self.cache, "reset", None)):
            self.cache.reset()
        else:
            self.cache = self._factory(self._block_size)
        self.pool.reset()
