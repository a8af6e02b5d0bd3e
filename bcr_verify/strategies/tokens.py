"""Hypothesis strategies for token-id prompts: real-workload prompts plus raw edge cases.

Real prompts give realistic sharing; the edge cases aim at where block-based caches break:
lengths one off a block boundary, identical pages (same hash, different position), chains
long enough to stress eviction, empty prompts, and tiny alphabets that collide constantly.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

REGULAR_VOCAB = 151643  # Qwen2 ids below this are ordinary BPE tokens (specials start here)
SMALL_ALPHABET = (0, 1, 2)


def edge_case_prompts(block_size: int, vocab: int = REGULAR_VOCAB) -> SearchStrategy[list[int]]:
    """Prompts at the cache's structural edges, for a cache with ``block_size``-token blocks."""
    if block_size < 1 or vocab < len(SMALL_ALPHABET):
        raise ValueError(f"need block_size >= 1 and vocab >= {len(SMALL_ALPHABET)}, "
                         f"got block_size={block_size}, vocab={vocab}")
    token = st.integers(0, vocab - 1)
    boundary_lengths = sorted({k * block_size + d for k in range(1, 5) for d in (-1, 0, 1)} - {0})
    return st.one_of(
        st.just([]),
        st.lists(token, min_size=1, max_size=1),
        st.sampled_from(boundary_lengths).flatmap(
            lambda n: st.lists(token, min_size=n, max_size=n)),
        st.builds(_repeated_pages, st.lists(token, min_size=block_size, max_size=block_size),
                  st.integers(2, 12), st.lists(token, max_size=block_size)),
        st.builds(_long_chain, st.integers(0, vocab - 1), st.integers(20, 40),
                  st.just(block_size), st.just(vocab)),
        st.lists(st.sampled_from(SMALL_ALPHABET), max_size=3 * block_size + 1),
    )


def prompts(pool: list[list[int]], block_size: int, vocab: int = REGULAR_VOCAB
            ) -> SearchStrategy[list[int]]:
    """Mostly a prompt from ``pool``; sometimes one cut short or extended; sometimes an edge case.

    A cut is at a random length or at the prompt's last block boundary: repeats of the latter
    are fully cached, block-aligned prompts, where a hit cap makes an engine recompute a block
    into a second copy. Shrinking moves toward plain pool prompts, so a minimal failing trace
    reads like traffic.
    """
    if not pool:
        raise ValueError("prompts() needs a non-empty pool; build one with build_workload()")
    whole = st.sampled_from(pool)
    cut = whole.flatmap(lambda p: st.one_of(
        st.integers(0, len(p)).map(lambda n: p[:n]),
        st.just(p[:len(p) // block_size * block_size])))
    extended = st.builds(lambda p, extra: p + extra, whole,
                         st.lists(st.integers(0, vocab - 1), min_size=1, max_size=block_size + 1))
    edge = edge_case_prompts(block_size, vocab)
    return st.integers(0, 9).flatmap(
        lambda roll: whole if roll < 6 else cut if roll < 8 else extended if roll < 9 else edge)


def _repeated_pages(page: list[int], times: int, tail: list[int]) -> list[int]:
    return page * times + tail


def _long_chain(start: int, blocks: int, block_size: int, vocab: int) -> list[int]:
    """``blocks`` full blocks of distinct ids, built from two draws so shrinking stays cheap."""
    return [(start + i) % vocab for i in range(blocks * block_size)]
