"""``bcr-verify soak --workers N``: N supervised soaks with seeds SEED+i, one merged report.

Driven through the real command line, as a user would; each worker imports its caches in
its own process, so these use the reference model (and a faulty copy of it) to stay short.
"""

import json
import re
import signal
import time
import types

import pytest

from bcr_verify import campaign
from test_faults import F, cli, start


def test_two_workers_merge_into_one_report(tmp_path):
    out = cli("soak", "--workers", "2", "--impl", "reference", "--ops", "601", "--seed", "5",
              "--quiet", "--trace-dir", str(tmp_path / "traces"), "--json",
              str(tmp_path / "soak.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soak.json"]  # no worker files left
    report = json.loads((tmp_path / "soak.json").read_text())
    workers = report["workers"]
    assert [w["seed"] for w in workers] == [5, 6]
    assert [w["lockstep_operations"] for w in workers] == [301, 300]  # --ops is the total
    assert report["lockstep_operations"] == 601 == sum(w["lockstep_operations"] for w in workers)
    assert report["invariant_checks"] == sum(w["invariant_checks"] for w in workers)
    assert report["ops_per_second"] == pytest.approx(sum(w["ops_per_second"] for w in workers),
                                                     abs=0.2)
    assert "--seed 6" in workers[1]["command"] and "--ops 300" in workers[1]["command"]
    assert report["implementations_detail"]["reference"]["lookups"] > 0
    assert report["verdict"] == "inconclusive"  # 300 ops each: too few samples for growth
    assert out.stdout.rstrip().splitlines()[-1].startswith("INCONCLUSIVE")


def test_a_failing_worker_is_named_and_its_trace_replays(tmp_path):
    out = cli("soak", "--workers", "2", "--impl", "reference", "--impl",
              F + "loses_a_block_unless_even_seed", "--block-size", "4", "--ops", "4000",
              "--quiet", "--trace-dir", str(tmp_path / "traces"), "--json",
              str(tmp_path / "soak.json"))
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["verdict"] == "fail"
    assert [w["verdict"] for w in report["workers"]][0] != "fail"  # seed 0 is healthy
    [failure] = report["failures"]
    assert failure["worker"] == 1 and failure["seed"] == 1
    assert failure["failure"]["kind"] == "divergence"
    assert "FAIL in worker 1 (seed 1): divergence" in out.stdout
    assert "the worker alone: bcr-verify soak --seed 1 " in out.stdout
    assert f"reproduce with: bcr-verify replay {failure['trace']}" in out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("FAIL: 1 of 2 workers")
    again = cli("replay", failure["trace"])
    assert again.returncode == 1, again.stdout + again.stderr
    assert "FAILS: divergence" in again.stdout and "(as recorded)" in again.stdout


@pytest.mark.parametrize("args, words", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--workers", "two"], "--workers must be an integer"),
    (["--workers", "3", "--ops", "2"], "--ops 2 is the campaign's total, split over --workers 3"),
])
def test_bad_worker_counts_are_usage_errors(args, words):
    out = cli("soak", "--impl", "reference", *args)
    assert out.returncode == 2 and words in out.stderr, out.stdout + out.stderr


def test_sigterm_reaches_every_worker_and_the_merged_report_is_written(tmp_path):
    proc = start(tmp_path, "soak", "--workers", "2", "--impl", "reference", "--minutes", "10",
                 "--json", str(tmp_path / "s.json"), "--trace-dir", str(tmp_path / "traces"))
    counting = re.compile(r"w0 [\d,]+, w1 [\d,]+")  # both workers past start-up
    deadline = time.monotonic() + 180
    while not counting.search((tmp_path / "err.txt").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "err.txt").read_text()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 130
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["verdict"] == "interrupted"
    assert [w["verdict"] for w in report["workers"]] == ["interrupted", "interrupted"]
    assert all(w["lockstep_operations"] > 0 for w in report["workers"])  # each wrote its own
    assert "INTERRUPTED" in (tmp_path / "out.txt").read_text()


ARGS = types.SimpleNamespace(seed=0, minutes=1.0, ops=None, impls=["reference"], block_size=16,
                             workload="mixed", shape="mixed", known=None)
"""The campaign's own arguments, for merging reports made up here."""


def _worker(index, code, killed=None):
    return campaign.Worker(index, index, ["--seed", str(index)], None,
                           proc=types.SimpleNamespace(returncode=code), killed=killed)


def test_a_worker_without_a_report_is_never_a_pass():
    passed = {"verdict": "pass", "lockstep_operations": 10, "implementation_operations": 10,
              "ops_per_second": 5.0, "seconds": 2.0, "invariant_checks": 1}
    workers = [_worker(0, 0), _worker(1, 3)]
    report = campaign.merge(workers, [passed, None], False, 3.0, ARGS)
    assert report["verdict"] == "error" and campaign.exit_code(report) == 3
    assert "without a report (exit status 3)" in report["workers"][1]["note"]
    assert report["lockstep_operations"] == 10
    killed = campaign.merge([_worker(0, 0), _worker(1, -9, killed="killed")], [passed, None],
                            True, 3.0, ARGS)
    assert killed["verdict"] == "interrupted" and campaign.exit_code(killed) == 130
    failed = dict(passed, verdict="fail", failure={"kind": "divergence", "impl": "x",
                                                   "check": "sizes", "detail": "d"})
    worst = campaign.merge(workers, [failed, None], True, 3.0, ARGS)
    assert worst["verdict"] == "fail" and campaign.exit_code(worst) == 1
    assert worst["failures"][0]["worker"] == 0


def test_a_failure_first_seen_as_another_check_says_so():
    """A soak checks invariants every --check-every steps, its shrunk trace after every step,
    so the two can name different checks; --known takes the one the soak saw."""
    failed = {"verdict": "fail", "lockstep_operations": 10, "implementation_operations": 10,
              "ops_per_second": 5.0, "seconds": 2.0, "invariant_checks": 1,
              "failure": {"kind": "divergence", "impl": "x", "check": "match", "detail": "d"},
              "found_as": {"kind": "invariant violation", "impl": "x", "check": "sizes",
                           "detail": "e"}}
    report = campaign.merge([_worker(0, 1)], [failed], False, 3.0, ARGS)
    assert report["failures"][0]["found_as"]["check"] == "sizes"
    assert "(the worker saw it first as invariant violation in x [sizes], the name --known takes)" \
        in campaign.summary(report)
    same = campaign.merge([_worker(0, 1)], [dict(failed, found_as=failed["failure"])], False,
                          3.0, ARGS)
    assert "saw it first" not in campaign.summary(same)


def test_known_checks_are_summed_over_workers_and_one_none_saw_is_said():
    def passed(known):
        return {"verdict": "pass", "lockstep_operations": 10, "implementation_operations": 10,
                "ops_per_second": 5.0, "seconds": 2.0, "invariant_checks": 1, "known": known}
    hits = {"sizes": {"count": 2, "steps": 9, "trace": "a.json"}}
    args = types.SimpleNamespace(**dict(vars(ARGS), known=["sizes", "no such check"]))
    report = campaign.merge([_worker(0, 0), _worker(1, 0)],
                            [passed(hits), passed({"sizes": dict(hits["sizes"], steps=4,
                                                                 trace="b.json")})],
                            False, 3.0, args)
    assert report["known"]["sizes"] == {"count": 4, "steps": 4, "trace": "b.json"}
    assert report["known_not_seen"] == ["no such check"]
    assert "KNOWN, NOT SEEN: 'no such check'" in campaign.summary(report)


def test_a_vacuous_pass_is_said_where_every_worker_said_it_and_events_are_summed():
    """Counts are summed, so "zero hits" holds for the campaign exactly where it held in every
    worker; the merged report used to drop both the warnings and the events counts."""
    def passed(warnings, stored):
        return {"verdict": "pass", "lockstep_operations": 10, "implementation_operations": 10,
                "ops_per_second": 5.0, "seconds": 2.0, "invariant_checks": 1,
                "vacuous_warnings": warnings,
                "events": {"lanes": {"sglang-radix": {"blocks_stored": stored,
                                                      "dynamo_seconds": 0.5}},
                           "no_event_stream": ["reference"], "dynamo": True}}
    zero_hits = "sglang-radix: zero cache hits, so matching was never exercised"
    zero_evictions = "reference: zero evictions, so eviction was never exercised"
    report = campaign.merge([_worker(0, 0), _worker(1, 0)],
                            [passed([zero_hits, zero_evictions], 3), passed([zero_hits], 4)],
                            False, 3.0, ARGS)
    assert report["vacuous_warnings"] == [zero_hits]
    assert report["events"]["lanes"]["sglang-radix"] == {"blocks_stored": 7, "dynamo_seconds": 1.0}
    text = campaign.summary(report)
    assert f"WARNING (pass may be vacuous, in every worker): {zero_hits}" in text
    assert zero_evictions not in text
    assert "events sglang-radix: 7 blocks stored" in text
    assert "events: no stream from reference" in text


def test_every_soak_option_reaches_the_workers_or_the_campaign():
    from bcr_verify.cli import build_parser

    parser = build_parser()
    soak = parser._subparsers._group_actions[0].choices["soak"]
    dests = {a.dest for a in soak._actions} - {"help"}
    assert dests == set(campaign.FORWARDED) | campaign.CAMPAIGN_ONLY
