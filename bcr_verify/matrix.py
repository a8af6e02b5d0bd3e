"""``bcr-verify matrix`` and ``bcr-verify bisect``: one campaign, or one trace, across releases.

The matrix runs the same ``bcr-verify run`` (seed, steps, workload, block sizes) or the same
``bcr-verify replay`` inside each release's own venv (:mod:`bcr_verify.releases`), with that
release's real allocator and its own API generation, and gathers each run's JSON into one
table (release x block size x verdict x check x shrunk trace), a JSON report and a PNG. A
release that cannot be set up, or that cannot page at a block size, is a row saying why.

``bisect`` replays one saved trace across the releases between a good and a bad one and names
the first release where the verdict changes, with the verdict of every release it tried.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from bcr_verify.releases import ReleaseUnavailable, ensure, select

DEFAULT_IMPLS = ["reference", "sglang-radix"]


def run_in_release(release: str, args: list[str], timeout: float, progress=None):
    """``bcr-verify ARGS`` inside ``release``'s venv: (exit code, stdout + stderr)."""
    python = ensure(release, progress)
    try:
        done = subprocess.run([str(python), "-m", "bcr_verify.cli", *args], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"no result within {timeout:g} s"
    return done.returncode, done.stdout + done.stderr


def campaign_row(release: str, block_size: int, options, workdir: Path, progress=None) -> dict:
    row = {"release": release, "block_size": block_size}
    report = workdir / f"{release}-bs{block_size}.json"
    traces = Path(options.trace_dir) / f"sglang-{release}"
    args = ["run", "--quiet", "--block-size", str(block_size), "--seed", str(options.seed),
            "--max-steps", str(options.max_steps), "--workload", options.workload,
            "--json", str(report), "--trace-dir", str(traces)]
    for impl in options.impls or DEFAULT_IMPLS:
        args += ["--impl", impl]
    for check in options.known or ():
        args += ["--known", check]
    if options.events:
        args.append("--events")
    start = time.monotonic()
    try:
        code, output = run_in_release(release, args, options.timeout, progress)
    except ReleaseUnavailable as exc:
        return {**row, "verdict": "not set up", "why": str(exc)}
    row["seconds"] = round(time.monotonic() - start, 1)
    row["exit"] = code
    if code == 2:
        why = next((l for l in output.splitlines() if "error:" in l), output.strip()[-300:])
        return {**row, "verdict": "unavailable", "why": why}
    if code is None or not report.is_file():
        return {**row, "verdict": "harness error", "why": output.strip()[-500:]}
    data = json.loads(report.read_text())
    # a child that died (crash, native hang) leaves a report without per-implementation stats
    radix = next((v for k, v in data.get("implementations", {}).items()
                  if k.startswith("sglang")), {})
    notes = radix.get("notes", {})
    failure = data.get("failure") or {}
    trace_steps = None
    if data.get("trace"):
        trace_steps = len(json.loads(Path(data["trace"]).read_text())["steps"])
    return {**row, "verdict": data["verdict"], "check": failure.get("check"),
            "failure": failure or None, "trace": data.get("trace"), "trace_steps": trace_steps,
            "steps": data.get("steps"), "hits": radix.get("hits"),
            "evictions": radix.get("evictions"), "generation": notes.get("generation"),
            "stand_ins": notes.get("stand_ins", []), "not_checked": notes.get("not_checked", []),
            "known": data.get("known", {}), "known_not_seen": data.get("known_not_seen", []),
            "vacuous_warnings": data.get("vacuous_warnings", [])}


def replay_row(release: str, trace: str, options, progress=None) -> dict:
    try:
        code, output = run_in_release(release, ["replay", trace], options.timeout, progress)
    except ReleaseUnavailable as exc:
        return {"release": release, "verdict": "not set up", "why": str(exc)}
    verdict = {0: "pass", 1: "fail"}.get(code, "error")
    line = next((l for l in output.splitlines() if l.startswith(("FAILS", "PASS"))), "")
    return {"release": release, "verdict": verdict, "exit": code, "detail": line}


def table(rows: list[dict]) -> str:
    lines = ["| release | generation | block size | verdict | check | shrunk trace | steps | "
             "hits | evictions | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = []
        notes += [f"stand-in: {s['package']}" for s in r.get("stand_ins", [])]
        notes += [f"not checked: {n.split(' (')[0]}" for n in r.get("not_checked", [])]
        notes += [f"known: {k} x{v['count']}" for k, v in r.get("known", {}).items()]
        notes += [f"known, not seen: {k}" for k in r.get("known_not_seen", [])]
        notes += [f"may be vacuous: {w.split(', so ')[0]}" for w in r.get("vacuous_warnings", [])]
        if r.get("why"):
            notes.append(r["why"][:160])
        trace = f"{r['trace_steps']} steps: {Path(r['trace']).name}" if r.get("trace") else "-"
        lines.append(
            f"| {r['release']} | {r.get('generation') or '-'} | {r.get('block_size', '-')} | "
            f"{r['verdict']} | {r.get('check') or '-'} | {trace} | {r.get('steps', '-')} | "
            f"{r.get('hits', '-')} | {r.get('evictions', '-')} | {'; '.join(notes) or '-'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    releases = list(dict.fromkeys(r["release"] for r in rows))
    sizes = sorted({r["block_size"] for r in rows if "block_size" in r})
    colours = {"pass": "#4caf50", "fail": "#e53935", "unavailable": "#bdbdbd",
               "not set up": "#9e9e9e", "harness error": "#000000", "interrupted": "#ff9800"}
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(releases), 1.2 + 0.6 * len(sizes)))
    for r in rows:
        x, y = releases.index(r["release"]), sizes.index(r["block_size"])
        ax.add_patch(plt.Rectangle((x, y), 0.95, 0.9, color=colours.get(r["verdict"], "#607d8b")))
        label = (r.get("check") or r["verdict"]).replace(" ", "\n", 1)
        ax.text(x + 0.47, y + 0.45, label, ha="center", va="center", fontsize=6,
                color="white" if r["verdict"] == "fail" else "black")
    ax.set_xlim(0, len(releases))
    ax.set_ylim(0, len(sizes))
    ax.set_xticks([i + 0.47 for i in range(len(releases))], releases, rotation=45, fontsize=7)
    ax.set_yticks([i + 0.45 for i in range(len(sizes))], [f"bs {s}" for s in sizes], fontsize=7)
    ax.set_title("bcr-verify matrix: sglang-radix vs the model, per release", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_matrix(args) -> int:
    from bcr_verify.runner import write_json
    from bcr_verify.session import progress_printer

    show = progress_printer()
    releases = select(args.releases)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bcr-matrix-") as tmp:
        for release in releases:
            if args.trace:
                show(f"sglang {release}: replaying {args.trace}", final=True)
                rows.append(replay_row(release, args.trace, args, show))
                continue
            for block_size in args.block_sizes or [1, 4]:
                show(f"sglang {release}, block size {block_size}: {args.max_steps} steps",
                     final=True)
                row = campaign_row(release, block_size, args, Path(tmp), show)
                show(f"sglang {release}, block size {block_size}: {row['verdict']}"
                     + (f" [{row.get('check')}]" if row.get("check") else ""), final=True)
                rows.append(row)
    if args.trace:
        for r in rows:
            print(f"{r['release']:<14} {r['verdict']:<10} {r.get('detail') or r.get('why', '')}")
    else:
        print(table(rows))
        if args.plot:
            plot(rows, args.plot)
            print(f"plot: {args.plot}")
    if args.json:
        from bcr_verify.provenance import provenance
        write_json({"releases": releases, "rows": rows,
                    "provenance": provenance([], releases=args.releases, seed=args.seed,
                                             max_steps=args.max_steps,
                                             block_sizes=args.block_sizes or [1, 4])}, args.json)
    return 1 if any(r["verdict"] == "fail" for r in rows) else 0


def bisect(trace: str, releases: list[str], verdict_of) -> tuple[str | None, dict]:
    """The first release in ``releases`` (oldest first) whose verdict differs from the first's,
    by binary search; and the verdict of every release tried. Assumes one change."""
    tried = {releases[0]: verdict_of(releases[0]), releases[-1]: verdict_of(releases[-1])}
    if tried[releases[0]] == tried[releases[-1]]:
        return None, tried
    low, high = 0, len(releases) - 1  # verdict(low) == first, verdict(high) != first
    while high - low > 1:
        mid = (low + high) // 2
        tried[releases[mid]] = verdict_of(releases[mid])
        if tried[releases[mid]] == tried[releases[0]]:
            low = mid
        else:
            high = mid
    return releases[high], tried


def cmd_bisect(args) -> int:
    from bcr_verify.adapters.sglang_api import release_tuple
    from bcr_verify.errors import UsageError
    from bcr_verify.releases import known_releases
    from bcr_verify.session import progress_printer

    show = progress_printer()
    ends = sorted([args.good, args.bad], key=release_tuple)
    releases = [r for r in known_releases()
                if release_tuple(ends[0]) <= release_tuple(r) <= release_tuple(ends[1])]
    for end in (args.good, args.bad):
        if end not in releases:
            raise UsageError(f"no recipe for sglang {end!r}; known: {', '.join(known_releases())}")

    def verdict_of(release):
        show(f"sglang {release}: replaying", final=True)
        row = replay_row(release, args.trace, args, show)
        show(f"sglang {release}: {row['verdict']} {row.get('detail') or row.get('why', '')}",
             final=True)
        return row["verdict"]

    first, tried = bisect(args.trace, releases, verdict_of)
    for release in sorted(tried, key=release_tuple):
        print(f"{release:<14} {tried[release]}")
    if first is None:
        print(f"no change: {args.good} and {args.bad} both {tried[args.good]}")
        return 1
    before = releases[releases.index(first) - 1]
    print(f"first release where the verdict changes: {first} ({tried[before]} in {before}, "
          f"{tried[first]} in {first})")
    return 0


def register(subparsers) -> None:
    import argparse

    from bcr_verify.cli import EXIT_CODES, _positive_float, _positive_int

    p = subparsers.add_parser(
        "matrix", help="the same campaign (or trace) in a venv per SGLang release: table, "
        "JSON, PNG", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
            "examples:\n  bcr-verify matrix --releases 0.4.3,0.5.5,0.5.23 --max-steps 2000\n"
            "  bcr-verify matrix --releases 0.5.3..0.5.9 --trace corpus/traces/X.json\n\n"
            "Venvs are built once under .venvs/ from requirements/releases/ (run from a "
            "checkout).\n\n" + EXIT_CODES))
    p.add_argument("--releases", required=True, metavar="SPEC",
                   help="0.4.3,0.5.5 or 0.5.3..0.5.9 or all (releases with a recipe)")
    p.add_argument("--block-size", action="append", dest="block_sizes",
                   type=_positive_int("--block-size"), metavar="N",
                   help="repeatable (default 1 and 4)")
    p.add_argument("--impl", action="append", dest="impls", metavar="NAME",
                   help=f"implementations in each run (default {' '.join(DEFAULT_IMPLS)})")
    p.add_argument("--max-steps", type=_positive_int("--max-steps"), default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", default="mixed")
    p.add_argument("--known", action="append", metavar="CHECK",
                   help="a check known to fail: counted, one witness kept, search goes on")
    p.add_argument("--events", action="store_true",
                   help="check each release's KV-cache events too (published from 0.4.8 on; "
                        "an earlier release is a row saying it has none)")
    p.add_argument("--trace", metavar="TRACE", help="replay this trace instead of a campaign")
    p.add_argument("--timeout", type=_positive_float("--timeout"), default=1800.0,
                   help="seconds one release's run may take (default 1800)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    p.add_argument("--trace-dir", default="reports/matrix",
                   help="traces go to DIR/sglang-<release>/ (default reports/matrix)")
    p.set_defaults(func=cmd_matrix)

    p = subparsers.add_parser(
        "bisect", help="replay a trace across releases: the first one whose verdict changes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  bcr-verify bisect corpus/traces/X.json --good 0.5.9 --bad 0.5.3\n")
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--good", required=True, metavar="REL")
    p.add_argument("--bad", required=True, metavar="REL")
    p.add_argument("--timeout", type=_positive_float("--timeout"), default=600.0)
    p.set_defaults(func=cmd_bisect)
