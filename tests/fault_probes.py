"""The fault-injection table of docs/reliability.md: every probe, run as a user would run it.

    .venv/bin/python tests/fault_probes.py > /tmp/probes.md

Each probe is a command line (with a signal for the interrupt probes); the table gives the
verdict line it printed, its exit code, whether a trace was saved, and whether that is what
the exit-code contract demands. ``tests/test_faults.py`` asserts the same outcomes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
F = "faulty_caches:"
RUN = ["run", "--impl", "reference", "--block-size", "4", "--max-steps", "400", "--quiet"]


def probes(tmp: Path):
    file = tmp / "a-file"
    file.write_text("")
    bad = tmp / "bad.json"
    bad.write_text('{"format": "bcr-verify-trace/1", "implementations": ["reference"], '
                   '"block_size": 4, "capacity_pages": 16, "steps": ["oops"]}')
    moved = tmp / "moved.json"
    yield "raise: KeyError in insert (run)", RUN + ["--impl", F + "raises_in_insert"], 1, None
    yield "raise: RecursionError on a deep call (run)", RUN + ["--impl", F + "deep_recursion"], 1, None
    yield "raise: ValueError on an empty prompt (run)", RUN + ["--impl", F + "rejects_empty_prompt"], 1, None
    yield "raise: ValueError on an empty prompt (soak)", ["soak", "--impl", F + "rejects_empty_prompt", "--ops", "20000", "--quiet"], 1, None
    yield "raise: replay of the soak's saved trace", ["replay", "@last"], 1, None
    yield "raise: mutants scorecard (all caught)", ["mutants", "--only", "size-drift", "--seconds", "30"], 0, None
    yield "hang in match, Python loop (run)", RUN + ["--impl", F + "hangs_in_match", "--op-timeout", "2"], 1, None
    yield "hang in match, Python loop (soak --minutes 0.5)", ["soak", "--impl", F + "hangs_in_match", "--minutes", "0.5", "--op-timeout", "2", "--quiet"], 1, None
    yield "hang in native code (run)", RUN + ["--impl", F + "hangs_in_native_code", "--op-timeout", "2"], 1, None
    yield "hang in native code: replay of its trace", ["replay", "@last", "--op-timeout", "2"], 1, None
    yield "hang in a Python loop spent in a gc callback, which drops the timeout's exception (run)", RUN + ["--impl", F + "hangs_in_a_gc_callback", "--op-timeout", "2"], 1, None
    yield "crash: segfault in native code (run)", RUN + ["--impl", F + "segfaults"], 1, None
    yield "crash: segfault: replay of its trace", ["replay", "@last"], 1, None
    yield "crash: os._exit(3) inside insert (run)", RUN + ["--impl", F + "exits_the_process"], 1, None
    yield "crash: os._exit(3) inside insert (soak)", ["soak", "--impl", F + "exits_the_process", "--ops", "2000", "--quiet"], 1, None
    yield "crash: os._exit(3) on a 23-block insert, long after the first flush (soak)", ["soak", "--impl", "reference", "--impl", F + "exits_on_a_long_insert", "--ops", "5000", "--quiet"], 1, None
    yield "crash after a flush: replay of the journal's trace", ["replay", "@last"], 1, None
    yield "leak: 16 KiB per insert (soak --minutes 0.3)", ["soak", "--impl", F + "leaks", "--minutes", "0.3", "--quiet"], 1, None
    yield "too few samples to judge growth (soak --ops 40)", ["soak", "--impl", "reference", "--ops", "40", "--quiet"], 0, None
    yield "allocator hands out a cached page (was: TypeError in the harness)", RUN + ["--impl", F + "hands_out_cached_pages"], 1, None
    yield "SIGINT (Ctrl-C) in a long passing run", ["run", "--impl", "reference", "--minutes", "10"], 130, ("examples", signal.SIGINT)
    yield "SIGINT during Hypothesis's shrink", ["run", "--impl", "reference", "--impl", F + "slow_and_failing", "--block-size", "4"], 1, ("shrinking it", signal.SIGINT)
    yield "SIGTERM during a soak", ["soak", "--impl", "reference", "--minutes", "10"], 130, ("ops/s", signal.SIGTERM)
    yield "SIGTERM whose KeyboardInterrupt a gc callback drops (run)", RUN + ["--impl", F + "interrupted_in_a_gc_callback"], 130, None
    yield "--max-steps 1 (steps executed: see JSON)", ["run", "--impl", "reference", "--max-steps", "1", "--quiet"], 0, None
    yield "--minutes nan", ["run", "--minutes", "nan"], 2, None
    yield "--trace-dir naming a file", RUN + ["--trace-dir", str(file)], 2, None
    yield "--json naming a directory", RUN + ["--json", str(tmp)], 2, None
    yield "--plot under a file", ["soak", "--impl", "reference", "--plot", str(file / "x.png")], 2, None
    yield "factory raises", ["run", "--impl", F + "factory_raises"], 2, None
    yield "factory with the wrong signature", ["run", "--impl", F + "factory_takes_nothing"], 2, None
    yield "factory returns an int", ["run", "--impl", F + "factory_returns_int"], 2, None
    yield "replay of a malformed trace (then a good one)", ["replay", str(bad), "@first"], 2, None
    yield "replay at another block size (steps that do not apply)", ["replay", str(moved)], 2, ("move", None)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bcr-probes-"))
    rows, saved = [], []
    for name, args, want, signal_spec in probes(tmp):
        if "@last" in args:
            args = [saved[-1] if a == "@last" else a for a in args]
        if "@first" in args:
            args = [saved[0] if a == "@first" else a for a in args]
        if signal_spec and signal_spec[0] == "move":
            data = json.loads(Path(saved[0]).read_text())
            data["block_size"], data["capacity_pages"] = 1, 4  # its prompts no longer fit
            Path(args[-1]).write_text(json.dumps(data))
            signal_spec = None
        if args[0] in ("run", "soak", "mutants") and "--trace-dir" not in args:
            args = args + ["--trace-dir", str(tmp / "tr")]
        if args[0] in ("run", "soak") and "--json" not in args:
            args = args + ["--json", str(tmp / "report.json")]
        code, out = execute(args, signal_spec, tmp)
        trace = next((l.split("replay ", 1)[1] for l in out.splitlines()
                      if l.startswith("reproduce with: bcr-verify replay ")), None)
        if trace:
            saved.append(trace)
        verdict = next((l for l in reversed(out.splitlines()) if l.startswith(
            ("PASS", "FAIL", "FAILS", "INTERRUPTED", "INCONCLUSIVE", "bcr-verify", "UNREADABLE",
             "caught "))), out.strip().splitlines()[-1] if out.strip() else "")
        verdict = verdict.replace(str(tmp), "$TMP").replace("|", "/")
        shown = " ".join(a.replace(str(tmp), "$TMP") for a in args)
        rows.append(f"| {name} | `bcr-verify {shown}` | {verdict[:150]} | {code} | "
                    f"{'yes' if trace else 'no'} | {'yes' if code == want else '**NO**'} |")
        print(f"{name}: exit {code}", file=sys.stderr, flush=True)
    print("| probe | command | verdict | exit | trace saved | as the contract says |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0 if all(r.endswith("| yes |") for r in rows) else 1


def execute(args, signal_spec, tmp: Path) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "bcr_verify.cli", *args]
    if signal_spec is None:
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
        return done.returncode, done.stdout + done.stderr
    marker, sig = signal_spec
    log = tmp / "signal.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
        while marker not in log.read_text() and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.2 if "shrinking" in marker else 1)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does
        else:
            proc.send_signal(sig)
        code = proc.wait(300)
    return code, log.read_text()


if __name__ == "__main__":
    sys.exit(main())
