"""The reference model: BCR-memory-2's API, clear errors that change nothing, LRU judging."""

import pytest
from hypothesis import given, strategies as st

from bcr_verify.models import BCRCache, ReferenceCache


def snapshot(cache):
    """Everything observable about the model's state, as plain data."""
    def walk(children, prefix):
        for b in sorted(children.values(), key=lambda b: b.tokens):
            yield prefix + b.tokens, b.value, b.refs, b.used, b.maybe_used
            yield from walk(b.children, prefix + b.tokens)
    return cache.clock, sorted(walk(cache._root_children, ())), sorted(cache._by_value)


def test_insert_match_by_whole_blocks():
    c = BCRCache(block_size=2)
    assert c.insert([1, 2, 3, 4, 5], ["a", "b"]) == 0
    assert c.match_prefix([1, 2, 3, 4, 9]) == (4, ["a", "b"])
    assert c.match_prefix([1, 2, 3]) == (2, ["a"])
    assert c.match_prefix([2, 2]) == (0, [])
    assert c.insert([1, 2, 7, 7], ["a2", "c"]) == 2  # first block cached: "a2" is a duplicate
    assert c.match_prefix([1, 2, 7, 7]) == (4, ["a", "c"])
    c.assert_invariants()


def test_evict_removes_subtree_and_refuses_in_use():
    c = ReferenceCache(1)
    c.insert([1, 2, 3], [10, 20, 30])
    c.insert([1, 2, 4], [10, 20, 40])
    c.acquire([40])
    with pytest.raises(ValueError, match="block_value 20 cannot be evicted"):
        c.evict(20)
    c.release([40])
    assert sorted(c.evict(20)) == [20, 30, 40]
    assert c.match_prefix([1, 2, 3]) == (1, [10])
    c.assert_invariants()


@pytest.mark.parametrize("call, error, words", [
    (lambda c: c.insert([1, -2], [1, 2]), ValueError, "token_ids[1] must be >= 0"),
    (lambda c: c.insert([1, 2.0], [1, 2]), TypeError, "token_ids[1] must be an int"),
    (lambda c: c.insert([1, True], [1, 2]), TypeError, "token_ids[1] must be an int"),
    (lambda c: c.match_prefix((3, 4, None)), TypeError, "token_ids[2] must be an int"),
    (lambda c: c.insert("ab", [1, 2]), TypeError, "token_ids must be a sequence"),
    (lambda c: c.insert([1, 2, 3], [1, 2]), ValueError, "block_values has 2 values but"),
    (lambda c: c.insert([5, 6], [7, 7]), ValueError, "block_values repeats a value"),
    (lambda c: c.insert([5, 6], [100, 8]), ValueError, "already cached"),
    (lambda c: c.evict(12345), ValueError, "block_value: 12345 is not cached"),
    (lambda c: c.evict(100), ValueError, "acquired; release them first"),
    (lambda c: c.release([200]), ValueError, "released more often than it was acquired"),
    (lambda c: c.acquire([100, 999]), ValueError, "values: 999 is not cached"),
    (lambda c: c.evict_lru(-1), ValueError, "num_tokens must be >= 0"),
])
def test_bad_input_names_the_argument_and_changes_nothing(call, error, words):
    c = ReferenceCache(1)
    c.insert([1, 2], [100, 200])
    c.acquire([100])
    before = snapshot(c)
    with pytest.raises(error) as info:
        call(c)
    assert words in str(info.value)
    assert snapshot(c) == before


def test_any_sequence_of_ints_is_one_prompt():
    """A tuple, a list, and ints of an int subclass cut into the same blocks."""
    class Token(int):
        pass

    c = ReferenceCache(2)
    assert c.split([5, 6, 7, 8, 9]) == c.split((5, 6, 7, 8, 9)) \
        == c.split([Token(5), 6, Token(7), 8, 9])
    c.insert((5, 6, 7, 8), [10, 20])
    assert c.match_prefix([Token(5), Token(6), 7, 8, 9]) == (4, [10, 20])


def test_block_size_is_validated():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ReferenceCache(0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        ReferenceCache(1.5)


def test_whole_block_eviction_after_single_copies_is_refused_until_a_reset():
    """vLLM evicts one copy at a time and SGLang whole blocks and what lies below them; no
    contract mixes the two. Mixed, ``evict_lru`` raised ``KeyError`` under the block that
    ``evict_copy`` had hollowed, and ``evict`` left it hollow with nothing below it."""
    c = ReferenceCache(1)
    c.insert([1, 2, 3], [10, 20, 30])
    c.evict_copy(10)  # block 1 is hollow now, blocks 2 and 3 still cached below it
    before = c.clock, c.values(), c.cached_blocks([1, 2, 3])
    for call, method in [(lambda: c.evict_lru(1), "LRU eviction"), (lambda: c.evict(20), "evict"),
                         (lambda: c.apply_lru_eviction([30], 1), "apply_lru_eviction")]:
        with pytest.raises(ValueError, match=f"{method}: this model has evicted single copies"):
            call()
        assert (c.clock, c.values(), c.cached_blocks([1, 2, 3])) == before
    c.reset()
    c.insert([1, 2, 3], [10, 20, 30])
    assert c.evict_lru(1) == [30]
    c.assert_invariants()


def test_lru_eviction_is_oldest_unpinned_leaf_first():
    c = ReferenceCache(1)
    c.insert([1, 2], [1, 2])
    c.insert([3, 4], [3, 4])
    c.match_prefix([1, 2])  # [1, 2] is now the most recent
    c.acquire([3])          # pins 3, not its child 4
    assert c.evict_lru(1) == [4]
    assert c.evict_lru(2) == [2, 1]
    assert c.evict_lru(5) == []  # 3 is pinned


def test_apply_lru_eviction_accepts_legal_and_refuses_illegal_choices():
    c = ReferenceCache(1)
    c.insert([1, 2], [1, 2])
    c.insert([3, 4], [3, 4])
    c.match_prefix([3, 4])
    with pytest.raises(ValueError, match="not LRU"):
        c.apply_lru_eviction([4], 1)
    with pytest.raises(ValueError, match="kept \\[2\\] below it"):
        c.apply_lru_eviction([1], 1)
    with pytest.raises(ValueError, match="asked to free 2 tokens, freed 1"):
        c.apply_lru_eviction([2], 2)
    c.acquire([1])
    with pytest.raises(ValueError, match="a running request holds"):
        c.apply_lru_eviction([2, 1], 2)
    c.release([1])
    c.apply_lru_eviction([2, 1, 4], 2)  # whole-node over-eviction is legal
    assert c.values() == [3]


def test_unmatched_rest_of_a_radix_node_may_count_as_touched():
    # SGLang refreshes a whole node before splitting off the matched part: the model allows it.
    c = ReferenceCache(1)
    c.insert([1, 2, 3], [1, 2, 3])
    c.insert([9], [9])
    c.match_prefix([1, 7])           # a radix tree may refresh [2, 3] here too
    c.apply_lru_eviction([9], 1)     # so evicting [9] before [3] is legal LRU


TOKENS = st.sampled_from([0, 1, 2, 3, 2**64 - 1, 2**64, 2**70])
"""A few small tokens, and the largest ones a block's bytes key holds or does not hold."""


@given(st.lists(st.lists(TOKENS, max_size=8), max_size=12), st.integers(1, 3))
def test_match_after_insert_returns_the_inserted_values(prompts, block_size):
    c = ReferenceCache(block_size)
    fresh = iter(range(10**6))
    for tokens in prompts:
        n = len(tokens) // block_size
        _, have = c.match_prefix(tokens)
        values = have + [next(fresh) for _ in range(n - len(have))]
        c.insert(tokens, values)
        assert c.match_prefix(tokens) == (n * block_size, values)
        c.assert_invariants()


def test_blocks_keep_their_tokens_whatever_their_key():
    c = ReferenceCache(2)
    c.insert([1, 2, 2**64, 3, 4, 5], ["a", "b", "c"])
    blocks = sorted(c._by_value.items())
    assert [(v, b.tokens) for v, b in blocks] == [("a", (1, 2)), ("b", (2**64, 3)), ("c", (4, 5))]
    assert [type(b.key) for _, b in blocks] == [bytes, tuple, bytes]
    assert c.match_prefix([1, 2, 2**64, 3, 4, 5, 6]) == (6, ["a", "b", "c"])
    assert c.match_prefix([1, 2, 2**64, 4]) == (2, ["a"])
    c.assert_invariants()
