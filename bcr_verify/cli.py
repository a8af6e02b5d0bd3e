"""``bcr-verify``: the command line, a thin layer over :mod:`bcr_verify.runner` and friends.

Exit codes are a contract (``EXIT_CODES``, shown in ``--help``). Commands that drive
implementations (``run``, ``soak``, ``replay``, ``mutants``) do their work in a supervised
child process (:mod:`bcr_verify.supervise`), so a crash or a hang in native code is a
reported finding with a saved trace instead of the end of the harness.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import sys
import threading
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bcr_verify.errors import UsageError  # noqa: E402

EXIT_PASS, EXIT_FINDING, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = """\
exit codes:
  0    pass: nothing found (warnings say when a pass could be vacuous)
  1    a finding about an implementation: divergence, invariant violation, implementation
       raised, hung or crashed, or (soak) growth; its trace is saved and printed
  2    usage or set-up error: a bad argument (named), an output that could not be written,
       a missing optional dependency, a factory that cannot build a cache, a malformed trace
  3    internal error of bcr_verify itself (please report it, with the traceback)
  130  interrupted (SIGINT / SIGTERM): the report so far is written; a failure found before
       the interrupt is exit 1 with the best trace so far
"""

EPILOG = """\
examples:
  bcr-verify impls                          which implementations can run here, and why not
  bcr-verify run                            every available implementation, 2000 steps
  bcr-verify run --impl reference --impl sglang-radix --block-size 1 --max-steps 5000
  bcr-verify run --impl my_pkg.cache:make --minutes 10 --json report.json
  bcr-verify replay corpus/traces/*.json    re-run saved failures, steps side by side

A divergence exits 1, prints the shrunk trace and saves it under --trace-dir; each failure ends
with the command that reproduces it.

""" + EXIT_CODES

COMMAND_MODULES = ("bcr_verify.soak", "bcr_verify.bench", "bcr_verify.mutants",
                   "bcr_verify.matrix")
"""Modules that add their own subcommand through ``register(subparsers)``."""


def _positive(convert, name):
    """An argparse type: ``convert`` the text, then insist on a value above zero."""
    kind = "an integer" if convert is int else "a number"

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        if convert is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}" if convert is int
                                             else f"{name} must be > 0, got {value}")
        return value
    return parse


class _Version(argparse.Action):
    """``--version``: what a bug report needs, read only when asked (no implementation is
    imported: their versions are in ``bcr-verify impls`` and in every report)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show bcr_verify's version, "
                         "Python's and Hypothesis's, and whether the reference model is "
                         "compiled, then exit", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from bcr_verify.provenance import tool_versions
        print("bcr-verify {bcr_verify} (Python {python}, Hypothesis {hypothesis}; reference "
              "model: {reference_model})".format(**tool_versions()))
        parser.exit()


def _positive_int(name):
    return _positive(int, name)


def _positive_float(name):
    return _positive(float, name)


EVENTS_HELP = ("check every KV-cache event of the implementations that publish them "
               "(SGLang's RadixCache from 0.4.8, its UnifiedRadixCache from 0.5.13, vLLM): "
               "each against the model, and replayed "
               "into a refcounting index and Dynamo's RadixTree that must agree with the "
               "cache (docs/events.md)")
"""``--events`` of ``run`` and ``soak``."""


def add_events_args(parser: argparse.ArgumentParser) -> None:
    """``--events`` and ``--no-pin``, of ``run`` and ``soak``."""
    parser.add_argument("--events", action="store_true", help=EVENTS_HELP)
    parser.add_argument("--no-pin", action="store_true",
                        help="with --events, do not pin the process to one CPU. By default it "
                             "is (never with --kv-replay), because Dynamo's RadixTree answers "
                             "from a thread of its own and a round trip between two cores cost "
                             "~50-95 us here, ~9 us on one: an events soak ran twice as fast "
                             "pinned (bcr_verify/affinity.py)")


def pin_for_events(args) -> int | None:
    """Pin this process to one CPU where :func:`bcr_verify.affinity.wanted` says so; the CPU."""
    from bcr_verify import affinity

    return affinity.pin() if affinity.wanted(args) else None


def pinned_line(cpu: int) -> str:
    return (f"pinned to CPU {cpu}: Dynamo's RadixTree answers each call from a thread of its "
            "own, and a round trip across cores costs ~50-95 us (--no-pin to leave it free)")


def add_impl_args(parser: argparse.ArgumentParser, faults: bool = True) -> None:
    """Options shared by every command that runs implementations; ``faults``: with the
    timeout and supervision options of commands that report hangs and crashes."""
    parser.add_argument("--impl", action="append", dest="impls", metavar="NAME",
                        help="an implementation from `bcr-verify impls`, or module:attr naming a "
                             "factory that takes a bcr_verify.adapters.CacheSpec (block size and "
                             "capacity) or the block size; repeat for several "
                             "(default: every available one)")
    parser.add_argument("--block-size", type=_positive_int("--block-size"), default=16,
                        help="tokens per block / page (default 16; 1 = token granularity)")
    parser.add_argument("--workload", default="mixed",
                        help="prompt family from the real tokenizer (default mixed); see "
                             "`bcr-verify impls --workloads`")
    parser.add_argument("--seed", type=int, default=0, help="seed for a reproducible run")
    if faults:
        add_fault_args(parser)


def add_known_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--known", action="append", metavar="CHECK",
                        help="a check already known to fail here (e.g. 'sizes'): each hit is "
                             "counted and one witness trace kept, the lanes start again on fresh "
                             "caches, and the search goes on for others (repeatable)")


def add_shrink_arg(parser: argparse.ArgumentParser) -> None:
    """``--shrink-seconds`` of the commands that shrink what they find."""
    from bcr_verify.lockstep import DEFAULT_SHRINK_SECONDS

    parser.add_argument("--shrink-seconds", type=_positive_float("--shrink-seconds"),
                        default=DEFAULT_SHRINK_SECONDS, metavar="S",
                        help="shrink a failure for at most this long, showing progress; then "
                             "(or on Ctrl-C) the smallest failing example found so far is saved "
                             f"(default {DEFAULT_SHRINK_SECONDS:g})")


def add_fault_args(parser: argparse.ArgumentParser) -> None:
    """Options of every command that calls into implementations."""
    from bcr_verify.guard import DEFAULT_OP_TIMEOUT

    parser.add_argument("--op-timeout", type=_positive_float("--op-timeout"),
                        default=DEFAULT_OP_TIMEOUT, metavar="S",
                        help="seconds one call into an implementation may take before it is "
                             f"reported as hung (default {DEFAULT_OP_TIMEOUT:g})")
    parser.add_argument("--in-process", action="store_true",
                        help="run in this process, without the supervising parent: a crash of "
                             "an implementation then ends bcr-verify too (for debuggers)")


@contextlib.contextmanager
def verdict_reached():
    """Once a run has its verdict, an interrupt no longer changes it: the report is written
    whole and the exit code is the verdict's (a late Ctrl-C used to turn a saved finding into
    exit 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def cmd_impls(args) -> int:
    from bcr_verify.adapters import all_implementations

    if args.workloads:
        from bcr_verify.strategies import WORKLOADS
        for name, text in WORKLOADS.items():
            print(f"{name:<16} {text}")
        return 0
    rows = []
    for name, impl in all_implementations().items():
        why = impl.availability()
        rows.append({"name": name, "available": why is None, "reason": why,
                     "description": impl.description, "version": impl.version(),
                     "notes": impl.notes() if why is None else {},
                     "contract": impl.contract() if why is None else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.contracts:
        print(contracts_table(rows))
        return 0
    for row in rows:
        state = "available" if row["available"] else "unavailable"
        print(f"{row['name']:<22} {state:<12} {row['description']}")
        notes = row["notes"]
        if notes.get("generation"):
            print(f"{'':<35} sglang {notes['release']}, API generation {notes['generation']}")
        for standin in notes.get("stand_ins", []):
            print(f"{'':<35} stand-in used for {standin['package']}: "
                  f"{', '.join(standin['names']) or '(no names read)'}")
        for invariant in notes.get("not_checked", []):
            print(f"{'':<35} not checked: {invariant}")
        if row["reason"]:
            print(f"{'':<22} {'':<12} why: {row['reason']}")
    return 0


def contracts_table(rows: list[dict]) -> str:
    """Each available implementation's declared contract: one column per implementation."""
    from bcr_verify.adapters import OPTIONS

    shown = [r for r in rows if r["contract"]]
    width = max([len(name) for name in OPTIONS] + [0]) + 2
    cols = [max(len(r["name"]), 10) + 2 for r in shown]
    lines = ["".ljust(width) + "".join(r["name"].rjust(w) for r, w in zip(shown, cols))]
    for option in OPTIONS:
        lines.append(option.ljust(width) + "".join(
            str(r["contract"][option]).rjust(w) for r, w in zip(shown, cols)))
    lines.append("(what each option means: `python -c 'import bcr_verify.adapters as a; "
                 "help(a.Contract)'`, or docs/contracts.md)")
    missing = [r["name"] for r in rows if not r["contract"]]
    if missing:
        lines.append(f"not available here, so not shown: {', '.join(missing)}")
    return "\n".join(lines)


def cmd_tokenizer(args) -> int:
    from bcr_verify.strategies import load_texts, load_tokenizer, prefix_stability

    tokenizer = load_tokenizer()
    texts = [t for family in ("system", "few_shot", "documents", "questions", "replies")
             for t in load_texts(family)]
    report = {"path": str(tokenizer.path), "sha256": tokenizer.sha256,
              "vocab_size": tokenizer.vocab_size,
              "bpe_prefix_stability": prefix_stability(tokenizer, texts, samples=args.samples,
                                                       seed=args.seed)}
    print(json.dumps(report, indent=2))
    return 0


def cmd_run(args) -> int:
    from bcr_verify.runner import RunConfig, run
    from bcr_verify.session import progress_printer

    config = RunConfig(
        implementations=args.impls, block_size=args.block_size, seed=args.seed,
        max_steps=None if args.minutes else args.max_steps, minutes=args.minutes,
        workload=args.workload, kv_replay=args.kv_replay, trace_dir=args.trace_dir,
        op_timeout=args.op_timeout, known=tuple(args.known or ()), strict_lru=args.strict_lru,
        events=args.events, shrink_seconds=args.shrink_seconds)
    show = None if args.quiet else progress_printer()
    args.pinned_cpu = pin_for_events(args)
    result = run(config, progress=show)
    with verdict_reached():
        return _report_run(args, result, show)


def _report_run(args, result, show) -> int:
    from bcr_verify.runner import write_json

    if show:
        show("", final=True)
    report = result.as_dict()
    if args.json:
        write_json(report, args.json)
    if args.pinned_cpu is not None:
        print(pinned_line(args.pinned_cpu))
    print_report(report)
    if result.failure is not None:
        print("\n" + result.failure.render())
        print(f"\ntrace saved: {result.trace_path}")
        print(f"reproduce with: bcr-verify replay {result.trace_path}")
        return EXIT_FINDING
    return EXIT_INTERRUPTED if result.interrupted else EXIT_PASS


def print_report(report: dict) -> None:
    print(f"implementations: {', '.join(report['implementations'])}")
    for name, why in report.get("not_run", {}).items():
        print(f"NOT RUN: {name} ({why})")
    print(f"block size {report['block_size']}, workload {report['workload']}, seed "
          f"{report['seed']}, kv replay {'on' if report['kv_replay_enabled'] else 'off'}")
    print(f"{report['steps']} steps in {report['examples']} examples, {report['seconds']} s "
          f"({report['steps_per_second']} steps/s); operations: {report['operations']}")
    if report.get("shrink_steps"):
        print(f"shrinking: {report['shrink_steps']} more steps in {report['shrink_examples']} "
              f"examples over {report['shrink_seconds']} s (not counted above)"
              + (", stopped at --shrink-seconds" if report.get("shrink_capped") else ""))
    header = f"{'implementation':<22}{'lookups':>8}{'hits':>7}{'hit rate':>9}{'evictions':>10}" \
             f"{'evicted tok':>12}{'dup freed':>10}{'dup kept':>9}{'refused':>8}"
    print(header)
    for name, s in report["implementations"].items():
        print(f"{name:<22}{s.get('lookups', 0):>8}{s.get('hits', 0):>7}{s.get('hit_rate', 0):>9.3f}"
              f"{s.get('evictions', 0):>10}{s.get('evicted_tokens', 0):>12}"
              f"{s.get('duplicates_freed', 0):>10}{s.get('duplicates_kept', 0):>9}"
              f"{s.get('refused', 0):>8}")
    if len(report["implementations"]) > 1:
        print(f"lanes compared with each other on {report.get('cross_lane_checks', 0)} lookups "
              "(where their contracts agree on the result)")
    if "kv_replay" in report:
        print(f"kv replay: {report['kv_replay']}")
    for line in events_lines(report.get("events")):
        print(line)
    for name, stats in report["implementations"].items():
        notes = stats.get("notes") or {}
        if notes.get("generation"):
            print(f"{name}: sglang {notes['release']}, API generation {notes['generation']}")
        elif notes.get("release"):
            print(f"{name}: release {notes['release']} on torch {notes.get('torch', '?')}")
        for standin in notes.get("stand_ins", []):
            print(f"{name}: stand-in used for {standin['package']} ({len(standin['names'])} "
                  "names read at import; listed in the JSON)")
        for invariant in notes.get("not_checked", []):
            print(f"{name}: not checked: {invariant}")
    from bcr_verify.shape import shape_line
    print(shape_line(report.get("tree_shape", {})))
    for name, r in report.get("lru_relaxations", {}).items():
        counts = ", ".join(f"{impl} {n}" for impl, n in r["count"].items())
        print(f"deviation from strict LRU, accepted: {name} ({counts}); a {r['steps']}-step "
              "witness is in the JSON report (--strict-lru refuses it)")
    for check, known in report.get("known", {}).items():
        print(f"KNOWN: {check} failed {known['count']} times (not a new finding; lanes restart "
              f"empty after each); witness: {known['trace']}")
    from bcr_verify.session import known_not_seen_line
    for check in report.get("known_not_seen", []):
        print(known_not_seen_line(check))
    for warning in report.get("vacuous_warnings", []):
        print(f"WARNING (pass may be vacuous): {warning}")
    for note in report.get("notes", []):
        print(f"note: {note}")
    print(verdict_line(report))


def events_lines(events: dict | None) -> list[str]:
    """What the events oracle checked, a line per lane (``run`` and ``soak`` reports)."""
    if not events:
        return []
    lines = [f"events {name}: {c.get('blocks_stored', 0):,} blocks stored, "
             f"{c.get('blocks_removed', 0):,} removed, {c.get('cleared', 0):,} flushes, "
             f"{c.get('extra_copies_stored', 0):,} extra copies; every one checked, and "
             f"{c.get('index_checks', 0):,} index / {c.get('dynamo_checks', 0):,} Dynamo "
             "lookups agreed" + _dynamo_note(c) for name, c in events.get("lanes", {}).items()]
    if events.get("no_event_stream"):
        lines.append(f"events: no stream from {', '.join(events['no_event_stream'])}")
    return lines


def _dynamo_note(counts: dict) -> str:
    """Dynamo's own share of a lane's event checks: a lookup repeated before the next event
    is answered from the last one, and each of the rest is a round trip to Dynamo's thread."""
    if not counts.get("dynamo_checks"):
        return ""
    rejected = counts.get("dynamo_rejected", 0)
    return (f" ({counts.get('dynamo_asked', 0):,} sent to Dynamo, the rest unchanged since "
            f"it last answered; {counts.get('dynamo_seconds', 0):.2f} s inside Dynamo"
            + (f"; {rejected:,} events it rejected" if rejected else "") + ")")


def verdict_line(report: dict) -> str:
    failure = report.get("failure")
    if failure:
        line = f"FAIL: {failure['kind']} in {failure['impl']} [{failure['check']}]"
        return line + (" (interrupted while shrinking)" if report.get("interrupted") else "")
    return "INTERRUPTED (not a pass: the run did not finish)" if report.get("interrupted") \
        else "PASS"


def report_death(args, death, command: str) -> int:
    """The parent's report when the supervised child died: trace from the journal, JSON."""
    from bcr_verify.provenance import provenance
    from bcr_verify.runner import write_json

    trace = death.trace(meta={"seed": getattr(args, "seed", None), "command": command})
    path = None
    if trace is not None and trace.steps and death.kind != "interrupted":
        path = str(trace.save(args.trace_dir))
    failure = None if death.kind == "interrupted" else death.failure()
    report = {
        "verdict": "interrupted" if failure is None else "fail", "ok": False,
        "interrupted": failure is None, "failure": failure, "trace": path,
        "note": "the process running the implementations died; the counts of what ran "
                "before were lost with it, the steps since its lanes were fresh were not",
        "provenance": provenance(list((death.origin or {}).get("implementations", []))),
    }
    if getattr(args, "json", None):
        write_json(report, args.json)
    if failure is None:
        print(f"INTERRUPTED: {death.how}")
        return EXIT_INTERRUPTED
    print(f"FAIL: {failure['kind']} in {failure['impl']} at step {failure['step']}: "
          f"{failure['detail']}")
    if trace is not None and path:
        print("\n" + trace.render())
        print(f"\ntrace saved: {path}")
        print(f"reproduce with: bcr-verify replay {path}")
    else:
        print("no trace: the process died before its first step")
    return EXIT_FINDING


def cmd_replay(args) -> int:
    """Replay each trace without Hypothesis, each in its own supervised process.

    Exit 1 if any still fails, 2 if one could not be read or replayed here, 130 when
    interrupted; one bad file never stops the others.
    """
    from bcr_verify.supervise import supervised
    from bcr_verify.trace import Trace

    worst = EXIT_PASS
    for path in args.traces:
        print(f"== {path}", flush=True)
        try:
            trace = Trace.load(path)
        except UsageError as exc:
            print(f"bcr-verify replay: error: {exc}", file=sys.stderr)
            worst = max(worst, EXIT_USAGE)
            continue
        if args.in_process:
            code = _execute(lambda: _replay_one(args, trace))
        else:
            code = supervised(lambda: _execute(lambda: _replay_one(args, trace)),
                              lambda death: _replay_death(death, trace), args.op_timeout)
        if code == EXIT_INTERRUPTED:
            return code
        worst = max(worst, code)
    return worst


def _replay_one(args, trace) -> int:
    from bcr_verify.errors import AdapterUnavailable
    from bcr_verify.provenance import provenance

    names = list(args.impls or trace.implementations)
    now = provenance(names)["implementations"]
    recorded = trace.versions or {}
    print(f"recorded on: {_versions(recorded) if recorded else 'unknown (an older trace)'}")
    print(f"replaying on: {_versions(now)}")
    try:
        text, failure = side_by_side(trace, implementations=args.impls,
                                     op_timeout=args.op_timeout)
    except AdapterUnavailable as exc:
        print(f"NOT RUN: {exc}")
        return EXIT_USAGE
    print(text)
    if failure is None:
        print("PASS: replayed cleanly, no divergence (fixed, or run on other implementations)")
        return EXIT_PASS
    same = _same_failure(failure.as_dict(), trace.failure)
    print(f"FAILS: {failure}" + (" (as recorded)" if same else ""))
    return EXIT_FINDING


def _replay_death(death, trace) -> int:
    if death.kind == "interrupted":
        print(f"INTERRUPTED: {death.how}")
        return EXIT_INTERRUPTED
    failure = death.failure()
    same = _same_failure(failure, trace.failure)
    print(trace.render())
    print(f"FAILS: {failure['kind']} in {failure['impl']} at step {failure['step']}: "
          f"{failure['detail']}" + (" (as recorded)" if same else ""))
    return EXIT_FINDING


def _same_failure(got: dict, recorded: dict | None) -> bool:
    return bool(recorded) and all(got.get(k) == recorded.get(k)
                                  for k in ("kind", "impl", "check", "step"))


def _versions(versions: dict) -> str:
    return ", ".join(f"{name}: {v}" for name, v in versions.items())


def side_by_side(trace, implementations=None, op_timeout=None) -> tuple[str, object]:
    """Replay ``trace`` and show its steps, one row each, one column per implementation.

    For lookups a cell shows the tokens matched and the last pages, otherwise cached blocks /
    free pages. The step that failed, and the implementation that failed it, are marked.
    Returns the text and the failure (None if it replayed cleanly). A step that does not
    apply here is a :class:`UsageError` naming it.
    """
    from bcr_verify.errors import FatalFinding, VerificationFailure
    from bcr_verify.guard import DEFAULT_OP_TIMEOUT
    from bcr_verify.session import build_lockstep
    from bcr_verify.trace import final_check

    names = list(implementations or trace.implementations)
    replayed = build_lockstep(names, trace.block_size, trace.capacity_pages,
                              kv_replay=trace.kv_replay, check_every=trace.check_every,
                              op_timeout=op_timeout or DEFAULT_OP_TIMEOUT,
                              strict_lru=trace.strict_lru, events=trace.events)
    seen: dict[str, tuple[int, list[int]]] = {}
    for lane in replayed.lanes:
        def spy(tokens, _match=lane.adapter.match, _name=lane.name):
            got = _match(tokens)
            seen[_name] = (got.length, list(got.pages))
            return got
        lane.adapter.match = spy
    header = [f"# block size {trace.block_size} | capacity {trace.capacity_pages} pages"
              f"{trace.cadence}"]
    rows = [["step", "operation", *[lane.name for lane in replayed.lanes]]]
    failure = None
    for i, step in enumerate(trace.steps):
        seen.clear()
        try:
            replayed.apply(step)
        except (VerificationFailure, FatalFinding) as exc:
            failure = exc
        except UsageError as exc:
            raise UsageError(f"step {i} ({step.get('op')}) does not apply here: {exc}") from None
        cells = []
        for lane in replayed.lanes:
            if lane.name in seen:
                length, pages = seen[lane.name]
                tail = ",".join(map(str, pages[-3:]))
                cell = f"{length} tok [..{tail}]" if pages else f"{length} tok"
            elif failure is not None:
                cell = "-"  # a failed lane may raise or hang again when asked
            else:
                cell = f"{len(lane.shadow)} cached/{lane.adapter.available_pages()} free"
            if failure is not None and failure.impl == lane.name:
                cell = f"FAIL {failure.check}: {cell}"
            cells.append(cell)
        rows.append([str(i), _step_text(step), *cells])
        if failure is not None:
            break
    if failure is None:
        failure = final_check(replayed)
        if failure is not None:
            rows.append(["end", "invariants", *[f"FAIL {failure.check}" if lane.name ==
                                                failure.impl else "" for lane in replayed.lanes]])
    widths = [min(48, max(len(r[c]) for r in rows)) for c in range(len(rows[0]))]
    lines = header + ["  ".join(cell[:w].ljust(w) for cell, w in zip(row, widths)).rstrip()
                      for row in rows]
    if failure is not None:
        f = failure.as_dict()
        lines.append(f"# {f['kind']} in {f['impl']} at step {f['step']} [{f['check']}]: "
                     f"{f['detail']}")
    return "\n".join(lines), failure


def _step_text(step: dict) -> str:
    args = []
    for key, value in step.get("args", {}).items():
        if key == "tokens" and isinstance(value, list):
            value = f"<{len(value)} tok>"
        args.append(f"{key}={value}")
    return f"{step['op']}({', '.join(args)})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bcr-verify", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Drive prefix (KV) cache implementations in lockstep with a reference "
                    "model, real-tokenizer workloads and invariant checks after every step.",
        epilog=EPILOG)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("impls", help="list implementations, available or not and why")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--workloads", action="store_true", help="list workload families instead")
    p.add_argument("--contracts", action="store_true",
                   help="show each implementation's declared contract: the options the model "
                        "judges it by (when blocks become matchable, hit cap, duplicates, ...)")
    p.set_defaults(func=cmd_impls)

    p = sub.add_parser("tokenizer", help="the real tokenizer in use, and how often BPE breaks "
                       "text prefixes (tokenize(A) not a prefix of tokenize(A+B))")
    p.add_argument("--samples", type=_positive_int("--samples"), default=500,
                   help="cut points to sample (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("run", help="lockstep verification under Hypothesis, with a report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    add_impl_args(p)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=_positive_int("--max-steps"), default=2000,
                        help="stop after this many lockstep steps (default 2000)")
    budget.add_argument("--minutes", type=_positive_float("--minutes"),
                        help="stop after this many minutes instead")
    p.add_argument("--kv-replay", action="store_true",
                   help="replay the KV behind every match through a tiny Qwen2 model")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON here")
    p.add_argument("--trace-dir", default="corpus/traces",
                   help="where a failure's trace is saved (default corpus/traces)")
    add_known_arg(p)
    p.add_argument("--strict-lru", action="store_true",
                   help="judge eviction by strict block-level LRU: an eviction legal only "
                        "under a relaxation the model accepts for radix trees (whole-node "
                        "over-eviction, split refresh) fails the run; by default each is "
                        "counted, with a witness trace")
    add_events_args(p)
    add_shrink_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_run, supervise=True)

    p = sub.add_parser("replay", help="re-run saved traces without Hypothesis",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES)
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace JSON files")
    p.add_argument("--impl", action="append", dest="impls", metavar="NAME",
                   help="replay on these implementations instead of the trace's own")
    add_fault_args(p)
    p.set_defaults(func=cmd_replay)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        from bcr_verify import preflight
        preflight.check(args)
    except UsageError as exc:
        print(f"bcr-verify {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    work = lambda: _execute(lambda: args.func(args), args.command)  # noqa: E731
    if getattr(args, "supervise", False) and not args.in_process:
        from bcr_verify.supervise import supervised
        return supervised(work, lambda death: report_death(args, death, args.command),
                          args.op_timeout)
    from bcr_verify import interrupts
    with interrupts.handling(signal.SIGINT, signal.SIGTERM):
        return work()


def _execute(work, command: str = "replay") -> int:
    """``work()``'s exit code, with every error mapped onto the exit-code contract."""
    try:
        return work()
    except UsageError as exc:
        print(f"bcr-verify {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - anything else is our own bug, and says so
        traceback.print_exc()
        print(f"bcr-verify {command}: internal error (exit 3): the traceback above is "
              "bcr_verify's own, not the implementation's; please report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
