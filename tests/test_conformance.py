"""The conformance suite (bcr_verify.testing) passes on the reference model and has teeth:
each contract check fails on a cache with the bug it exists to catch."""

import threading

import pytest

from bcr_verify.models.reference import ReferenceCache
from bcr_verify.testing import PrefixCacheConformance, ReentrantMutationError, SingleWriter, \
    run_lockstep


def make_reference(block_size):
    return ReferenceCache(block_size)


class TestReferenceConformance(PrefixCacheConformance):
    """The suite as a downstream project runs it, on our own reference model."""

    make_cache = staticmethod(make_reference)
    block_sizes = (4, 16)


class TestSGLangRadixConformance(PrefixCacheConformance):
    """The whole suite on a CacheAdapter (SGLang's real RadixCache and allocator)."""

    implementation = "sglang-radix"
    hash_blocks = 20_000


class TestVLLMConformance(PrefixCacheConformance):
    """The whole suite on vLLM's KVCacheManager, a cache with a contract unlike SGLang's."""

    implementation = "vllm-apc"
    hash_blocks = 20_000


# ---------------------------------------------------------------- caches with planted bugs

class Leaky(ReferenceCache):
    """BCR v1's leak: evicted blocks stay in a side index forever."""

    def __init__(self, block_size=16):
        super().__init__(block_size)
        self.history = []

    def evict(self, block_value):
        removed = super().evict(block_value)
        self.history.extend(removed)
        return removed


class Colliding(ReferenceCache):
    """Blocks keyed by content only (no parent): equal blocks under different prefixes merge."""

    def match_prefix(self, token_ids):
        length, values = super().match_prefix(token_ids)
        if length >= 2 * self.block_size:  # answer the 2nd block from a content-only table
            table = getattr(self, "_content", {})
            key = tuple(token_ids[self.block_size:2 * self.block_size])
            values = [values[0], table.get(key, values[1]), *values[2:]]
        return length, values

    def insert(self, token_ids, block_values):
        self.__dict__.setdefault("_content", {})
        if len(block_values) >= 2:
            self._content.setdefault(tuple(token_ids[self.block_size:2 * self.block_size]),
                                     block_values[1])
        return super().insert(token_ids, block_values)


class LinearScan(ReferenceCache):
    """Matches by scanning every sibling: cost grows with fan-out."""

    def match_prefix(self, token_ids):
        for _ in range(3):
            for block in list(self._by_value.values()):
                _ = block.tokens == ()
        return super().match_prefix(token_ids)


class Reentrant(ReferenceCache):
    """Calls a listener during insert and lets it mutate the cache: no single-writer guard."""

    listener = None

    def insert(self, token_ids, block_values):
        result = super().insert(token_ids, block_values)
        if self.listener:
            self.listener()
        return result


def _case(cache_cls, **attrs):
    def factory(block_size):
        return cache_cls(block_size)
    return type(f"Test{cache_cls.__name__}", (PrefixCacheConformance,),
                {"make_cache": staticmethod(factory), **attrs})()


def test_churn_check_catches_a_leak():
    with pytest.raises(AssertionError, match="leaking"):
        _case(Leaky).test_bounded_state_under_churn()


def test_collision_check_catches_content_only_keys():
    with pytest.raises(AssertionError, match="collides"):
        _case(Colliding, hash_blocks=2_000).test_block_hash_collisions()


def test_collision_check_catches_colliding_hashes():
    weak = staticmethod(lambda tokens, bs: [hash(tuple(tokens[i:i + bs])) & 0xFFFF
                                            for i in range(0, len(tokens) // bs * bs, bs)])
    with pytest.raises(AssertionError, match="collisions"):
        _case(ReferenceCache, block_hashes=weak, hash_blocks=20_000).test_block_hash_collisions()


def test_fanout_check_catches_a_linear_scan():
    with pytest.raises(AssertionError, match="grows with fan-out"):
        _case(LinearScan).test_match_cost_fanout(lambda *a: None)


def test_reentrancy_check_catches_an_unguarded_cache():
    def hook(cache, callback):
        cache.listener = callback
    with pytest.raises(AssertionError, match="was accepted"):
        _case(Reentrant, install_mutation_callback=staticmethod(hook)
              ).test_reentrant_mutation_refused()


def test_single_writer_refuses_reentry_instead_of_deadlocking():
    cache = SingleWriter(Reentrant(2))
    seen = []

    def listener():
        try:
            cache.insert([5, 5], ["x"])
        except ReentrantMutationError as exc:
            seen.append(exc)
    cache._cache.listener = listener
    done = threading.Event()
    t = threading.Thread(target=lambda: (cache.insert([1, 1], ["a"]), done.set()))
    t.start()
    t.join(5)
    assert done.is_set(), "reentrant call deadlocked"
    assert seen and cache.match_prefix([5, 5]) == (0, [])


@pytest.fixture
def dev_profile():
    from hypothesis import settings
    before = settings.get_current_profile_name()
    settings.load_profile("dev")
    yield
    settings.load_profile(before)


def test_lockstep_failure_trace_is_saved_before_the_error_propagates(tmp_path, dev_profile):
    with pytest.raises(AssertionError):
        run_lockstep(["reference", "broken_caches:off_by_one_match"], 4, corpus=tmp_path,
                     seed=1, label="t")
    traces = list(tmp_path.glob("*.json"))
    assert len(traces) == 1
    from bcr_verify.trace import Trace, replay
    trace = Trace.load(traces[0])
    assert trace.failure["check"] == "match" and trace.meta["seed"] == 1
    assert replay(trace)[0] is not None
    assert replay(trace, implementations=[
        "reference", "bcr_verify.models.reference:ReferenceCache"])[0] is None


def test_adapter_path_catches_a_content_only_hash():
    """Through a CacheAdapter the collision check is the model's: vLLM hashing blocks by their
    own tokens matches someone else's blocks."""
    from bcr_verify.errors import Divergence
    case = type("TestContentHash", (PrefixCacheConformance,),
                {"implementation": "bcr_verify.mutants.vllm:content_hash", "hash_blocks": 200})()
    with pytest.raises(Divergence, match="match"):
        case.test_block_hash_collisions()


class LeakyReset(ReferenceCache):
    """Keeps every block it ever held in a side list, even across its own reset()."""

    def __init__(self, block_size=16):
        super().__init__(block_size)
        self.history = []

    def reset(self):
        self.history.extend(self._by_value.values())
        super().reset()


def make_leaky_adapter(spec):
    from bcr_verify.adapters import BCRApiAdapter
    return BCRApiAdapter("leaky-reset", LeakyReset, spec.block_size, spec.capacity_pages,
                         eviction="lru")


def test_adapter_path_catches_a_leak_across_the_caches_own_reset():
    case = type("TestLeakyReset", (PrefixCacheConformance,),
                {"make_cache": staticmethod(make_leaky_adapter)})()
    with pytest.raises(AssertionError, match="leaking"):
        case.test_bounded_state_under_churn()
