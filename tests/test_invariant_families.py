"""One broken cache per invariant family: each must be caught, by the check that names it."""

import pytest

import broken_caches
from bcr_verify.adapters import CacheSpec, resolve
from bcr_verify.errors import Divergence, InvariantViolation
from bcr_verify.lockstep import Lockstep

A = [1, 2, 3, 4, 5, 6, 7, 8]
B = [1, 2, 3, 4, 9, 9, 9, 9]
C = [7, 7, 7, 7, 7, 7]


def scenario(lockstep: Lockstep) -> None:
    """Inserts that share a prefix, a split by lookup, a lock held across an eviction, a flush."""
    for tokens in (A, B, C):
        lockstep.finish(lockstep.begin(tokens))
    lockstep.match([1, 2, 3, 4, 5, 0])
    held = lockstep.begin(A)
    lockstep.evict(4)
    lockstep.finish(held)
    lockstep.match(B)
    lockstep.reset()


@pytest.mark.parametrize("factory, kind, check", [
    ("broken_parent", InvariantViolation, "parent link"),
    ("broken_child_key", InvariantViolation, "child key"),
    ("broken_value_length", InvariantViolation, "key/value length"),
    ("broken_empty_node", InvariantViolation, "no empty nodes"),
    ("broken_lock_count", InvariantViolation, "lock count"),
    ("broken_sizes", InvariantViolation, "evictable + protected = total"),
    ("broken_free_list", InvariantViolation, "kv not free"),
    ("broken_storage", InvariantViolation, "value owns storage"),
    ("broken_conservation", InvariantViolation, "pool conservation"),
])
def test_each_invariant_family_is_caught(factory, kind, check):
    broken = getattr(broken_caches, factory)(CacheSpec(block_size=1, capacity_pages=64))
    lockstep = Lockstep([resolve("reference").build(1, 64), broken])
    with pytest.raises(kind) as info:
        scenario(lockstep)
    assert info.value.check == check, str(info.value)
    assert info.value.impl == broken.name
    assert info.value.step is not None


def test_the_correct_cache_passes_the_same_scenario():
    lockstep = Lockstep([resolve("reference").build(1, 64), resolve("sglang-radix").build(1, 64)])
    scenario(lockstep)
    stats = lockstep.report()["implementations"]["sglang-radix"]
    assert stats["hits"] and stats["evictions"], stats


def test_a_wrong_slot_with_a_perfect_tree_is_a_match_divergence():
    broken = resolve("broken_caches:off_by_one_match").build(1, 64)
    lockstep = Lockstep([resolve("reference").build(1, 64), broken])
    with pytest.raises(Divergence) as info:
        scenario(lockstep)
    assert info.value.check == "match"
    assert info.value.impl == "broken_caches:off_by_one_match"
