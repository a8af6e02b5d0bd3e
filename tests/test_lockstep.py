"""The engine and the adapters: correct caches agree, the BCR code path works, verdicts are honest."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from bcr_verify.adapters import BCRApiAdapter, BUILTIN, resolve
from bcr_verify.errors import AdapterUnavailable, Divergence
from bcr_verify.lockstep import Lockstep
from bcr_verify.machine import LockstepMachine
from bcr_verify.models import ReferenceCache
from bcr_verify.runner import RunConfig, run, select_implementations
from bcr_verify.session import TOTALS, vacuity_warnings

SGLANG = ["sglang-radix", "sglang-unified-py", "sglang-unified-rust"]


def bcr_api_on_reference(block_size, capacity_pages=64):
    """BCR-memory-2's API code path, explicit eviction, with the reference model behind it."""
    return BCRApiAdapter("bcr-api-on-reference", ReferenceCache, block_size, capacity_pages,
                         eviction="explicit")


def bcr_api_sized_for_mixed(block_size):
    from bcr_verify.session import prompt_source
    return bcr_api_on_reference(block_size, prompt_source("mixed", block_size).capacity_pages)


class ReferenceWithoutInsertResult(ReferenceCache):
    """BCR's insert returns nothing: the adapter must read back what was kept."""

    def insert(self, token_ids, block_values):
        super().insert(token_ids, block_values)


def quick(**overrides):
    return settings(max_examples=15, stateful_step_count=40, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), **overrides)


@pytest.mark.parametrize("block_size", [1, 16])
def test_all_sglang_caches_agree_with_the_model_on_real_prompts(block_size):
    machine = LockstepMachine.configure(implementations=["reference", *SGLANG],
                                        block_size=block_size)
    run_state_machine_as_test(machine, settings=quick())


@pytest.mark.parametrize("block_size", [1, 4])
def test_bcr_api_code_path_drives_the_reference(block_size):
    adapters = [resolve("reference").build(block_size, 64), bcr_api_on_reference(block_size),
                BCRApiAdapter("bcr-api-no-insert-result",
                              ReferenceWithoutInsertResult, block_size, 64)]
    lockstep = Lockstep(adapters)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 0, 0, 0, 0]
    for tokens in (a, b, a):
        lockstep.finish(lockstep.begin(tokens))
    c = [5, 5, 5, 5, 6, 6, 6, 6]
    r1, r2 = lockstep.begin(c), lockstep.begin(c)  # both in flight: the second's pages duplicate
    lockstep.finish(r1)
    lockstep.finish(r2)
    lockstep.evict_value(0)
    lockstep.evict(8)
    lockstep.match(a)
    report = lockstep.report()["implementations"]
    for name in ("bcr-api-on-reference", "bcr-api-no-insert-result"):
        assert report[name]["hits"] >= 2
        assert report[name]["duplicates_freed"] >= 1
        assert report[name]["evictions"] >= 1


def test_machine_evicts_explicit_caches_by_value():
    machine = LockstepMachine.configure(
        implementations=["reference", "test_lockstep:bcr_api_sized_for_mixed"], block_size=16)
    TOTALS.reset()
    run_state_machine_as_test(machine, settings=quick())
    stats = TOTALS.as_dict()["implementations"]["bcr-api-on-reference"]
    assert stats["ops"].get("evict_value", 0) > 0 and stats["hits"] > 0, stats


def test_bcr_is_reported_unavailable_with_the_reason():
    why = BUILTIN["bcr"].availability()
    assert why is not None and "bcr_cache is not importable" in why and "registry" in why
    with pytest.raises(AdapterUnavailable):
        BUILTIN["bcr"].build(16, 8)


def test_default_selection_reports_what_it_skipped_and_named_ones_must_exist():
    chosen, not_run = select_implementations(None, 16)
    assert chosen == ["reference", *SGLANG, "vllm-apc"]
    assert set(not_run) == {"bcr"}
    with pytest.raises(ValueError, match="impl 'bcr' is unavailable"):
        select_implementations(["bcr"], 16)
    with pytest.raises(ValueError, match="impl 'nope' is unknown"):
        resolve("nope")


def test_lanes_must_share_a_block_size():
    with pytest.raises(ValueError, match="block size"):
        Lockstep([resolve("reference").build(1, 8), bcr_api_on_reference(2)])


def test_a_request_that_does_not_fit_is_rejected_in_every_lane():
    lockstep = Lockstep([resolve("reference").build(1, 4), resolve("sglang-radix").build(1, 4)])
    assert lockstep.begin([1, 2, 3, 4, 5]) is None
    assert lockstep.rejected == 1 and not lockstep.requests
    lockstep.check()


def test_renewed_lanes_start_on_fresh_caches_and_keep_their_counts():
    """What a soak does after a known failure: a request still running, or half-ended, is
    gone with the old caches; hits and call times go on."""
    def build():
        return [resolve("reference").build(4, 16), resolve("sglang-radix").build(4, 16)]
    lockstep = Lockstep(build())
    lockstep.finish(lockstep.begin(list(range(8))))
    lockstep.match(list(range(8)))
    lockstep.begin(list(range(12)))
    times = lockstep.lanes[1].adapter.call_times
    calls = sum(times.calls)
    lockstep.renew(build())
    assert not lockstep.requests and not lockstep.steps and lockstep.executed == 4
    assert all(not lane.held and not len(lane.shadow) for lane in lockstep.lanes)
    assert lockstep.lanes[1].adapter.call_times is times
    lockstep.check()
    lockstep.match(list(range(8)))  # nothing cached any more
    assert lockstep.lanes[0].stats.hits == 2 and lockstep.lanes[0].stats.lookups == 4
    assert sum(times.calls) > calls
    with pytest.raises(ValueError, match="renew needs"):
        lockstep.renew(build()[::-1])


def test_request_ids_start_again_with_the_record_as_a_replay_hands_them_out():
    """A soak saves the steps since its last flush or renewal as a trace (a known failure's
    witness, a crash, a window that did not shrink); a replay numbers requests from 0, so
    the record does too, or the trace's first ``finish`` names a request it never began."""
    lockstep = Lockstep([resolve("reference").build(4, 16)])
    lockstep.finish(lockstep.begin(list(range(8))))
    lockstep.reset()
    lockstep.forget_steps()
    assert lockstep.begin(list(range(8))) == 0
    lockstep.forget_steps()  # a request still running keeps its id, and the next one its own
    assert lockstep.begin(list(range(4))) == 1


def test_a_prompt_equal_to_a_remembered_one_is_still_judged_by_its_own_tokens():
    """The cut memo finds prompts by equality, and [True] == [1]: a bool prompt is refused
    by name even right after the equal int prompt ran; an int subclass is cut alike."""
    class Token(int):
        pass

    lockstep = Lockstep([resolve("reference").build(4, 16), resolve("sglang-radix").build(4, 16)])
    rid = lockstep.begin([1, 0, 1, 1])
    lockstep.finish(rid)
    with pytest.raises(TypeError, match=r"token_ids\[0\] must be an int, got bool"):
        lockstep.begin([True, False, True, True])
    assert not lockstep.requests and len(lockstep.steps) == 2
    lockstep.match([Token(1), 0, 1, Token(1)])
    assert lockstep.lanes[0].stats.hit_tokens == 4
    lockstep.check()


def test_run_reports_hits_evictions_and_flags_vacuous_passes():
    result = run(RunConfig(implementations=["reference", "sglang-radix"], block_size=16,
                           max_steps=300, trace_dir="unused"))
    assert result.ok
    stats = result.as_dict()["implementations"]["sglang-radix"]
    assert stats["hits"] > 0 and stats["evictions"] > 0
    assert result.warnings == []
    warnings = vacuity_warnings(
        {"steps": 9, "implementations": {"x": {"hits": 0, "evictions": 3}}}, {"bcr": "no wheel"})
    assert warnings == ["bcr was not run: no wheel",
                        "x: zero cache hits, so matching was never exercised"]


def test_divergence_stops_the_run_with_a_saved_shrunk_trace(tmp_path):
    result = run(RunConfig(implementations=["reference", "broken_caches:off_by_one_match"],
                           block_size=1, max_steps=2000, trace_dir=str(tmp_path)))
    assert not result.ok
    assert result.failure.failure["check"] == "match"
    assert len(result.failure.steps) <= 10
    from bcr_verify.trace import Trace, replay
    saved = Trace.load(result.trace_path)
    failure, _ = replay(saved)
    assert isinstance(failure, Divergence) and failure.check == "match"
    failure, _ = replay(saved, implementations=["reference", "sglang-radix"])
    assert failure is None
