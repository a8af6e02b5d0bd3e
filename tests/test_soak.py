"""The seeded-RNG soak driver: runs, reports, plots, judges growth, and shrinks what it finds."""

import json

import pytest

from bcr_verify.cli import side_by_side
from bcr_verify.shrink import ddmin
from bcr_verify.soak import SoakConfig, growth_verdict, plot, shrink_text, soak, summary
from bcr_verify.trace import Trace, replay


def test_short_soak_reports_and_plots(tmp_path):
    result = soak(SoakConfig(implementations=["reference", "sglang-radix"], minutes=None,
                             max_ops=6000, check_every=16, sample_seconds=0.01,
                             trace_dir=str(tmp_path)))
    r = result.report
    assert result.ok, r["failure"]
    assert r["lockstep_operations"] >= 6000
    assert r["implementation_operations"] == 2 * r["lockstep_operations"]
    assert r["invariant_checks"] >= 6000 // 16
    assert r["flushes"] > 0 and r["rules"]["serve"] > 0
    assert r["overhead"]["raw_implementation_op_seconds"] > 0
    assert r["overhead"]["ratio_wall_to_raw_ops"] > 1
    assert len(r["samples"]) >= 10 and "rss_mb" in r["samples"][0]
    for name in ("reference", "sglang-radix"):
        assert r["implementations_detail"][name]["evictions"] > 0
        assert r["implementations_detail"][name]["hits"] > 0
    json.dumps(r)
    plot(r, str(tmp_path / "soak.png"))
    assert (tmp_path / "soak.png").stat().st_size > 1000
    assert "PASS" in summary(r)


def test_same_seed_same_run():
    def ops(seed):
        r = soak(SoakConfig(implementations=["reference"], minutes=None, max_ops=800,
                            seed=seed)).report
        return r["rules"], r["implementations_detail"]["reference"]["hit_tokens"]
    assert ops(3) == ops(3)
    assert ops(3) != ops(4)


def _samples(rss, nodes):
    return [{"ops": i * 1000, "rss_mb": r, "heap_blocks": 1000,
             "lanes": {"x": {"nodes": n, "cached_blocks": n}}} for i, (r, n) in
            enumerate(zip(rss, nodes))]


def test_growth_verdict_flat_and_growing():
    flat = growth_verdict(_samples([500 + (i % 3) for i in range(50)], [40 + (i % 7) for i in
                                                                          range(50)]), 64)
    assert flat["verdict"] == "flat"
    leak = growth_verdict(_samples([500 + i for i in range(50)], [40] * 50), 64)
    assert "rss_mb" in leak["verdict"]
    assert leak["series"]["rss_mb"]["slope_per_million_ops"] == pytest.approx(1000, rel=0.01)
    nodes = growth_verdict(_samples([500] * 50, [10 * i for i in range(50)]), 64)
    assert "x.nodes" in nodes["verdict"]


def test_growth_is_not_judged_from_a_few_seconds_of_warm_up():
    """A run that failed after eight seconds had four samples, none dropped as warm-up, and
    printed the pool's first filling as ``GROWING: rss_mb``."""
    rising = growth_verdict(_samples([500 + 20 * i for i in range(9)], [40] * 9), 64)
    assert rising["verdict"] == "too few samples" and rising["samples"] == 9
    warm_then_flat = growth_verdict(_samples([400, 450] + [500] * 8, [40] * 10), 64)
    assert warm_then_flat["verdict"] == "flat"
    assert warm_then_flat["warmup_samples_dropped"] == 2


@pytest.mark.parametrize("info, words", [
    ({"reproduced": None, "skipped": "implementation hung"},
     "kept whole: every replay would end the same way (implementation hung)"),
    ({"reproduced": None, "interrupted": True}, "kept whole: interrupted before shrinking"),
    ({"reproduced": False, "original_steps": 12, "shrunk_steps": 12},
     "kept whole, 12 steps: the window did not fail again on fresh lanes"),
    ({"reproduced": True, "original_steps": 1200, "shrunk_steps": 4, "seconds": 30.0,
      "tests": 2000, "capped": True},
     "shrunk from 1,200 to 4 steps in 30 s, 2,000 replays, stopped early (its time cap)"),
])
def test_the_summary_says_how_the_window_became_the_trace(info, words):
    assert shrink_text(info).startswith(words)


def test_ddmin_finds_minimal_subset():
    items = list(range(40))
    assert ddmin(items, lambda xs: 7 in xs and 31 in xs) == [7, 31]


def test_soak_divergence_is_shrunk_and_saved(tmp_path):
    result = soak(SoakConfig(implementations=["bcr_verify.mutants.radix:size_drift"],
                             minutes=1, check_every=1, trace_dir=str(tmp_path),
                             shrink_seconds=30))
    assert not result.ok
    r = result.report
    check = r["failure"]["check"]
    assert check in ("sizes", "evictable + protected = total")
    assert r["shrink"]["reproduced"]
    assert r["shrink"]["shrunk_steps"] <= r["shrink"]["original_steps"]
    assert r["shrink"]["shrunk_steps"] <= 10
    trace = Trace.load(r["trace"])
    failure, _ = replay(trace)
    assert failure is not None and failure.check == check


def test_a_known_check_is_counted_and_the_soak_goes_on(tmp_path):
    """As ``make verify`` passes vLLM's per-copy BlockRemoved: here a cache that drops a block
    of long inserts fails the 'eviction' check again and again."""
    result = soak(SoakConfig(implementations=["reference", "faulty_caches:loses_a_block"],
                             minutes=None, max_ops=3000, known=("eviction", "no such check"),
                             trace_dir=str(tmp_path)))
    r = result.report
    known = r["known"]["eviction"]
    assert known["count"] >= 2  # found, the caches flushed, and found again
    assert r["found_as"] is None or r["found_as"]["check"] != "eviction"
    assert f"KNOWN: eviction failed {known['count']:,} times" in summary(r)
    assert r["known_not_seen"] == ["no such check"]
    assert "KNOWN, NOT SEEN: 'no such check'" in summary(r)
    witness = Trace.load(known["trace"])
    assert len(witness.steps) == known["steps"] and witness.failure["check"] == "eviction"
    failure, _ = replay(witness)
    assert failure is not None


def test_a_known_failures_witness_replays_as_the_soak_met_it(tmp_path):
    """Seed 3's shortest window began after a renewal: its request ids went on from the
    soak's (the witness's first ``finish`` named request 6, and its replay was refused), and
    replayed checking every step it failed ``sizes`` first."""
    r = soak(SoakConfig(implementations=["reference", "faulty_caches:loses_a_block"], seed=3,
                        minutes=None, max_ops=3000, known=("eviction",),
                        trace_dir=str(tmp_path))).report
    witness = Trace.load(r["known"]["eviction"]["trace"])
    assert witness.check_every == 64
    assert [s["args"]["rid"] for s in witness.steps if s["op"] == "finish"] == [0]
    failure, _ = replay(witness)
    assert failure is not None and failure.check == "eviction"


def test_a_known_failure_part_way_through_a_step_raises_no_false_alarm_after_it(tmp_path):
    """The faulty lane fails its ``finish`` before the lanes after it have ended the request,
    and its events oracle has not judged theirs: a flush carried that over (pool conservation
    failed on the next check, and stale events looked like removals of cached blocks); fresh
    caches do not."""
    result = soak(SoakConfig(implementations=["faulty_caches:miscounts_long_inserts",
                                               "reference", "sglang-radix"],
                             minutes=None, max_ops=1500, block_size=4, events=True,
                             known=("insert",), trace_dir=str(tmp_path)))
    r = result.report
    assert r["failure"] is None and r["found_as"] is None, summary(r)
    assert r["known"]["insert"]["count"] >= 10
    assert r["implementations_detail"]["sglang-radix"]["raw_calls"] > 0
    assert "lanes started again on fresh caches after each" in summary(r)


@pytest.mark.parametrize("cache, seed, cadence", [
    ("after_some_inserts", 2, 1), ("when_full", 2, 64),
    ("after_some_inserts", 8, 64),  # found by the check after the last step
])
def test_shrinking_goes_past_a_known_failure_the_soak_had_not_seen(tmp_path, cache, seed,
                                                                   cadence):
    """Checking after every step, the shrinker meets the known self-check failure before the
    soak's new one (which the soak, checking every 64 steps, met first). It goes past it on
    fresh lanes as the soak does; where the new failure needs what the known one left behind,
    the trace keeps the soak's cadence. Before, the trace saved was the known failure's."""
    result = soak(SoakConfig(
        implementations=["reference", f"faulty_caches:fails_its_self_check_{cache}"],
        minutes=None, max_ops=3000, seed=seed, known=("assert_invariants",),
        trace_dir=str(tmp_path)))
    r = result.report
    assert r["shrink"]["reproduced"] and r["shrink"]["known_met"] >= 1, r["shrink"]
    assert r["failure"]["check"] != "assert_invariants"
    trace = Trace.load(r["trace"])
    assert trace.check_every == cadence and len(trace.steps) <= 4
    assert (f"invariants every {cadence} steps" in trace.render()) == (cadence > 1)
    failure, _ = replay(trace)
    assert failure is not None and failure.check == r["failure"]["check"]
    text, shown = side_by_side(trace)  # what `bcr-verify replay` prints
    assert shown is not None and shown.check == r["failure"]["check"], text
    said = summary(r)
    assert f"to {len(trace.steps)} steps in" in said
    assert ("as the soak checked them" in said) == (cadence > 1)
    assert ("went past a known failure" in said) == (cadence == 1)


def test_deep_shape_grows_one_long_chain_and_fans_out(tmp_path):
    result = soak(SoakConfig(implementations=["reference", "sglang-radix"], minutes=None,
                             max_ops=400, shape="deep", block_size=4, trace_dir=str(tmp_path)))
    r = result.report
    assert result.ok, r["failure"]
    assert r["flushes"] == 0 and "not judged" in r["growth"]["verdict"]
    shape = r["tree_shape"]["sglang-radix"]
    assert shape["depth_nodes"] >= 120 and shape["fanout"] >= 3, shape  # ~2 ops per level
    assert shape["depth_blocks"] == r["tree_shape"]["reference"]["depth_blocks"]


def test_soak_reports_the_events_it_checked_and_a_vacuous_pass(tmp_path):
    from bcr_verify.soak import SoakConfig, soak, summary

    result = soak(SoakConfig(implementations=["reference", "sglang-radix"], block_size=4,
                             minutes=None, max_ops=400, events=True, sample_seconds=0.01,
                             trace_dir=str(tmp_path)))
    events = result.report["events"]
    assert events["lanes"]["sglang-radix"]["blocks_stored"] > 0
    assert events["no_event_stream"] == ["reference"]
    text = summary(result.report)
    assert "events sglang-radix:" in text
    if events["dynamo"]:  # its own time is told apart from the rest of the harness
        assert events["lanes"]["sglang-radix"]["dynamo_asked"] > 0
        assert "sent to Dynamo" in text and "of the harness, inside Dynamo's RadixTree" in text
    tiny = soak(SoakConfig(implementations=["reference"], minutes=None, max_ops=3,
                           sample_seconds=0.001, trace_dir=str(tmp_path)))
    assert any("zero cache hits" in w for w in tiny.report["vacuous_warnings"])  # seed 0
    assert "WARNING (pass may be vacuous)" in summary(tiny.report)


def test_a_failure_first_seen_as_another_check_says_so(tmp_path):
    """The soak checks invariants every 64 steps, the shrunk trace after every step, so the
    two can name different checks; --known takes the soak's."""
    result = soak(SoakConfig(implementations=["reference"], minutes=None, max_ops=3,
                             trace_dir=str(tmp_path)))
    failure = {"kind": "divergence", "impl": "x", "check": "match", "detail": "d"}
    report = dict(result.report, verdict="fail", failure=failure, trace="t.json",
                  shrink={"reproduced": True, "original_steps": 40, "shrunk_steps": 3,
                          "seconds": 1.0, "tests": 20},
                  found_as=dict(failure, kind="invariant violation", check="sizes"))
    assert ("(the soak saw it first as invariant violation in x [sizes], checking invariants "
            "every 64 steps, the name --known takes;") in summary(report)
    assert "saw it first" not in summary(dict(report, found_as=failure))
    assert "saw it first" not in summary(dict(report, found_as=None))
    elsewhere = dict(failure, impl="y")  # the same check, first seen in another lane
    assert "saw it first as divergence in y [match]" in summary(dict(report, found_as=elsewhere))
