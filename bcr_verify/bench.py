"""``bcr-verify bench``: head-to-head per-operation latency and hit rate on the same workload.

Every implementation gets the identical request stream (seeded): a request matches its prompt,
locks the matched prefix, allocates pages for the rest (evicting when short), is inserted and
unlocked; up to ``concurrency`` requests run at once, plus plain lookups. Each runs in its own
single-lane :class:`~bcr_verify.lockstep.Lockstep` with invariant checks off, so explicit-
eviction caches get their victims chosen and results are still compared with the model, but
only the time spent *inside the implementation's own calls* is measured (each call timed
with ``perf_counter_ns``), so the harness's bookkeeping does not count.

Workloads: "shared-system" (groups sharing a ~500-token system prompt) and "disjoint"
(unrelated chats sharing only the chat header), both real-tokenizer prompts; then a sweep of
synthetic prompts whose shared-prefix share goes from 0.1 to 0.9. Pools are sized to half the
distinct blocks of the workload (plus its longest prompt), so hits and evictions both happen.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

OPS = ("match", "insert", "lock", "unlock", "evict")
METHOD_OP = {"match": "match", "insert": "insert", "lock": "lock", "unlock": "unlock",
             "evict_tokens": "evict", "evict_value": "evict"}
WORKLOADS = ("shared-system", "disjoint")
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class LatencyRecorder:
    def __init__(self):
        self.ns: dict[str, list[int]] = {op: [] for op in OPS}

    def wrap(self, adapter) -> None:
        clock = time.perf_counter_ns
        for method, op in METHOD_OP.items():
            original = getattr(adapter, method, None)
            if original is None:
                continue
            bucket = self.ns[op]

            def timed(*args, _original=original, _bucket=bucket, **kwargs):
                t = clock()
                try:
                    return _original(*args, **kwargs)
                finally:
                    _bucket.append(clock() - t)
            setattr(adapter, method, timed)

    def summary(self) -> dict:
        out = {}
        for op, values in self.ns.items():
            if not values:
                out[op] = {"n": 0, "p50_us": None, "p99_us": None}
                continue
            values = sorted(values)
            out[op] = {"n": len(values), "p50_us": round(values[len(values) // 2] / 1000, 2),
                       "p99_us": round(values[min(len(values) - 1, int(len(values) * 0.99))]
                                       / 1000, 2),
                       "mean_us": round(statistics.fmean(values) / 1000, 2)}
        return out


def drive(impl: str, prompts: list[list[int]], block_size: int, capacity: int,
          requests: int, seed: int, concurrency: int = 4) -> dict:
    """The seeded request stream through one implementation; latencies and hit rate."""
    from bcr_verify.session import build_lockstep

    lockstep = build_lockstep([impl], block_size, capacity, check_every=0)
    lane = lockstep.lanes[0]
    recorder = LatencyRecorder()
    recorder.wrap(lane.adapter)
    rng = random.Random(seed)
    running: list[int] = []
    start = time.perf_counter()
    for _ in range(requests):
        tokens = rng.choice(prompts)
        if rng.random() < 0.2:
            lockstep.match(tokens)
        rid = lockstep.begin(tokens)
        if rid is not None:
            running.append(rid)
        while len(running) > (concurrency if rid is not None else 0):
            lockstep.finish(running.pop(rng.randrange(len(running))))
        if len(lockstep.steps) > 10_000:
            lockstep.steps.clear()
    for rid in running:
        lockstep.finish(rid)
    lockstep.check()  # the run was valid: final structure and sizes against the model
    seconds = time.perf_counter() - start
    stats = lane.stats.as_dict()
    return {"impl": lane.name, "requests": requests, "seconds": round(seconds, 3),
            "hit_rate": stats["hit_rate"], "evictions": stats["evictions"],
            "rejected": lockstep.rejected, "latency": recorder.summary()}


def overlap_prompts(ratio: float, seed: int, count: int = 48, length: int = 512,
                    groups: int = 4, vocab: int = 151643) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens; the first ``ratio`` of each is one of
    ``groups`` shared prefixes, the rest unique."""
    rng = random.Random(f"overlap:{seed}")
    shared_len = round(ratio * length)
    prefixes = [[rng.randrange(vocab) for _ in range(shared_len)] for _ in range(groups)]
    return [prefixes[i % groups] + [rng.randrange(vocab) for _ in range(length - shared_len)]
            for i in range(count)]


def pool_capacity(prompts: list[list[int]], block_size: int) -> int:
    """Half the distinct blocks the pool would cache, plus room for its longest prompt: every
    prompt fits, but not all of them at once, so both hits and evictions happen."""
    import math

    distinct = set()
    for p in prompts:
        for k in range(1, len(p) // block_size + 1):
            distinct.add(hash(tuple(p[:k * block_size])))
    longest = max(math.ceil(len(p) / block_size) for p in prompts)
    return len(distinct) // 2 + longest + 4


def bench(impls: list[str] | None = None, block_size: int = 16, requests: int = 2000,
          sweep_requests: int = 600, seed: int = 0, workloads=WORKLOADS, ratios=RATIOS,
          progress=None) -> dict:
    from bcr_verify.runner import select_implementations
    from bcr_verify.strategies import build_workload, load_tokenizer

    chosen, not_run = select_implementations(impls, block_size)
    tokenizer = load_tokenizer()
    report = {"implementations": chosen, "not_run": not_run, "block_size": block_size,
              "requests": requests, "sweep_requests": sweep_requests, "seed": seed,
              "workloads": {}, "overlap_sweep": {}}
    def drive_all(label: str, pool: list[list[int]], count: int) -> tuple[int, dict]:
        """Every chosen implementation on the same ``pool``; (pool pages, rows by impl)."""
        capacity = pool_capacity(pool, block_size)
        rows = {}
        for impl in chosen:
            if progress:
                progress(f"{label}: {impl}")
            rows[impl] = drive(impl, pool, block_size, capacity, count, seed)
        return capacity, rows

    for workload in workloads:
        pool = build_workload(workload, tokenizer, seed=seed)
        capacity, rows = drive_all(workload, pool, requests)
        report["workloads"][workload] = {"capacity_pages": capacity, "pool": len(pool),
                                         "results": rows}
    for ratio in ratios:
        _, report["overlap_sweep"][str(ratio)] = drive_all(
            f"overlap {ratio}", overlap_prompts(ratio, seed), sweep_requests)
    try:
        import os
        report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return report


def markdown(report: dict) -> str:
    lines = []
    for workload, section in report["workloads"].items():
        lines.append(f"**{workload}** ({report['requests']} requests, pool of {section['pool']} "
                     f"prompts, {section['capacity_pages']} pages of {report['block_size']} "
                     "tokens); latency in µs, p50 / p99")
        lines.append("")
        lines.append("| implementation | match | insert | lock | unlock | evict | hit rate |")
        lines.append("|---|---|---|---|---|---|---|")
        for impl, r in section["results"].items():
            cells = []
            for op in OPS:
                s = r["latency"][op]
                cells.append("-" if not s["n"] else f"{s['p50_us']} / {s['p99_us']}")
            lines.append(f"| {impl} | " + " | ".join(cells) + f" | {r['hit_rate']:.3f} |")
        lines.append("")
    if report["overlap_sweep"]:
        impls = report["implementations"]
        lines.append(f"**prefix-overlap sweep** ({report['sweep_requests']} requests of 512 "
                     "tokens per point; hit rate, then match p50 µs)")
        lines.append("")
        lines.append("| overlap | " + " | ".join(f"{i} hit | {i} match p50" for i in impls) + " |")
        lines.append("|---|" + "---|---|" * len(impls))
        for ratio, rows in report["overlap_sweep"].items():
            cells = []
            for i in impls:
                cells += [f"{rows[i]['hit_rate']:.3f}", f"{rows[i]['latency']['match']['p50_us']}"]
            lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, why in report.get("not_run", {}).items():
        lines.append(f"NOT RUN: {name} ({why})")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = report["implementations"]
    workloads = list(report["workloads"])
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(6 * (len(workloads) + 1), 4.5))
    width = 0.8 / max(1, len(impls))
    for ax, workload in zip(axes, workloads):
        results = report["workloads"][workload]["results"]
        for k, impl in enumerate(impls):
            lat = results[impl]["latency"]
            p50 = [lat[op]["p50_us"] or 0 for op in OPS]
            p99 = [lat[op]["p99_us"] or 0 for op in OPS]
            xs = [i + k * width for i in range(len(OPS))]
            ax.bar(xs, p50, width, label=f"{impl} (hit {results[impl]['hit_rate']:.2f})")
            ax.scatter(xs, p99, marker="_", color="black", s=60)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(OPS))], OPS)
        ax.set_yscale("log")
        ax.set_ylabel("µs (bar p50, tick p99)")
        ax.set_title(workload)
        ax.legend(fontsize=7)
    ax = axes[-1]
    ratios = [float(r) for r in report["overlap_sweep"]]
    for impl in impls:
        ax.plot(ratios, [report["overlap_sweep"][str(r)][impl]["latency"]["match"]["p50_us"]
                         for r in ratios], marker="o", label=f"{impl} match p50")
    ax.set_xlabel("prefix-overlap ratio")
    ax.set_ylabel("match p50 (µs)")
    ax2 = ax.twinx()
    first = impls[0]
    ax2.plot(ratios, [report["overlap_sweep"][str(r)][first]["hit_rate"] for r in ratios],
             color="gray", linestyle="--", label="hit rate")
    ax2.set_ylabel("token hit rate (dashed)")
    ax.set_title("overlap sweep")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cmd_bench(args) -> int:
    from bcr_verify.session import progress_printer

    workloads = (args.workload,) if args.workload else WORKLOADS
    ratios = () if args.no_sweep else RATIOS
    show = None if args.quiet else progress_printer()
    report = bench(args.impls, args.block_size, args.requests, args.sweep_requests, args.seed,
                   workloads=workloads, ratios=ratios, progress=show)
    if show:
        show("", final=True)
    text = markdown(report)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def register(subparsers) -> None:
    from bcr_verify.cli import _positive_int, add_impl_args

    p = subparsers.add_parser("bench", help="per-operation p50/p99 latency and hit rate for "
                              "every implementation on the same workloads, plus an overlap sweep")
    add_impl_args(p, faults=False)
    p.set_defaults(workload=None)
    p.add_argument("--requests", type=_positive_int("--requests"), default=2000,
                   help="requests per implementation and workload (default 2000)")
    p.add_argument("--sweep-requests", type=_positive_int("--sweep-requests"), default=600,
                   help="requests per implementation and overlap ratio (default 600)")
    p.add_argument("--no-sweep", action="store_true", help="skip the overlap sweep")
    p.add_argument("--json", metavar="PATH", help="write the full report here")
    p.add_argument("--markdown", metavar="PATH", help="write the tables here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG here")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_bench)
