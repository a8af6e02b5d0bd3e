"""KV replay: correct prefix reuse never alarms; each seeded wrong-slot corruption is caught."""

from __future__ import annotations

import random

import pytest
import torch

from bcr_verify.adapters import BCRApiAdapter, Match, resolve
from bcr_verify.errors import Divergence
from bcr_verify.kv_replay import (
    DEFAULT_KV_TOLERANCE, DEFAULT_TOLERANCE, VOCAB_SIZE, KVReplay, PagedKVPool, ReplayModel,
    check_prefix, page_slots,
)
from bcr_verify.lockstep import Lockstep, Observer
from bcr_verify.models.reference import ReferenceCache

TOL = DEFAULT_TOLERANCE[torch.float32]
KV_TOL = DEFAULT_KV_TOLERANCE[torch.float32]


@pytest.fixture(scope="module")
def rm() -> ReplayModel:
    torch.set_num_threads(1)
    return ReplayModel(seed=0)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_SIZE) for _ in range(n)]


def _insert(rm, pool, tokens, pages, bs, start_page=0):
    """What an engine does on a miss: compute ``tokens`` and write its full blocks' K/V."""
    full = len(tokens) // bs * bs
    ref = rm.full(tokens)
    lo = start_page * bs
    pool.write(page_slots(pages[start_page:], bs)[: full - lo], ref.keys[:, lo:full],
               ref.values[:, lo:full])


def test_model_is_a_tiny_qwen2_with_the_real_vocabulary(rm):
    c = rm.config
    assert (c.model_type, c.vocab_size, c.num_hidden_layers, c.hidden_size) == ("qwen2", 151_936, 2, 64)
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)
    again = ReplayModel(seed=0)
    t = [1, 2, 3, 151_935]
    assert torch.equal(rm.full(t).hidden, again.full(t).hidden)  # seeded: same weights every time


@pytest.mark.parametrize("bs", [1, 16])
def test_correct_reuse_never_alarms(rm, bs):
    rng = random.Random(bs)
    worst = (0.0, 0.0)
    for _ in range(6):
        pool = PagedKVPool.for_model(rm, 8)  # tiny on purpose: it must grow on demand
        cut = rng.randrange(1, 12)  # cached blocks
        writer = _prompt(rng, cut * bs) + _prompt(rng, rng.randrange(0, 3 * bs + 1))
        pages = rng.sample(range(1, 200), len(writer) // bs)
        _insert(rm, pool, writer, pages, bs)
        for reader in (writer[: cut * bs] + _prompt(rng, rng.randrange(1, 40)),  # a new suffix
                       writer[: cut * bs]):  # the whole prompt cached: its last token reruns
            result = check_prefix(rm, pool, reader, page_slots(pages[:cut], bs))
            assert result.ok, result
            worst = max(worst[0], result.max_diff), max(worst[1], result.kv_max_diff)
    assert worst[0] < TOL / 10 and worst[1] < KV_TOL / 10, worst  # a wide margin, not a near miss


@pytest.fixture()
def scene(rm):
    """Prompt A (8 blocks of 4) cached at pages 10..17; B, another prompt, at pages 20..27."""
    rng = random.Random(7)
    bs = 4
    a, b = _prompt(rng, 32), _prompt(rng, 32)
    pool = PagedKVPool.for_model(rm, 64)
    pages_a, pages_b = list(range(10, 18)), list(range(20, 28))
    _insert(rm, pool, a, pages_a, bs)
    _insert(rm, pool, b, pages_b, bs)
    reader = a[:24] + _prompt(rng, 10)  # hits A's first 6 blocks
    return rm, pool, bs, a, b, pages_a, pages_b, reader


def test_scene_is_clean(scene):
    rm, pool, bs, a, b, pages_a, pages_b, reader = scene
    result = check_prefix(rm, pool, reader, page_slots(pages_a[:6], bs))
    assert result.ok and result.max_diff < TOL and result.kv_max_diff < KV_TOL


def test_one_stale_slot_is_caught(scene):
    rm, pool, bs, a, b, pages_a, pages_b, reader = scene
    slots = page_slots(pages_a[:6], bs)
    # One slot's K/V was overwritten by another prompt (B's token at position 9).
    pool.write([slots[9]], rm.full(b).keys[:, 9:10], rm.full(b).values[:, 9:10])
    result = check_prefix(rm, pool, reader, slots)
    assert result.first_bad_position == 9 and result.kv_bad_positions == 1
    assert result.kv_max_diff > 1000 * KV_TOL and result.max_diff > TOL


def test_slots_off_by_one_are_caught(scene):
    rm, pool, bs, a, b, pages_a, pages_b, reader = scene
    slots = [s + 1 for s in page_slots(pages_a[:6], bs)]
    result = check_prefix(rm, pool, reader, slots)
    assert result.first_bad_position == 0 and result.kv_bad_positions == 24
    assert result.max_diff > 100 * TOL and result.kv_max_diff > 1000 * KV_TOL


def test_page_reused_after_eviction_is_caught(rm, scene):
    rm, pool, bs, a, b, pages_a, pages_b, reader = scene
    # A's page 12 (block 2) is evicted and freed; prompt C is allocated that page and writes
    # its own K/V there; a buggy cache still returns page 12 for A's prefix.
    c = _prompt(random.Random(99), 8)
    _insert(rm, pool, c, [30, 12], bs)
    result = check_prefix(rm, pool, reader, page_slots(pages_a[:6], bs))
    assert result.first_bad_position == 2 * bs and result.kv_bad_positions == bs
    assert result.max_diff > TOL and result.kv_max_diff > 1000 * KV_TOL


def test_permuted_prefix_slots_are_caught_only_by_the_kv_check(scene):
    rm, pool, bs, a, b, pages_a, pages_b, reader = scene
    slots = page_slots(pages_a[:6], bs)
    permuted = list(reversed(slots))
    result = check_prefix(rm, pool, reader, permuted)
    # Attention treats cached entries as a set and keys carry their rotary position, so the
    # hidden states cannot tell; the per-position comparison can.
    assert result.max_diff < TOL, "a permutation should be invisible in hidden states"
    assert result.first_bad_position == 0 and result.kv_max_diff > 1000 * KV_TOL


def test_check_prefix_rejects_impossible_slot_counts(scene):
    rm, pool, bs, a, b, pages_a, pages_b, reader = scene
    with pytest.raises(ValueError):
        check_prefix(rm, pool, reader[:4], page_slots(pages_a[:2], bs))


# ----------------------------------------------------------------- the lockstep observer


def _lockstep(bs, replay, capacity=32, adapters=None):
    return Lockstep(adapters or [resolve("reference").build(bs, capacity)], observers=[replay])


def test_observer_replays_every_hit_without_false_alarms(rm):
    bs = 4
    replay = KVReplay(bs, model=rm)
    ls = _lockstep(bs, replay, capacity=24)
    rng = random.Random(3)
    base = _prompt(rng, 16)
    for i in range(12):
        tokens = base[: 4 * (i % 4 + 1)] + _prompt(rng, 5 + i % 7)
        rid = ls.begin(tokens)
        if rid is not None:
            (ls.finish if i % 3 else ls.abort)(rid)
        if i == 6:
            ls.evict(12)
    report = ls.report()["kv_replay"]
    assert report["replayed"] >= 8 and report["failures"] == 0 and report["skipped"] == 0
    assert report["max_diff_correct"] < TOL and report["max_kv_diff_correct"] < KV_TOL


def test_observer_samples_a_share(rm):
    replay = KVReplay(1, sample=0.0, model=rm)
    ls = _lockstep(1, replay)
    ls.finish(ls.begin([5, 6, 7, 8]))
    ls.finish(ls.begin([5, 6, 7, 9]))
    report = replay.report()["kv_replay"]
    assert (report["hits"], report["replayed"], report["skipped"]) == (1, 0, 1)


class _SwapFirstPage(Observer):
    """Hands the replay a match whose first page is another cached page, as a broken cache
    would, while the lockstep's own shadow comparison saw the correct pages."""

    def __init__(self, inner: KVReplay, other: int):
        self.inner, self.other = inner, other

    def on_begin(self, lane, tokens, matched, new):
        if matched:
            matched = [self.other] + matched[1:]
        self.inner.on_begin(lane, tokens, matched, new)

    def report(self):
        return self.inner.report()


def test_observer_reports_a_wrong_slot_as_a_divergence(rm):
    bs = 4
    replay = KVReplay(bs, model=rm)
    ls = Lockstep([resolve("reference").build(bs, 16)], observers=[_SwapFirstPage(replay, 3)])
    first = list(range(100, 116))  # 4 blocks: pages 1..4
    ls.finish(ls.begin(first))
    with pytest.raises(Divergence) as info:
        ls.begin(first[:8] + [7, 7, 7])
    failure = info.value
    assert (failure.impl, failure.check, failure.step) == ("reference", "kv replay", 2)
    assert "position 0 (page 3" in failure.detail and "differs" in failure.detail
    assert replay.report()["kv_replay"]["failures"] == 1


class _BrokenMatch(BCRApiAdapter):
    """A cache whose match returns its first page replaced by another cached page."""

    def match(self, tokens):
        got = super().match(tokens)
        if got.pages:
            others = [p for p in self.cache.values() if p not in got.pages]
            if others:
                got = Match(got.length, [others[0]] + got.pages[1:], got.handle)
        return got


def test_broken_cache_is_caught_by_the_replay_stage_alone(rm):
    bs = 4
    broken = _BrokenMatch("broken", ReferenceCache, bs, 16, eviction="lru")
    replay = KVReplay(bs, model=rm)
    a = list(range(200, 216))
    pages = broken.alloc(4)
    replay.on_begin("broken", a, [], pages)  # the engine computes A into its fresh pages
    broken.insert(a, pages, owned_from=0)
    reader = a[:8] + [9, 9, 9]
    got = broken.match(reader)
    assert got.length == 8 and got.pages != pages[:2]  # the tree is fine, the pages are not
    with pytest.raises(Divergence) as info:
        replay.on_begin("broken", reader, got.pages, [])
    assert info.value.check == "kv replay"
    # In the lockstep the structural match comparison sees this too (a different check).
    ls = Lockstep([_BrokenMatch("broken", ReferenceCache, bs, 16, eviction="lru")],
                  observers=[KVReplay(bs, model=rm)])
    ls.finish(ls.begin(a))
    with pytest.raises(Divergence):
        ls.begin(reader)
