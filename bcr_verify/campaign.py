"""``bcr-verify soak --workers N``: N soaks on N cores, independent seeds, one merged report.

A soak is one Python process, so it uses one core. A campaign runs N ordinary supervised
``bcr-verify soak`` processes side by side, each with its own seed, and merges their JSON
reports into one. Each worker is exactly the single-worker command it prints, so a crash or
a hang in one is that worker's finding, with its trace, and anything a worker finds is
reproduced by that one command, or by ``bcr-verify replay`` on its trace.

* Seeds: worker ``i`` runs ``--seed SEED+i``. Two campaigns overlap unless their seeds are
  at least N apart.
* Budget: ``--minutes`` is each worker's wall time (they run at once); ``--ops`` is the
  campaign's total, split as evenly as it divides (the first ``ops % N`` workers get one
  more), so ``--ops 20000`` does 20,000 lockstep operations whatever N is.
* Traces: every worker saves into the shared ``--trace-dir``; a trace's file name is its
  failed check and the sha256 of its content (which records the seed), written through a
  temporary file, so workers never overwrite each other.
* Verdict: the worst worker's, in the order fail > error > interrupted > inconclusive >
  pass; ``error`` is a worker that ended without a report (its exit status and the end of
  its stderr are in the report), which is never counted as a pass.
* Interrupts: SIGINT / SIGTERM is forwarded once to every worker (each started in its own
  session, so a terminal's Ctrl-C reaches them only through here), each writes its report,
  and the merged report says ``interrupted``, or ``fail`` if a worker had found something.
  A worker still running ``WORKER_GRACE_S`` later is killed and reported without a report.
* Progress: one line, from the workers' own progress lines (read from their stderr, where a
  worker writes one every 10 s), so its totals trail the workers by up to that.
* ``--plot``: one PNG, every worker's RSS and each lane's cached blocks, a colour per worker;
  the JSON report keeps each worker's samples.
* ``--workers 1`` (the default) is the single soak, untouched.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bcr_verify import affinity
from bcr_verify.cli import (
    EXIT_FINDING, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_PASS, EXIT_USAGE, events_lines,
)
from bcr_verify.errors import UsageError
from bcr_verify.soak import seen_first_as
from bcr_verify.supervise import INTERRUPT_GRACE_S

FORWARDED = {"impls": "--impl", "block_size": "--block-size", "workload": "--workload",
             "minutes": "--minutes", "check_every": "--check-every",
             "sample_seconds": "--sample-seconds", "strict_lru": "--strict-lru",
             "events": "--events", "shape": "--shape", "trace_dir": "--trace-dir",
             "op_timeout": "--op-timeout", "in_process": "--in-process",
             "shrink_seconds": "--shrink-seconds", "known": "--known", "no_pin": "--no-pin"}
"""The soak options every worker gets as given (``--seed`` and ``--ops`` are derived)."""
CAMPAIGN_ONLY = {"workers", "seed", "ops", "json", "plot", "quiet"}
"""The options the campaign itself answers; a new soak option must join one of the two sets
(``tests/test_soak_workers.py`` checks), or the workers would silently run without it."""
ORDER = ("pass", "inconclusive", "interrupted", "error", "fail")
"""Verdicts from best to worst: the campaign's is its worst worker's."""
WORKER_GRACE_S = INTERRUPT_GRACE_S - 5
"""How long interrupted workers may take to write their reports; below the supervisor's own
grace for this process, so the merged report is always written."""
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}
PROGRESS = re.compile(r"([\d,]+) ops, ([\d,]+) ops/s")
COUNTS = {
    "lockstep_operations": "summed over workers",
    "implementation_operations": "summed over workers",
    "ops_per_second": "each worker's own lockstep ops/s (its operations / its soak's wall "
                      "time), summed: the campaign's throughput with start-up excluded",
    "ops_per_second_wall": "lockstep_operations / the campaign's wall time, start-up of "
                           "every worker's Python, torch and caches included",
    "invariant_checks": "summed over workers",
    "known": "each known check's hits summed over workers, with the shortest witness of any",
    "known_not_seen": "checks given to --known that no worker saw fail",
    "implementations_detail": "each count summed over workers; hit_rate recomputed from the "
                              "summed tokens",
}
"""What each merged count counts; written into the report itself."""


@dataclass
class Worker:
    index: int
    seed: int
    argv: list[str]
    """``bcr-verify soak ...`` arguments that reproduce this worker alone."""
    json_path: Path
    cpu: int | None = None
    """The CPU the worker is pinned to from its start (``--events``: see
    :mod:`bcr_verify.affinity`), each worker on its own while there are CPUs enough."""
    proc: subprocess.Popen | None = None
    ops: int = 0
    rate: float = 0.0
    stderr: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    killed: str | None = None

    @property
    def command(self) -> str:
        return "bcr-verify soak " + shlex.join(self.argv)

    def state(self) -> str:
        if self.proc.poll() is None:
            return f"{self.ops:,}" if self.ops else "starting"
        return "done" if self.proc.returncode in (EXIT_PASS, EXIT_FINDING) else \
            f"exit {self.proc.returncode}"


def plan(args) -> list[Worker]:
    """One :class:`Worker` per ``--workers``, seeds and ``--ops`` shares derived from args."""
    n = args.workers
    if args.ops is not None and args.ops < n:
        raise UsageError(f"--ops {args.ops} is the campaign's total, split over --workers {n}: "
                         f"give at least {n} operations, or fewer workers")
    common = []
    for attr, option in FORWARDED.items():
        value = getattr(args, attr, None)
        if value is None or value is False:
            continue
        if value is True:
            common.append(option)
        elif isinstance(value, list):
            for item in value:
                common += [option, str(item)]
        else:
            common += [option, str(value)]
    cpus = affinity.allowed() if affinity.wanted(args) else None
    workers = []
    for i in range(n):
        argv = ["--seed", str(args.seed + i), *common]
        if args.ops is not None:
            argv += ["--ops", str(args.ops // n + (i < args.ops % n))]
        workers.append(Worker(i, args.seed + i, argv, Path(),
                              cpu=cpus[i % len(cpus)] if cpus else None))
    return workers


def cmd_campaign(args) -> int:
    from bcr_verify.runner import write_json
    from bcr_verify.session import progress_printer

    workers = plan(args)
    show = None if args.quiet else progress_printer()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bcr-verify-workers-") as tmp:
        for w in workers:
            w.json_path = Path(tmp) / f"worker-{w.index}.json"
        interrupted = run_workers(workers, show, args.minutes)
        if show:
            show("", final=True)
        reports = [_read(w) for w in workers]
    if all(w.proc.returncode == EXIT_USAGE and r is None for w, r in zip(workers, reports)):
        print("\n".join(workers[0].stderr), file=sys.stderr)  # the same error from each
        return EXIT_USAGE
    report = merge(workers, reports, interrupted, time.monotonic() - start, args)
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot_workers(report, args.plot)
    print(summary(report))
    if args.plot:
        print(f"plot: {args.plot}")
    return exit_code(report)


def run_workers(workers: list[Worker], show, minutes: float | None) -> bool:
    """Start every worker, print the merged progress line until all have ended; True when
    interrupted (the interrupt forwarded to each worker once)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)  # held until all are started
    for w in workers:
        w.proc = subprocess.Popen(
            [sys.executable, "-m", "bcr_verify.cli", "soak", *w.argv, "--json", str(w.json_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True, preexec_fn=lambda cpu=w.cpu: _worker_setup(mask, cpu))
    readers = [threading.Thread(target=_read_stderr, args=(w,), daemon=True) for w in workers]
    for t in readers:
        t.start()
    start = time.monotonic()
    interrupted_at = None
    while True:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if all(w.proc.poll() is not None for w in workers):
                break
            time.sleep(0.2)
            if show:
                show(progress_line(workers, time.monotonic() - start, minutes))
            if interrupted_at and time.monotonic() - interrupted_at > WORKER_GRACE_S:
                _kill_all(workers, f"still running {WORKER_GRACE_S:g} s after the interrupt: "
                                   "killed")
        except KeyboardInterrupt:
            if interrupted_at is None:
                interrupted_at = time.monotonic()
                _signal_all(workers, signal.SIGTERM)
            else:
                _kill_all(workers, "interrupted twice: killed")
    for t in readers:
        t.join(timeout=5)
    return interrupted_at is not None


def _worker_setup(mask, cpu: int | None) -> None:
    """In the worker, before exec: the campaign's signal mask back, SIGTERM if the campaign
    dies outright (its own session keeps a terminal's Ctrl-C from reaching it), and its CPU
    (``cpu``; the worker then pins itself to the one CPU it is allowed)."""
    from bcr_verify.supervise import _die_with_parent

    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _die_with_parent()
    if cpu is not None:
        affinity.pin(cpu)


def _read_stderr(w: Worker) -> None:
    for line in w.proc.stderr:
        line = line.rstrip("\n")
        match = PROGRESS.search(line)
        if match:
            w.ops, w.rate = int(match[1].replace(",", "")), float(match[2].replace(",", ""))
        elif line.strip():
            w.stderr.append(line)


def _signal_all(workers: list[Worker], sig: int) -> None:
    for w in workers:
        if w.proc.poll() is None:
            try:
                os.kill(w.proc.pid, sig)
            except ProcessLookupError:
                pass


def _kill_all(workers: list[Worker], why: str) -> None:
    """Kill each running worker's whole session: its supervisor and the soak it watches."""
    for w in workers:
        if w.proc.poll() is None:
            w.killed = why
            try:
                os.killpg(w.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def progress_line(workers: list[Worker], elapsed: float, minutes: float | None) -> str:
    total = sum(w.ops for w in workers)
    rate = sum(w.rate for w in workers if w.proc.poll() is None)
    budget = f"/{minutes * 60:.0f}s" if minutes else ""
    states = ", ".join(f"w{w.index} {w.state()}" for w in workers)
    return f"{total:,} ops, {rate:,.0f} ops/s, {elapsed:.0f}s{budget} | {states}"


def _read(w: Worker) -> dict | None:
    try:
        return json.loads(w.json_path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ the merged report


def worker_summary(w: Worker, report: dict | None) -> dict:
    out = {"worker": w.index, "seed": w.seed, "command": w.command, "cpu": w.cpu,
           "exit_code": w.proc.returncode}
    if report is None:
        why = w.killed or f"exit status {w.proc.returncode}"
        stopped = w.killed or w.proc.returncode == EXIT_INTERRUPTED  # before its soak began
        out.update(verdict="interrupted" if stopped else "error",
                   note=f"ended without a report ({why})", stderr_tail=list(w.stderr))
        return out
    keys = ("verdict", "lockstep_operations", "implementation_operations", "ops_per_second",
            "seconds", "invariant_checks", "flushes", "failure", "found_as", "trace", "shrink",
            "note", "samples")
    out.update({k: report[k] for k in keys if k in report})
    out["growth"] = report.get("growth", {}).get("verdict")
    return out


def merge(workers: list[Worker], reports: list[dict | None], interrupted: bool,
          seconds: float, args) -> dict:
    """One report from the workers': counts summed, the worst verdict, every failure."""
    from bcr_verify.session import add_section, known_not_seen

    rows = [worker_summary(w, r) for w, r in zip(workers, reports)]
    verdict = max((row["verdict"] for row in rows), key=ORDER.index)
    if verdict in ("pass", "inconclusive") and interrupted:
        verdict = "interrupted"
    got = [r for r in reports if r is not None]
    total = sum(r.get("lockstep_operations", 0) for r in got)
    detail: dict[str, dict] = {}
    for r in got:
        for name, stats in r.get("implementations_detail", {}).items():
            mine = detail.setdefault(name, {})
            for key, value in stats.items():
                if isinstance(value, (int, float)) and key not in ("hit_rate",
                                                                   "raw_ops_per_second_alone"):
                    mine[key] = round(mine.get(key, 0) + value, 3)
    for stats in detail.values():
        if stats.get("lookup_tokens"):
            stats["hit_rate"] = round(stats["hit_tokens"] / stats["lookup_tokens"], 4)
    known: dict[str, dict] = {}
    for r in got:
        for check, found in r.get("known", {}).items():
            mine = known.setdefault(check, {"count": 0, "steps": None, "trace": None})
            mine["count"] += found["count"]
            if mine["steps"] is None or found["steps"] < mine["steps"]:
                mine["steps"], mine["trace"] = found["steps"], found["trace"]
    first = got[0] if got else {}
    events: dict = {}
    for r in got:
        if r.get("events"):
            add_section(events, r["events"])
    failures = [{"worker": row["worker"], "seed": row["seed"], "trace": row.get("trace"),
                 "failure": row.get("failure") or {"kind": "growth", "detail": row["growth"]},
                 "found_as": row.get("found_as"), "command": row["command"]}
                for row in rows if row["verdict"] == "fail"]
    report = {
        "verdict": verdict, "ok": verdict in ("pass", "inconclusive"),
        "interrupted": interrupted, "workers_count": len(workers),
        "seed": args.seed, "seeds": "worker i runs --seed SEED+i",
        "budget": {"minutes_per_worker": args.minutes, "ops_total": args.ops},
        "implementations": first.get("implementations", args.impls),
        "not_run": first.get("not_run", {}), "block_size": args.block_size,
        "workload": args.workload, "shape": args.shape, "seconds": round(seconds, 2),
        "lockstep_operations": total,
        "implementation_operations": sum(r.get("implementation_operations", 0) for r in got),
        "ops_per_second": round(sum(r.get("ops_per_second", 0) for r in got), 1),
        "ops_per_second_wall": round(total / seconds, 1) if seconds else 0.0,
        "invariant_checks": sum(r.get("invariant_checks", 0) for r in got),
        "flushes": sum(r.get("flushes", 0) for r in got),
        "implementations_detail": detail,
        **({"events": events} if events else {}),
        "vacuous_warnings": [w for w in first.get("vacuous_warnings", [])
                             if all(w in r.get("vacuous_warnings", []) for r in got)]
        if verdict in ("pass", "inconclusive") else [],
        "known": known,
        "known_not_seen": known_not_seen(args.known or (), known),
        "failures": failures,
        "workers": rows,
        "counts": COUNTS,
    }
    if "provenance" in first:
        report["provenance"] = {**first["provenance"], "command": sys.argv[:],
                                "request": {"workers": len(workers), "seed": args.seed,
                                            "minutes": args.minutes, "ops": args.ops},
                                "cpus": sorted({c for r in got
                                                for c in r.get("provenance", {}).get("cpus", [])})}
    try:
        report["load_average"] = os.getloadavg()
    except OSError:
        pass
    return report


def exit_code(report: dict) -> int:
    verdict = report["verdict"]
    if verdict == "fail":
        return EXIT_FINDING
    if verdict == "error":
        usage = all(row["exit_code"] == EXIT_USAGE for row in report["workers"]
                    if row["verdict"] == "error")
        return EXIT_USAGE if usage else EXIT_INTERNAL
    return EXIT_INTERRUPTED if verdict == "interrupted" else EXIT_PASS


def summary(report: dict) -> str:
    from bcr_verify.session import known_not_seen_line
    from bcr_verify.trace import Trace

    n = report["workers_count"]
    lines = [f"implementations: {', '.join(report['implementations'] or [])}",
             *[f"NOT RUN: {name} ({why})" for name, why in report["not_run"].items()],
             f"{n} workers, worker i with --seed {report['seed']}+i"]
    for row in report["workers"]:
        if "lockstep_operations" in row:
            lines.append(f"  worker {row['worker']} (seed {row['seed']}"
                         + (f", CPU {row['cpu']}" if row.get("cpu") is not None else "")
                         + f"): {row['verdict']}, {row['lockstep_operations']:,} ops in "
                         f"{row['seconds']} s = {row['ops_per_second']:,} ops/s, growth "
                         f"{row['growth']}")
        else:
            lines.append(f"  worker {row['worker']} (seed {row['seed']}): {row['verdict']}, "
                         f"{row.get('note', 'its counts were lost with its process')}")
            lines += [f"    | {text}" for text in row.get("stderr_tail", [])[-5:]]
    lines.append(f"merged: {report['lockstep_operations']:,} lockstep operations "
                 f"({report['implementation_operations']:,} implementation operations), "
                 f"{report['ops_per_second']:,} ops/s summed over workers "
                 f"({report['ops_per_second_wall']:,} ops/s over the campaign's "
                 f"{report['seconds']} s, start-up included); "
                 f"{report['invariant_checks']:,} invariant checks")
    for name, d in report["implementations_detail"].items():
        lines.append(f"  {name:<22} hit rate {d.get('hit_rate', 0):.3f}, "
                     f"hits {d.get('hits', 0):,}, evictions {d.get('evictions', 0):,}")
    lines += events_lines(report.get("events"))
    lines += [f"WARNING (pass may be vacuous, in every worker): {w}"
              for w in report.get("vacuous_warnings", [])]
    for check, found in report["known"].items():
        lines.append(f"KNOWN: {check} failed {found['count']:,} times (not a new finding); "
                     f"a {found['steps']}-step witness: {found['trace']}")
    lines += [known_not_seen_line(check) for check in report.get("known_not_seen", [])]
    for f in report["failures"]:
        failure = f["failure"]
        where = f" in {failure['impl']} [{failure['check']}]" if "impl" in failure else ""
        lines.append(f"FAIL in worker {f['worker']} (seed {f['seed']}): {failure['kind']}{where}: "
                     f"{failure['detail']}")
        seen = seen_first_as(failure, f["found_as"])
        if seen:
            lines.append(f"(the worker saw it first as {seen['kind']} in {seen['impl']} "
                         f"[{seen['check']}], the name --known takes)")
        if f["trace"]:
            try:
                lines.append(Trace.load(f["trace"]).render())
            except UsageError as exc:
                lines.append(f"(the trace cannot be shown: {exc})")
            lines.append(f"trace saved: {f['trace']}")
            lines.append(f"the worker alone: {f['command']}")
            lines.append(f"reproduce with: bcr-verify replay {f['trace']}")
        else:
            lines.append(f"no trace saved; reproduce with: {f['command']}")
    lines.append(verdict_line(report))
    return "\n".join(lines)


def verdict_line(report: dict) -> str:
    rows = report["workers"]
    count = {v: sum(row["verdict"] == v for row in rows) for v in ORDER}
    verdict = report["verdict"]
    if verdict == "fail":
        return (f"FAIL: {count['fail']} of {len(rows)} workers found a failure (each above, "
                "with its trace and the command that reproduces it)")
    if verdict == "error":
        return (f"ERROR: {count['error']} of {len(rows)} workers ended without a report (their "
                "stderr is above and in the JSON report); nothing can be concluded from them")
    if verdict == "interrupted":
        return "INTERRUPTED: no failure in what ran, but the campaign did not finish"
    if verdict == "inconclusive":
        return (f"INCONCLUSIVE: every check passed, but {count['inconclusive']} of {len(rows)} "
                "workers had too few samples to judge growth (run longer)")
    return "PASS"


def plot_workers(report: dict, path: str) -> None:
    """RSS, and each lane's cached blocks, against operations: one colour per worker."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    styles = ("-", "--", ":", "-.")
    for row in report["workers"]:
        samples = row.get("samples") or []
        if not samples:
            continue
        xs = [s["ops"] / 1e6 for s in samples]
        colour = f"C{row['worker'] % 10}"
        axes[0].plot(xs, [s["rss_mb"] for s in samples], color=colour,
                     label=f"worker {row['worker']} (seed {row['seed']}): {row['growth']}")
        for k, lane in enumerate(samples[0]["lanes"]):
            axes[1].plot(xs, [s["lanes"][lane]["cached_blocks"] for s in samples], color=colour,
                         linestyle=styles[k % len(styles)], label=f"w{row['worker']} {lane}")
    axes[0].set_title(f"soak, {report['workers_count']} workers: "
                      f"{report['lockstep_operations']:,} ops | verdict {report['verdict']}",
                      fontsize=9)
    axes[0].set_ylabel("RSS (MB)")
    axes[1].set_ylabel("cached blocks")
    axes[1].set_xlabel("lockstep operations of each worker (millions)")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
