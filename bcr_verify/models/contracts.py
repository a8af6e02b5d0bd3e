"""Contracts on the reference model's public methods, checked by CrossHair.

Each function drives :class:`~bcr_verify.models.reference.ReferenceCache` through its public
API and states, as PEP 316 docstring conditions (``pre:`` / ``post:``), what the method
promises. ``crosshair check bcr_verify/models/contracts.py`` searches symbolically for inputs
that meet the preconditions and break a postcondition (tests/test_crosshair.py runs it with a
time budget). Inputs are kept small (a few blocks of a few tokens) so the solver explores them
exhaustively-ish; results are compared element-wise (CrossHair can report equal symbolic lists
as unequal).
"""

from __future__ import annotations

from bcr_verify.models.reference import ReferenceCache


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x == y for x, y in zip(a, b))


def match_after_insert(tokens: list[int], block_size: int) -> bool:
    """
    pre: 1 <= block_size <= 3
    pre: len(tokens) <= 9
    pre: all(0 <= t <= 3 for t in tokens)
    post: __return__
    """
    cache = ReferenceCache(block_size)
    blocks = len(tokens) // block_size
    cache.insert(tokens, list(range(blocks)))
    length, values = cache.match_prefix(tokens)
    return length == blocks * block_size and _same(values, list(range(blocks)))


def match_is_whole_blocks(stored: list[int], probe: list[int], block_size: int) -> bool:
    """
    pre: 1 <= block_size <= 3
    pre: len(stored) <= 9 and len(probe) <= 9
    pre: all(0 <= t <= 2 for t in stored + probe)
    post: __return__
    """
    cache = ReferenceCache(block_size)
    cache.insert(stored, list(range(len(stored) // block_size)))
    length, values = cache.match_prefix(probe)
    common = 0
    while common < min(len(stored), len(probe)) and stored[common] == probe[common]:
        common += 1
    full = min(common, len(stored) // block_size * block_size,
               len(probe) // block_size * block_size)
    return length == full // block_size * block_size and len(values) == length // block_size


def insert_reports_cached_prefix(first: list[int], second: list[int], block_size: int) -> bool:
    """
    pre: 1 <= block_size <= 3
    pre: len(first) <= 6 and len(second) <= 6
    pre: all(0 <= t <= 2 for t in first + second)
    post: __return__
    """
    cache = ReferenceCache(block_size)
    cache.insert(first, [("a", i) for i in range(len(first) // block_size)])
    before, _ = cache.match_prefix(second)
    reported = cache.insert(second, [("b", i) for i in range(len(second) // block_size)])
    return reported == before


def evict_removes_subtree(tokens: list[int], extra: list[int], block_size: int) -> bool:
    """
    pre: 1 <= block_size <= 2
    pre: 1 <= len(tokens) // block_size and len(tokens) <= 4 and len(extra) <= 4
    pre: all(0 <= t <= 2 for t in tokens + extra)
    post: __return__
    """
    cache = ReferenceCache(block_size)
    cache.insert(tokens, [("t", i) for i in range(len(tokens) // block_size)])
    longer = tokens + extra
    cache.insert(longer, [("l", i) for i in range(len(longer) // block_size)])
    first = cache.match_prefix(tokens)[1][0]
    removed = cache.evict(first)
    cache.assert_invariants()
    return len(cache) == 0 and len(removed) == len(longer) // block_size \
        and cache.match_prefix(longer)[0] == 0


def evict_lru_frees_enough_and_spares_pinned(tokens: list[int], pin: int, ask: int) -> bool:
    """
    pre: len(tokens) <= 6
    pre: all(0 <= t <= 2 for t in tokens)
    pre: 0 <= pin <= len(tokens) and 0 <= ask <= 8
    post: __return__
    """
    cache = ReferenceCache(1)
    cache.insert(tokens, list(range(len(tokens))))
    pinned = list(range(pin))
    cache.acquire(pinned)
    evictable = cache.evictable_tokens
    freed = cache.evict_lru(ask)
    cache.assert_invariants()
    return len(freed) >= min(ask, evictable) and not any(v in pinned for v in freed)


def over_release_is_refused(tokens: list[int], times: int) -> bool:
    """
    pre: 1 <= len(tokens) <= 4
    pre: all(0 <= t <= 2 for t in tokens)
    pre: 1 <= times <= 3
    post: __return__
    """
    cache = ReferenceCache(1)
    cache.insert(tokens, list(range(len(tokens))))
    cache.acquire([0] * times)
    try:
        cache.release([0] * (times + 1))
    except ValueError:
        return cache.refcount(0) == times
    return False
