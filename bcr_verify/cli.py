"""``bcr-verify``: the command line, a thin layer over :mod:`bcr_verify.runner` and friends.

Exit codes: 0 no divergence or violation found; 1 one was found (its trace is printed and
saved); 2 bad usage (the message names the argument).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EPILOG = """\
examples:
  bcr-verify impls                          which implementations can run here, and why not
  bcr-verify run                            every available implementation, 2000 steps
  bcr-verify run --impl reference --impl sglang-radix --block-size 1 --max-steps 5000
  bcr-verify run --impl my_pkg.cache:make --minutes 10 --json report.json
  bcr-verify replay corpus/traces/*.json    re-run saved failures, steps side by side

A divergence exits 1, prints the shrunk trace and saves it under --trace-dir; each failure ends
with the command that reproduces it.
"""

COMMAND_MODULES = ("bcr_verify.soak", "bcr_verify.bench", "bcr_verify.mutants")
"""Modules that add their own subcommand through ``register(subparsers)``."""


class UsageError(Exception):
    pass


def _positive(convert, name):
    """An argparse type: ``convert`` the text, then insist on a value above zero."""
    kind = "an integer" if convert is int else "a number"

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}" if convert is int
                                             else f"{name} must be > 0, got {value}")
        return value
    return parse


def _positive_int(name):
    return _positive(int, name)


def _positive_float(name):
    return _positive(float, name)


def add_impl_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs implementations."""
    parser.add_argument("--impl", action="append", dest="impls", metavar="NAME",
                        help="an implementation from `bcr-verify impls`, or module:attr naming a "
                             "factory that takes the block size; repeat for several "
                             "(default: every available one)")
    parser.add_argument("--block-size", type=_positive_int("--block-size"), default=16,
                        help="tokens per block / page (default 16; 1 = token granularity)")
    parser.add_argument("--workload", default="mixed",
                        help="prompt family from the real tokenizer (default mixed); see "
                             "`bcr-verify impls --workloads`")
    parser.add_argument("--seed", type=int, default=0, help="seed for a reproducible run")


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
                     "description": impl.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "available" if row["available"] else "unavailable"
        print(f"{row['name']:<22} {state:<12} {row['description']}")
        if row["reason"]:
            print(f"{'':<22} {'':<12} why: {row['reason']}")
    return 0


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
    from bcr_verify.runner import RunConfig, run, write_json
    from bcr_verify.session import progress_printer

    config = RunConfig(
        implementations=args.impls, block_size=args.block_size, seed=args.seed,
        max_steps=None if args.minutes else args.max_steps, minutes=args.minutes,
        workload=args.workload, kv_replay=args.kv_replay, trace_dir=args.trace_dir)
    show = None if args.quiet else progress_printer()
    result = run(config, progress=show)
    if args.json:
        write_json(result, args.json)
    print_report(result.as_dict())
    if not result.ok:
        print("\n" + result.failure.render())
        print(f"\ntrace saved: {result.trace_path}")
        print(f"reproduce with: bcr-verify replay {result.trace_path}")
        return 1
    return 0


def print_report(report: dict) -> None:
    print(f"implementations: {', '.join(report['implementations'])}")
    for name, why in report.get("not_run", {}).items():
        print(f"NOT RUN: {name} ({why})")
    print(f"block size {report['block_size']}, workload {report['workload']}, seed "
          f"{report['seed']}, kv replay {'on' if report['kv_replay_enabled'] else 'off'}")
    print(f"{report['steps']} steps in {report['examples']} examples, {report['seconds']} s "
          f"({report['steps_per_second']} steps/s); operations: {report['operations']}")
    header = f"{'implementation':<22}{'lookups':>8}{'hits':>7}{'hit rate':>9}{'evictions':>10}" \
             f"{'evicted tok':>12}{'dup freed':>10}"
    print(header)
    for name, s in report["implementations"].items():
        print(f"{name:<22}{s.get('lookups', 0):>8}{s.get('hits', 0):>7}{s.get('hit_rate', 0):>9.3f}"
              f"{s.get('evictions', 0):>10}{s.get('evicted_tokens', 0):>12}"
              f"{s.get('duplicates_freed', 0):>10}")
    if "kv_replay" in report:
        print(f"kv replay: {report['kv_replay']}")
    for warning in report.get("vacuous_warnings", []):
        print(f"WARNING (pass may be vacuous): {warning}")
    verdict = "PASS" if report["ok"] else f"FAIL: {report['failure']['kind']}"
    print(verdict)


def cmd_replay(args) -> int:
    """Replay each trace without Hypothesis; exit 1 if any still fails, 2 if one is unreadable."""
    from bcr_verify.errors import AdapterUnavailable
    from bcr_verify.trace import Trace, replay

    worst = 0
    for path in args.traces:
        trace = Trace.load(path)
        try:
            failure, lockstep = replay(trace, implementations=args.impls)
        except AdapterUnavailable as exc:
            print(f"== {path}\nNOT RUN: {exc}")
            worst = max(worst, 2)
            continue
        print(f"== {path}")
        print(side_by_side(trace, lockstep, implementations=args.impls))
        if failure is None:
            print("PASS: replayed cleanly, no divergence (fixed, or run on other implementations)")
        else:
            print(f"FAILS: {failure}")
            worst = max(worst, 1)
    return worst


def side_by_side(trace, lockstep=None, implementations=None) -> str:
    """The trace's steps, one row each, with one column per implementation.

    Replays ``trace`` afresh (deterministic) to see what each implementation did at each step:
    for lookups the tokens matched and the last pages, otherwise cached blocks / free pages.
    The step that failed, and the implementation that failed it, are marked.
    """
    from bcr_verify.errors import VerificationFailure
    from bcr_verify.session import build_lockstep

    names = list(implementations or trace.implementations)
    replayed = build_lockstep(names, trace.block_size, trace.capacity_pages,
                              kv_replay=trace.kv_replay)
    seen: dict[str, tuple[int, list[int]]] = {}
    for lane in replayed.lanes:
        def spy(tokens, _match=lane.adapter.match, _name=lane.name):
            got = _match(tokens)
            seen[_name] = (got.length, list(got.pages))
            return got
        lane.adapter.match = spy
    header = [f"# block size {trace.block_size} | capacity {trace.capacity_pages} pages"]
    rows = [["step", "operation", *[lane.name for lane in replayed.lanes]]]
    failure = None
    for i, step in enumerate(trace.steps):
        seen.clear()
        try:
            replayed.apply(step)
        except VerificationFailure as exc:
            failure = exc
        cells = []
        for lane in replayed.lanes:
            if lane.name in seen:
                length, pages = seen[lane.name]
                tail = ",".join(map(str, pages[-3:]))
                cell = f"{length} tok [..{tail}]" if pages else f"{length} tok"
            else:
                cell = f"{len(lane.shadow)} cached/{lane.adapter.available_pages()} free"
            if failure is not None and failure.impl == lane.name:
                cell = f"FAIL {failure.check}: {cell}"
            cells.append(cell)
        rows.append([str(i), _step_text(step), *cells])
        if failure is not None:
            break
    widths = [min(48, max(len(r[c]) for r in rows)) for c in range(len(rows[0]))]
    lines = header + ["  ".join(cell[:w].ljust(w) for cell, w in zip(row, widths)).rstrip()
                      for row in rows]
    if failure is not None:
        lines.append(f"# {failure.kind} in {failure.impl} at step {failure.step} "
                     f"[{failure.check}]: {failure.detail}")
    elif len(trace.steps) + 1 != len(rows):
        lines.append("# stopped early")
    return "\n".join(lines)


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("impls", help="list implementations, available or not and why")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--workloads", action="store_true", help="list workload families instead")
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
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="re-run saved traces without Hypothesis")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace JSON files")
    p.add_argument("--impl", action="append", dest="impls", metavar="NAME",
                   help="replay on these implementations instead of the trace's own")
    p.set_defaults(func=cmd_replay)

    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"bcr-verify {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
