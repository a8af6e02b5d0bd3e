"""Where a soak's wall time goes, and what its overhead ratio would be if judging were free.

The soak reports one figure, wall time ÷ time inside the lanes' adapter calls
(docs/benchmarks.md §4.1). This script says what the rest is: it runs an in-process soak of
the four lanes under ``py-spy record --native`` and sorts every sample of the soak's loop
by where it was:

* ``implementations``: inside a guarded adapter call (what the ratio divides by);
* ``self-checks``: inside a guarded ``check_invariants`` or ``sizes``;
* ``model``: the lanes' reference models judging (compiled or not), outside any guarded call;
* ``collector``: Python's garbage collector, outside any guarded call;
* ``guard``: the guard's wrapper around the calls, outside the timed part;
* ``lockstep`` and ``soak``: the rest, by the innermost bcr_verify frame.

It prints each share, the ratio from the samples, and the ratio with the ``model`` share
taken out: the floor for any faster oracle, since the rest is harness that a faster model
leaves as it is. ``py-spy`` comes from PyPI into a scratch venv the first time.

    .venv/bin/python ci/overhead_profile.py [--ops 40000] [--keep profile.raw]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANES = ("reference", "sglang-radix", "sglang-unified-py", "sglang-unified-rust")
CHECKS = (".check_invariants", ".sizes")
TOOLS = Path(tempfile.gettempdir()) / "bcr-verify-tools"


def py_spy() -> str:
    found = shutil.which("py-spy") or (TOOLS / "bin" / "py-spy")
    if Path(found).exists():
        return str(found)
    print(f"overhead_profile: installing py-spy into {TOOLS}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
    subprocess.run([str(TOOLS / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    return str(TOOLS / "bin" / "py-spy")


def lines_of(path: Path, function: str, want) -> range:
    """The line range of the first node that ``want`` accepts in ``function`` of ``path``."""
    tree = ast.parse(path.read_text())
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    node = next(n for n in ast.walk(body) if want(n))
    return range(node.lineno, node.end_lineno + 1)


def where(frame: str) -> tuple[str, str, int]:
    """``'func (file:line)'`` as (function, file, line); line 0 where py-spy gave none."""
    func, _, rest = frame.rpartition(" (")
    file, _, line = rest.rstrip(")").rpartition(":")
    return func, file, int(line) if line.isdigit() else 0


def loop_lines() -> range:
    """The soak's loop: samples elsewhere in ``soak`` are its set-up and its report."""
    return lines_of(ROOT / "bcr_verify/soak.py", "soak", lambda n: isinstance(n, ast.While))


def timed_lines() -> range:
    """The guard's call of the adapter method, inside the two clock reads the ratio uses."""
    return lines_of(ROOT / "bcr_verify/guard.py", "_guarded", lambda n: (
        isinstance(n, ast.Return) and isinstance(n.value, ast.Call)
        and getattr(n.value.func, "id", "") == "original"))


def classify(raw: Path) -> Counter:
    soak_loop, timed = loop_lines(), timed_lines()
    shares: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [where(f) for f in stack.split(";")]
        in_loop = any(func == "soak" and file.endswith("bcr_verify/soak.py")
                      and lineno in soak_loop for func, file, lineno in frames)
        if not in_loop:
            continue
        guarded = [i for i, (func, file, _) in enumerate(frames)
                   if func == "_guarded.<locals>.call" and file.endswith("bcr_verify/guard.py")]
        if guarded and frames[guarded[-1]][2] in timed:
            method = next((func for func, file, _ in frames[guarded[-1] + 1:]
                           if file.endswith(".py")), "")
            kind = "self-checks" if method.endswith(CHECKS) else "implementations"
        elif any("__native_reference" in file or file.endswith("bcr_verify/models/reference.py")
                 for _, file, _ in frames):
            kind = "model"
        elif any(func == "gc_collect_main" for func, _, _ in frames):
            kind = "collector"
        elif guarded:
            kind = "guard"
        else:
            ours = [file for _, file, _ in frames if "bcr_verify/" in file]
            kind = Path(ours[-1]).stem if ours else "other"
        shares[kind] += int(count)
    return shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=40000, help="soak operations (40000)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples a second (200)")
    parser.add_argument("--keep", metavar="PATH", help="keep py-spy's raw profile here")
    args = parser.parse_args()
    if args.ops < 1000:
        parser.error(f"--ops: need at least 1000 for a profile worth reading, got {args.ops}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(args.keep or os.path.join(tmp, "profile.raw"))
        report = Path(tmp) / "soak.json"
        command = [py_spy(), "record", "--native", "-r", str(args.rate), "-f", "raw",
                   "-o", str(raw), "--", sys.executable, "-m", "bcr_verify.cli", "soak",
                   "--ops", str(args.ops), "--in-process", "--quiet", "--json", str(report),
                   "--trace-dir", tmp, *[a for lane in LANES for a in ("--impl", lane)]]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0 or not report.exists():
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
            print(f"overhead_profile: the profiled soak failed (exit {done.returncode})",
                  file=sys.stderr)
            return 1
        soak_ratio = json.loads(report.read_text())["overhead"]["ratio_wall_to_raw_ops"]
        shares = classify(raw)
    loop, impl = sum(shares.values()), shares["implementations"]
    if not impl:
        print("overhead_profile: no sample fell inside an implementation call", file=sys.stderr)
        return 1
    for kind, n in shares.most_common():
        print(f"{kind:>16} {100 * n / loop:5.1f} %  ({n} samples)")
    print(f"ratio: the soak's own {soak_ratio}x; from the samples {loop / impl:.3f}x; "
          f"with the model free {(loop - shares['model']) / impl:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
