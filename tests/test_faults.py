"""Verdicts that never lie: every way an implementation can fail is a finding with a saved
trace that replays the same fault, and every way a run can end has its own exit code.

The faulty caches live in ``faulty_caches.py``; each test drives the real command line, as a
user would, and replays what it saved.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bcr_verify import interrupts

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
F = "faulty_caches:"


def cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "bcr_verify.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=timeout)


def start(tmp_path, *args):
    """A CLI process in its own session (so a signal can go to it as a terminal's would)."""
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bcr_verify.cli", *args], stdout=out,
                            stderr=err, env=ENV, start_new_session=True)
    return proc


def wait_for(tmp_path, text, proc, seconds=180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in (tmp_path / "err.txt").read_text() + (tmp_path / "out.txt").read_text():
            return
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()
        time.sleep(0.2)
    raise AssertionError(f"never printed {text!r}")


def saved_trace(stdout: str) -> str:
    lines = [l for l in stdout.splitlines() if l.startswith("reproduce with: bcr-verify replay ")]
    assert lines, stdout[-3000:]
    return lines[-1].split("replay ", 1)[1]


def run_fault(tmp_path, impl, *extra):
    out = cli("run", "--impl", "reference", "--impl", F + impl, "--block-size", "4",
              "--max-steps", "400", "--quiet", "--trace-dir", str(tmp_path / "traces"),
              "--json", str(tmp_path / "report.json"), *extra)
    report = json.loads((tmp_path / "report.json").read_text())
    return out, report


def assert_replays(trace, *extra, kind, check=None):
    again = cli("replay", trace, *extra)
    assert again.returncode == 1, again.stdout + again.stderr
    assert f"FAILS: {kind}" in again.stdout and "(as recorded)" in again.stdout, again.stdout
    assert check is None or check in again.stdout
    assert "recorded on:" in again.stdout


@pytest.mark.parametrize("impl, check", [("raises_in_insert", "KeyError"),
                                         ("deep_recursion", "RecursionError")])
def test_raise_is_a_finding_with_a_shrunk_trace(tmp_path, impl, check):
    out, report = run_fault(tmp_path, impl)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"FAIL: implementation raised in {F}{impl} [{check}]" in out.stdout
    assert report["verdict"] == "fail" and report["failure"]["kind"] == "implementation raised"
    trace = json.loads(Path(saved_trace(out.stdout)).read_text())
    assert len(trace["steps"]) <= 8  # three inserts: begin+finish each, shrunk
    assert trace["failure"]["check"] == check and trace["versions"][F + impl]
    assert_replays(saved_trace(out.stdout), kind="implementation raised", check=check)


def test_python_hang_is_interrupted_and_reported(tmp_path):
    out, report = run_fault(tmp_path, "hangs_in_match", "--op-timeout", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL: implementation hung" in out.stdout and "did not return within 1 s" in out.stdout
    assert report["failure"]["check"] == "timeout"
    assert_replays(saved_trace(out.stdout), "--op-timeout", "1", kind="implementation hung",
                   check="timeout")


def test_native_hang_is_ended_by_the_supervisor(tmp_path):
    out, report = run_fault(tmp_path, "hangs_in_native_code", "--op-timeout", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "implementation hung" in out.stdout and "native code" in out.stdout
    assert report["verdict"] == "fail" and report["trace"]
    assert_replays(saved_trace(out.stdout), "--op-timeout", "1", kind="implementation hung",
                   check="timeout")


def test_hang_whose_exception_python_drops_is_ended_by_the_supervisor(tmp_path):
    """The watchdog's exception lands in a gc callback and Python drops it: the supervisor
    still sees the call in progress and ends it (in process, nothing could)."""
    out, report = run_fault(tmp_path, "hangs_in_a_gc_callback", "--op-timeout", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert report["failure"]["kind"] == "implementation hung", report["failure"]
    assert report["failure"]["check"] == "timeout"
    assert_replays(saved_trace(out.stdout), "--op-timeout", "1", kind="implementation hung",
                   check="timeout")


@pytest.mark.parametrize("mode", [(), ("--in-process",)], ids=["supervised", "in-process"])
def test_interrupt_that_python_drops_still_stops_the_run(tmp_path, mode):
    """A SIGTERM's KeyboardInterrupt raised inside a gc callback is dropped by Python: the run
    must stop at its next step and report what it ran, not go on to a PASS."""
    out, report = run_fault(tmp_path, "interrupted_in_a_gc_callback", *mode)
    assert "Exception ignored" in out.stderr  # the interrupt really was dropped
    assert out.returncode == 130, out.stdout + out.stderr
    assert report["verdict"] == "interrupted" and 0 < report["steps"] < 400


def test_an_interrupt_is_remembered_until_its_handlers_are_removed():
    previous = signal.getsignal(signal.SIGTERM)
    with interrupts.handling(signal.SIGTERM):
        interrupts.check()  # nothing yet
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            interrupts.check()  # again, at every step
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # a second one is ignored
    interrupts.check()
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("impl, how", [("segfaults", "signal 11 (SIGSEGV)"),
                                       ("exits_the_process", "exit status 3")])
def test_crash_is_survived_and_its_steps_saved(tmp_path, impl, how):
    out, report = run_fault(tmp_path, impl)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"implementation crashed in {F}{impl}" in out.stdout and how in out.stdout
    assert f"inside {F}{impl}.insert()" in out.stdout
    assert report["failure"]["kind"] == "implementation crashed"
    assert report["provenance"]["implementations"][F + impl]
    assert_replays(saved_trace(out.stdout), kind="implementation crashed", check=how)


def test_a_soak_crash_after_a_flush_leaves_a_trace_that_replays(tmp_path):
    """The journal holds the steps since the last flush; their request ids went on from the
    soak's count (the first ``finish`` named request 639), and replay refused the trace."""
    out = cli("soak", "--impl", "reference", "--impl", F + "exits_on_a_long_insert",
              "--ops", "5000", "--quiet", "--trace-dir", str(tmp_path))
    assert out.returncode == 1 and "exit status 3" in out.stdout, out.stdout + out.stderr
    assert_replays(saved_trace(out.stdout), kind="implementation crashed", check="exit status 3")


def test_soak_raise_is_shrunk_and_saved(tmp_path):
    out = cli("soak", "--impl", F + "rejects_empty_prompt", "--ops", "20000", "--quiet",
              "--trace-dir", str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL: implementation raised" in out.stdout and "[ValueError]" in out.stdout
    assert "\nPASS" not in out.stdout
    assert_replays(saved_trace(out.stdout), kind="implementation raised", check="ValueError")


def test_leak_fails_the_soak(tmp_path):
    out = cli("soak", "--impl", F + "leaks", "--minutes", "0.2", "--quiet", "--json",
              str(tmp_path / "soak.json"), "--plot", str(tmp_path / "soak.png"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "GROWING: rss_mb" in out.stdout and "FAIL: growth" in out.stdout
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["verdict"] == "fail" and report["growth"]["series"]["rss_mb"]["growing"]
    assert (tmp_path / "soak.png").stat().st_size > 1000


def test_too_few_samples_is_inconclusive_never_pass(tmp_path):
    out = cli("soak", "--impl", "reference", "--ops", "40", "--quiet", "--json",
              str(tmp_path / "soak.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "INCONCLUSIVE" in out.stdout and "\nPASS" not in out.stdout
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["verdict"] == "inconclusive" and report["lockstep_operations"] == 40


def test_sigint_during_run_writes_the_report(tmp_path):
    proc = start(tmp_path, "run", "--impl", "reference", "--minutes", "10", "--json",
                 str(tmp_path / "r.json"))
    wait_for(tmp_path, "examples", proc)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: parent and child both
    assert proc.wait(120) == 130
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "interrupted" and report["steps"] > 0
    assert "INTERRUPTED" in (tmp_path / "out.txt").read_text()


def test_sigint_during_shrink_keeps_the_best_trace(tmp_path):
    proc = start(tmp_path, "run", "--impl", "reference", "--impl", F + "slow_and_failing",
                 "--block-size", "4", "--trace-dir", str(tmp_path / "traces"), "--json",
                 str(tmp_path / "r.json"))
    wait_for(tmp_path, "shrinking it", proc)
    proc.send_signal(signal.SIGINT)  # to the parent alone: it forwards the interrupt
    assert proc.wait(120) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "fail" and report["interrupted"]
    stdout = (tmp_path / "out.txt").read_text()
    assert "interrupted while shrinking" in stdout
    # the smallest failing example so far: whichever check it fails, its replay fails it too
    assert_replays(saved_trace(stdout), kind="divergence")


def test_shrinking_stops_at_its_cap_and_keeps_the_best_trace(tmp_path):
    out, report = run_fault(tmp_path, "slow_and_failing", "--shrink-seconds", "3")
    assert out.returncode == 1, out.stdout + out.stderr
    assert report["verdict"] == "fail" and report["shrink_capped"] is True
    assert report["shrink_steps"] > 0 and report["shrink_seconds"] >= 3
    assert "stopped at --shrink-seconds" in out.stdout
    assert any("shrinking stopped at its cap of 3 s" in n for n in report["notes"])
    assert_replays(saved_trace(out.stdout), kind="divergence")


def test_sigterm_during_soak_writes_the_report(tmp_path):
    proc = start(tmp_path, "soak", "--impl", "reference", "--minutes", "10", "--json",
                 str(tmp_path / "s.json"))
    wait_for(tmp_path, "ops/s", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 130
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["verdict"] == "interrupted" and report["lockstep_operations"] > 0
    assert "INTERRUPTED" in (tmp_path / "out.txt").read_text()


def test_allocator_handing_out_a_cached_page_is_a_finding(tmp_path):
    out, report = run_fault(tmp_path, "hands_out_cached_pages")
    assert out.returncode == 1, out.stdout + out.stderr
    assert report["failure"]["check"] == "allocator"
    assert "handed out pages [" in report["failure"]["detail"]


@pytest.mark.parametrize("factory, words", [
    ("factory_raises", "the factory raised RuntimeError: cannot connect"),
    ("factory_takes_nothing", "the factory raised TypeError"),
    ("factory_returns_int", "returned a int, which is neither"),
])
def test_a_factory_that_cannot_build_a_cache_is_a_setup_error(factory, words):
    out = cli("run", "--impl", F + factory, "--max-steps", "10")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"impl '{F}{factory}'" in out.stderr and words in out.stderr


def test_internal_error_exits_3_and_says_whose_it_is():
    code = ("import sys, bcr_verify.cli as c\n"
            "def boom(args): raise ZeroDivisionError('ours')\n"
            "c.cmd_impls = boom\nsys.exit(c.main(['impls']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "internal error" in out.stderr and "ZeroDivisionError" in out.stderr


def test_replay_reads_every_trace_and_names_the_bad_ones(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": "bcr-verify-trace/1", "implementations": ["reference"],
                                "block_size": 4, "capacity_pages": 16,
                                "steps": [{"op": "match", "args": {"tokens": [1, 2, 3, 4]}}]}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "bcr-verify-trace/1", "implementations": ["reference"],
                               "block_size": 4, "capacity_pages": 16, "steps": ["oops"]}))
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps({"format": "bcr-verify-trace/1", "implementations": ["reference"],
                                 "block_size": 4, "capacity_pages": 16,
                                 "steps": [{"op": "finish", "args": {"rid": 0}}]}))
    out = cli("replay", str(bad), str(stray), str(good))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{bad}: malformed trace (step 0" in out.stderr
    assert "step 0 (finish) does not apply here" in out.stderr
    assert "PASS: replayed cleanly" in out.stdout  # the good one still ran, after the others


def test_max_steps_is_exact_and_shrinking_is_counted_apart(tmp_path):
    out = cli("run", "--impl", "reference", "--max-steps", "1", "--quiet", "--json",
              str(tmp_path / "one.json"))
    assert out.returncode == 0, out.stderr
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["steps"] == 1 and sum(one["operations"].values()) == 1
    assert "steps" in one["counts"]
    out, report = run_fault(tmp_path, "raises_in_insert")
    assert report["steps"] <= 400 and report["shrink_steps"] > 0
    assert sum(report["operations"].values()) == report["steps"]


@pytest.mark.parametrize("args, words", [
    (["run", "--minutes", "nan"], "--minutes must be a finite number"),
    (["soak", "--minutes", "inf"], "--minutes must be a finite number"),
    (["run", "--op-timeout", "0"], "--op-timeout must be > 0"),
])
def test_non_finite_budgets_are_usage_errors(args, words):
    out = cli(*args)
    assert out.returncode == 2 and words in out.stderr, out.stderr


def test_unwritable_outputs_are_refused_before_the_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    out = cli("run", "--impl", "reference", "--trace-dir", str(a_file))
    assert out.returncode == 2 and "--trace-dir" in out.stderr and "not a directory" in out.stderr
    out = cli("run", "--impl", "reference", "--json", str(tmp_path))
    assert out.returncode == 2 and "--json" in out.stderr and "is a directory" in out.stderr
    out = cli("soak", "--impl", "reference", "--plot", str(a_file / "x.png"))
    assert out.returncode == 2 and "--plot" in out.stderr
    assert "steps" not in out.stdout  # refused before any work


def test_missing_optional_dependencies_are_named(monkeypatch):
    import argparse
    import importlib.util

    from bcr_verify import preflight
    from bcr_verify.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("matplotlib", "torch") else real(name, *a))
    with pytest.raises(UsageError, match="--plot needs matplotlib"):
        preflight.check(argparse.Namespace(plot="x.png"))
    with pytest.raises(UsageError, match="--kv-replay needs torch"):
        preflight.check(argparse.Namespace(kv_replay=True))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_traces_are_written_with_the_umask(tmp_path, umask, mode):
    from bcr_verify.trace import Trace

    old = os.umask(umask)
    try:
        path = Trace(["reference"], 4, 16, [], meta={"umask": umask}).save(tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_help_documents_the_exit_codes():
    for args in (["--help"], ["run", "--help"], ["soak", "--help"], ["replay", "--help"]):
        out = cli(*args)
        assert out.returncode == 0
        for code in ("0 ", "1 ", "2 ", "3 ", "130"):
            assert f"\n  {code}" in out.stdout, (args, out.stdout)
