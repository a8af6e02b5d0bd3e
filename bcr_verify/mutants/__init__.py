"""Bug-finding scorecard: realistic bugs planted in SGLang's and vLLM's caches and in a BCR-like
cache.

Each mutant is a small, documented variant (see ``docs/mutants.md``) usable as ``--impl
bcr_verify.mutants.<module>:<factory>``. ``bcr-verify mutants`` runs each one alone under the
lockstep machine (Hypothesis, the CI budget: chunks of 10 examples x 50 steps until a failure or
``--seconds``), then shrinks the failure further by delta-debugging (:mod:`bcr_verify.shrink`),
and prints whether it was caught, by which check, the time to detection and the shrunk trace
length. Misses are listed as misses.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    impl: str
    bug_class: str
    description: str
    block_size: int = 16
    workload: str = "mixed"
    kv_replay: bool = False


R = "bcr_verify.mutants.radix:"
B = "bcr_verify.mutants.blockhash:"
V = "bcr_verify.mutants.vllm:"

MUTANTS: list[Mutant] = [
    Mutant("v1-state-leak", B + "state_leak", "BCR v1: state never reclaimed on evict",
           "evict tombstones the value and unlinks the state but never frees its slot",
           workload="disjoint"),
    Mutant("v1-symbol-collision", B + "symbol_collision",
           "BCR v1: truncated block symbol, no collision check",
           "block symbol truncated (4 bits here; 64 in v1) and edges trusted by symbol alone",
           workload="disjoint"),
    Mutant("v1-edge-scan", B + "edge_scan", "BCR v1: O(E) edge scan documented as O(1)",
           "every block lookup scans the whole edge list; no index above the threshold",
           workload="disjoint"),
    Mutant("v1-no-writer-guard", B + "no_writer_guard",
           "BCR v1: 'lock-free' with no single-writer guard",
           "claims concurrent writers are safe; check-then-link insert with no guard",
           workload="disjoint"),
    Mutant("lock-parent", R + "lock_parent", "lock does not protect the matched node",
           "inc/dec_lock_ref walk from the matched node's parent"),
    Mutant("unbalanced-unlock", R + "unbalanced_unlock", "unbalanced reference counts",
           "dec_lock_ref starts one node up: the deepest node's lock_ref never returns to 0"),
    Mutant("aliased-indices", R + "aliased_indices",
           "cached indices alias the caller's tensor",
           "a new node keeps a view of the caller's value row instead of a copy"),
    Mutant("split-shared-storage", R + "split_storage", "split halves share storage",
           "_split_node slices without .clone(): both halves view one storage"),
    Mutant("size-drift", R + "size_drift", "size counters drift",
           "_delete_leaf subtracts the length in pages, not tokens, from evictable_size_"),
    Mutant("page-units", R + "page_units", "page-size unit confusion",
           "evict(num_tokens) frees num_tokens // page_size tokens"),
    Mutant("stale-memo", B + "stale_memo", "stale slots after eviction and reuse",
           "a memo of recent match results survives evict; repeated prompts get freed, reused "
           "pages", workload="disjoint", kv_replay=True),
    Mutant("lru-after-split", R + "lru_after_split", "LRU order wrong after a split",
           "the lower half of a split gets its creation time back, losing its later uses"),
    Mutant("vllm-hit-unreferenced", V + "hit_unreferenced",
           "vLLM: a block freed while a request still references it",
           "BlockPool.touch takes no reference on a block another request holds"),
    Mutant("vllm-content-hash", V + "content_hash", "vLLM: a block hash that ignores the parent",
           "block hashes of the block's own tokens, not chained to the parent's hash"),
    Mutant("vllm-reuse-order", V + "wrong_reuse_order",
           "vLLM: the free queue reuses in the wrong order",
           "a request's blocks are freed head first, so a shared prefix goes before its tail"),
    Mutant("vllm-refcount-off-by-one", V + "refcount_off_by_one",
           "vLLM: a reference count off by one",
           "a prefix hit takes two references; the request gives back one"),
]


def score(mutant: Mutant, seconds: float = 60.0, seed: int = 0,
          trace_dir: str = "corpus/traces", ddmin_seconds: float = 30.0,
          op_timeout: float | None = None) -> dict:
    """Run one mutant until caught or ``seconds`` pass; the scorecard row."""
    import bcr_verify.runner as runner
    from bcr_verify.shrink import shrink

    start = time.monotonic()
    result = runner.run(runner.RunConfig(
        implementations=[mutant.impl], block_size=mutant.block_size, seed=seed,
        max_steps=None, minutes=seconds / 60, workload=mutant.workload,
        kv_replay=mutant.kv_replay, trace_dir=trace_dir,
        **({"op_timeout": op_timeout} if op_timeout else {})))
    if result.interrupted:
        raise KeyboardInterrupt
    with_shrink = time.monotonic() - start
    detected = result.first_failure_seconds if result.first_failure_seconds is not None \
        else with_shrink
    row = {"mutant": mutant.name, "bug_class": mutant.bug_class, "impl": mutant.impl,
           "block_size": mutant.block_size, "workload": mutant.workload,
           "kv_replay": mutant.kv_replay, "caught": not result.ok,
           "steps_run": result.totals.get("steps", 0)}
    if result.ok:
        row.update(check=None, seconds_to_detection=None, shrunk_steps=None, trace=None,
                   seconds=round(with_shrink, 2))
        return row
    trace = result.failure
    hyp_steps = len(trace.steps)
    small, info = shrink(trace, seconds=ddmin_seconds)
    path = str(small.save(trace_dir)) if info["reproduced"] else result.trace_path
    final = small if info["reproduced"] else trace
    row.update(check=f"{final.failure['kind']}: {final.failure['check']}",
               detail=final.failure["detail"][:160],
               seconds_to_detection=round(detected, 2),
               seconds_with_hypothesis_shrink=round(with_shrink, 2),
               hypothesis_shrunk_steps=hyp_steps,
               shrunk_steps=len(final.steps), trace=path,
               seconds=round(time.monotonic() - start, 2))
    return row


def scorecard(rows: list[dict]) -> str:
    lines = ["| mutant | bug class | caught | by check | time to detection (s) | "
             "incl. Hypothesis shrink (s) | shrunk trace (steps) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mutant']} | {r['bug_class']} | {'yes' if r['caught'] else '**NO**'} "
                     f"| {r['check'] or '-'} | {r['seconds_to_detection'] or '-'} | "
                     f"{r.get('seconds_with_hypothesis_shrink') or '-'} | "
                     f"{r['shrunk_steps'] if r['shrunk_steps'] is not None else '-'} |")
    caught = [r for r in rows if r["caught"]]
    lengths = [r["shrunk_steps"] for r in caught]
    lines.append("")
    lines.append(f"caught {len(caught)}/{len(rows)}; median shrunk trace "
                 f"{statistics.median(lengths) if lengths else '-'} steps; max time to "
                 f"detection {max((r['seconds_to_detection'] for r in caught), default='-')} s")
    missed = [r["mutant"] for r in rows if not r["caught"]]
    if missed:
        lines.append("MISSED: " + ", ".join(missed))
    return "\n".join(lines)


def cmd_mutants(args) -> int:
    chosen = MUTANTS
    if args.only:
        known = {m.name: m for m in MUTANTS}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            raise ValueError(f"--only: unknown mutants {unknown}; known: {sorted(known)}")
        chosen = [known[n] for n in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<22} {m.impl:<45} {m.bug_class}")
        return 0
    from bcr_verify.runner import write_json

    rows = []
    interrupted = False
    try:
        for m in chosen:
            row = score(m, seconds=args.seconds, seed=args.seed, trace_dir=args.trace_dir,
                        op_timeout=args.op_timeout)
            rows.append(row)
            print(f"{m.name:<22} {'CAUGHT' if row['caught'] else 'MISSED'} "
                  f"{row.get('check') or ''} in {row['seconds_to_detection']} s, "
                  f"{row['shrunk_steps']} steps", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    print()
    print(scorecard(rows))
    if interrupted:
        print(f"INTERRUPTED after {len(rows)} of {len(chosen)} mutants")
    if args.json:
        from bcr_verify.provenance import provenance
        write_json({"seconds_budget": args.seconds, "seed": args.seed, "interrupted": interrupted,
                    "mutants": rows,
                    "provenance": provenance([m.impl for m in chosen], seconds=args.seconds,
                                             seed=args.seed)}, args.json)
    if interrupted:
        return 130
    return 0 if all(r["caught"] for r in rows) else 1


def register(subparsers) -> None:
    from bcr_verify.cli import _positive_float, add_fault_args

    p = subparsers.add_parser("mutants", help="bug-finding scorecard: run each planted bug "
                              "until caught; which check, how fast, how short the trace")
    p.add_argument("--seconds", type=_positive_float("--seconds"), default=60.0,
                   help="budget per mutant (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", action="append", metavar="NAME", help="run only these mutants")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON here")
    p.add_argument("--trace-dir", default="corpus/traces",
                   help="where shrunk traces are saved (default corpus/traces)")
    add_fault_args(p)
    p.set_defaults(func=cmd_mutants, supervise=True)
