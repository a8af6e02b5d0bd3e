"""Every contract option changes what the model predicts: a real cache that declares a value it
does not follow is caught, and every value of every option is used, legally, by a real cache
that passes.

The lies are told by real caches (vLLM's KVCacheManager, SGLang's RadixCache, the reference)
with one declared option changed, or, where the declaration cannot change alone, with vLLM
driven so that it stops doing what its contract says (blocks cached only later).
"""

from __future__ import annotations

import dataclasses

import pytest

from bcr_verify.adapters import BCRApiAdapter, resolve
from bcr_verify.adapters.base import OPTIONS
from bcr_verify.errors import Divergence, InvariantViolation, UsageError
from bcr_verify.lockstep import Lockstep
from bcr_verify.models import ReferenceCache
from bcr_verify.runner import RunConfig, run

BS = 4
A = list(range(100, 112))            # three full blocks
B = list(range(200, 212))
C = list(range(300, 316))            # four full blocks
D = list(range(400, 424))            # six full blocks


def lane(name: str, capacity: int = 8, **declared):
    adapter = resolve(name).build(BS, capacity)
    if declared:
        adapter.contract = dataclasses.replace(adapter.contract, **declared)
    return adapter


def caught(adapter, script, check: str):
    """Run ``script`` on a one-lane lockstep; it must fail on ``check``."""
    lockstep = Lockstep([adapter])
    with pytest.raises((Divergence, InvariantViolation)) as failure:
        script(lockstep)
    assert failure.value.check == check, failure.value
    return failure.value


def served(lockstep, *prompts):
    for tokens in prompts:
        lockstep.finish(lockstep.begin(tokens))


LIES = {
    "vLLM caps hits, declares no cap": (
        "vllm-apc", 8, {"hit_cap": 0}, lambda ls: (served(ls, A), ls.match(A)), "match"),
    "SGLang caps nothing, declares a cap": (
        "sglang-radix", 16, {"hit_cap": 1}, lambda ls: (served(ls, A), ls.match(A)), "match"),
    # vLLM keeps a recomputed block's copy cached, so its page goes back into the free queue
    # behind the cached ones, not in front
    "vLLM keeps duplicate copies, declares them freed": (
        "vllm-apc", 8, {"duplicates": "freed"}, lambda ls: served(ls, A, A, B), "allocation"),
    "vLLM's lookups refresh nothing, declared to": (
        "vllm-apc", 8, {"recency": "use"},
        lambda ls: (served(ls, A, B), ls.match(A), ls.begin(C)), "allocation"),
    "vLLM releases tail first, declares head first": (
        "vllm-apc", 8, {"lru_unit": "block"}, lambda ls: (served(ls, A), ls.begin(D)),
        "allocation"),
    "SGLang evicts whole radix nodes, declares block LRU": (
        "sglang-radix", 16, {"lru_unit": "block"}, lambda ls: (served(ls, A + B), ls.evict(1)),
        "strict LRU"),
    "vLLM counts evictable blocks as free, declares not": (
        "vllm-apc", 8, {"free_counts_evictable": False}, lambda ls: served(ls, A),
        "pool conservation"),
    "SGLang does not count them, declares it does": (
        "sglang-radix", 16, {"free_counts_evictable": True}, lambda ls: served(ls, A),
        "pool conservation"),
    "vLLM gives a partial block a page, declares not": (
        "vllm-apc", 8, {"tail_page": False}, lambda ls: ls.begin(A + [1]), "allocation"),
    "vLLM reports no sizes, declares it does": (
        "vllm-apc", 8, {"reports_sizes": True}, lambda ls: served(ls, A), "sizes"),
}


@pytest.mark.parametrize("lie", LIES)
def test_a_declared_option_the_cache_does_not_follow_is_caught(lie):
    impl, capacity, declared, script, check = LIES[lie]
    caught(lane(impl, capacity, **declared), script, check)


@pytest.mark.parametrize("lie", LIES)
def test_the_same_steps_pass_under_the_true_contract(lie):
    impl, capacity, _, script, _ = LIES[lie]
    script(Lockstep([lane(impl, capacity)]))


def test_blocks_matchable_at_allocation_is_checked():
    """vLLM made to cache only later (as with ``delay_cache_blocks``) still declares 'alloc':
    a lookup while the request runs finds nothing the model says is there."""
    adapter = lane("vllm-apc")
    allocate = adapter.manager.allocate_slots
    adapter.manager.allocate_slots = lambda *a, **k: allocate(*a, **k, delay_cache_blocks=True)

    def script(ls):
        ls.begin(A)
        ls.match(A + [1])
    caught(adapter, script, "match")
    script(Lockstep([lane("vllm-apc")]))


class MostRecentFirst(ReferenceCache):
    """Declares LRU eviction, evicts the most recently used leaf."""

    def evict_lru(self, num_tokens):
        leaves = [b for b in {id(b): b for b in self._by_value.values()}.values()
                  if not b.children and not b.refs]
        newest = max(leaves, key=lambda b: b.used)
        self._remove([newest])
        return list(newest.copies)


def test_lru_eviction_lie_is_caught():
    adapter = BCRApiAdapter("mru", MostRecentFirst, BS, 16, eviction="lru")
    caught(adapter, lambda ls: (served(ls, A, B), ls.evict(BS)), "eviction")
    honest = BCRApiAdapter("lru", ReferenceCache, BS, 16, eviction="lru")
    (lambda ls: (served(ls, A, B), ls.evict(BS)))(Lockstep([honest]))


def test_lazy_eviction_that_refuses_instead_is_caught():
    """A lazy cache that refuses a request rather than evict: admission is judged."""
    adapter = lane("vllm-apc")
    allocate = adapter.manager.allocate_slots
    pool = adapter.pool

    def refuse_when_it_would_evict(request, num_new_tokens, *args, **kwargs):
        uncached = sum(1 for b in pool.free_block_queue.get_all_free_blocks()
                       if b.block_hash is None)
        if -(-num_new_tokens // BS) > uncached:
            return None
        return allocate(request, num_new_tokens, *args, **kwargs)
    adapter.manager.allocate_slots = refuse_when_it_would_evict
    caught(adapter, lambda ls: served(ls, A, B, C), "admission")
    served(Lockstep([lane("vllm-apc")]), A, B, C)


def test_contract_options_that_need_a_free_queue_are_refused_elsewhere():
    with pytest.raises(UsageError, match="eviction='lazy'"):
        lane("sglang-radix", 16, duplicates="kept")
    with pytest.raises(UsageError, match="hit_cap"):
        lane("vllm-apc", hit_cap=2)


LEGAL = ["reference", "sglang-radix", "vllm-apc"]


def test_every_option_value_is_used_by_a_real_cache_tested_below():
    adapters = [resolve(impl).build(BS, 8) for impl in LEGAL]
    adapters.append(BCRApiAdapter("bcr-api", ReferenceCache, BS, 8, eviction="explicit"))
    used = {(name, getattr(a.contract, name)) for a in adapters for name in OPTIONS}
    missing = [(name, value) for name, values in OPTIONS.items() for value in values
               if (name, value) not in used]
    assert not missing, f"option values no real cache uses legally here: {missing}"


@pytest.mark.parametrize("block_size", [1, 4])
def test_caches_that_legally_differ_pass_in_one_run(block_size, tmp_path):
    """Reference, SGLang and vLLM in one lockstep: each judged by its own contract, and
    compared with each other where their contracts agree."""
    result = run(RunConfig(implementations=LEGAL, block_size=block_size, max_steps=600,
                           seed=1, trace_dir=str(tmp_path)))
    assert result.failure is None, result.failure
    assert not result.not_run
    assert result.totals["cross_lane_checks"] > 0
    vllm = result.totals["implementations"]["vllm-apc"]
    assert vllm["hits"] and vllm["evictions"]
    assert vllm["duplicates_kept"] > 0
