"""``bcr-verify soak``: millions of lockstep operations from a seeded RNG, with growth sampling.

Hypothesis's per-step engine costs ~150-270 µs a step here, so a long run drives the same rules
as :class:`~bcr_verify.machine.LockstepMachine` (same ops, same argument ranges, rules picked
uniformly among those enabled, prompts drawn like :func:`bcr_verify.strategies.prompts`)
straight from ``random.Random(seed)`` and calls the same :class:`~bcr_verify.lockstep.Lockstep`
methods. Results are compared against the model on *every* operation (that is what a lockstep
step is); the structural invariants run every ``check_every`` steps, before every flush and at
the end.

Over time it samples RSS, each lane's live cached blocks / radix nodes and evictable /
protected token counts, and fits a least-squares line to each series after a warm-up; the
growth verdict is that slope against a threshold (see :func:`growth_verdict`). It also times
every call into the implementations themselves, so the harness's own overhead is reported as
a ratio from the same run.

The lockstep's step record is cut at every flush (the lanes are empty again then), so memory
stays flat and a divergence comes with the steps since the last flush: those are
delta-debugged (:mod:`bcr_verify.shrink`) and saved as a trace like any other.

The verdict is one of ``pass``, ``fail`` (a divergence, an implementation that raised or
hung, or memory or state that kept growing: a leak is a finding), ``inconclusive`` (every
check passed but too few samples to judge growth) and ``interrupted``.
"""

from __future__ import annotations

import gc
import os
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bcr_verify.errors import FatalFinding, UsageError, VerificationFailure
from bcr_verify.guard import DEFAULT_OP_TIMEOUT
from bcr_verify.lockstep import DEFAULT_SHRINK_SECONDS, BudgetSpent, StepBudget
from bcr_verify.trace import Trace

REGULAR_VOCAB = 151643
RULES = ("serve", "begin", "finish", "abort", "match", "evict", "evict_value", "reset")
TIMED = ("match", "lock", "admit", "unlock", "insert", "evict_tokens", "evict_value", "alloc",
         "free", "available_pages", "reset")
CHECKS = ("check_invariants", "sizes")
COUNTS = {
    "lockstep_operations": "steps executed: one operation applied to every implementation",
    "implementation_operations": "lockstep_operations x implementations",
    "invariant_checks": "times every lane's invariants ran (every --check-every steps, before "
                        "each flush, at the end)",
    "flushes": "resets of every cache (a rule, or forced past the step window)",
    "rules": "rules drawn, including ones that did nothing (e.g. finish with nothing running)",
    "rejected_requests": "begins refused because some lane could not make room",
    "failure": "what the saved trace fails when replayed (checks after every step); found_as: "
               "what the soak saw first, with checks every --check-every steps",
}
"""What each count in the JSON report counts; written into the report itself."""
MAX_WINDOW = 20_000
"""Steps kept for shrinking; a flush is forced past this so the record stays bounded."""


# ------------------------------------------------------------------ prompts, like strategies


class PromptDrawer:
    """Draws prompts as :func:`bcr_verify.strategies.prompts` does, from a ``random.Random``."""

    def __init__(self, pool, block_size: int, rng: random.Random, vocab: int = REGULAR_VOCAB):
        self.pool = [list(p) for p in pool]
        self.bs = block_size
        self.rng = rng
        self.vocab = vocab
        self.boundary = sorted({k * block_size + d for k in range(1, 5) for d in (-1, 0, 1)} - {0})

    def _token(self) -> int:
        return self.rng.randrange(self.vocab)

    def draw(self) -> list[int]:
        rng = self.rng
        roll = rng.randrange(10)
        p = rng.choice(self.pool)
        if roll < 6:
            return list(p)
        if roll < 8:
            return p[:rng.randint(0, len(p)) if rng.random() < 0.5 else len(p) // self.bs * self.bs]
        if roll < 9:
            return p + [self._token() for _ in range(rng.randint(1, self.bs + 1))]
        kind = rng.randrange(6)
        if kind == 0:
            return []
        if kind == 1:
            return [self._token()]
        if kind == 2:
            return [self._token() for _ in range(rng.choice(self.boundary))]
        if kind == 3:
            page = [self._token() for _ in range(self.bs)]
            return page * rng.randint(2, 12) + [self._token() for _ in range(rng.randint(0, self.bs))]
        if kind == 4:
            start = self._token()
            return [(start + i) % self.vocab for i in range(rng.randint(20, 40) * self.bs)]
        return [rng.choice((0, 1, 2)) for _ in range(rng.randint(0, 3 * self.bs + 1))]


DEEP_TARGET_BLOCKS = 1200
"""How deep the ``deep`` shape aims: past 1,000 radix nodes, as long agent sessions go."""
DEEP_DEFAULT_MINUTES = 3.0
"""The deep shape's default budget: 1,000+ radix nodes deep on a loaded 2-core machine (the
caches' own calls slow down as chains deepen: ~65 ops/s at 1,000 blocks of 16 tokens)."""
DEEP_RULES = ("serve",) * 14 + ("match", "match", "begin", "finish", "abort")
"""The ``deep`` shape's rule weights: mostly serving, which grows the chains; no flushes and
no evictions asked for (an LRU eviction would cut the newest chain once the old branches
are gone): evictions happen when an allocation finds the pool full."""


class DeepDrawer:
    """Prompts that grow long chains and fan out: nine serves in ten extend the newest
    conversation by one block (a new radix node, one level deeper), one in ten branches off a
    block of a random conversation (fan-out), and lookups re-ask an existing prefix."""

    def __init__(self, block_size: int, rng: random.Random, vocab: int = REGULAR_VOCAB):
        self.bs = block_size
        self.rng = rng
        self.vocab = vocab
        self.chains: list[list[int]] = []

    def _block(self) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(self.bs)]

    def draw(self) -> list[int]:
        rng = self.rng
        if not self.chains or rng.random() < 0.9:  # the newest conversation goes on
            grown = (self.chains.pop() if self.chains else []) + self._block()
            self.chains.append(grown)
        else:  # a side branch off any conversation; the newest one stays the newest
            base = rng.choice(self.chains)
            cut = rng.randrange(len(base) // self.bs + 1) * self.bs
            grown = base[:cut] + self._block()
            self.chains.insert(0, grown)
            del self.chains[1:-63]
        return list(grown)

    def peek(self) -> list[int]:
        if not self.chains:
            return self._block()
        chain = self.rng.choice(self.chains)
        return chain[:self.rng.randrange(len(chain) + 1)]


# ------------------------------------------------------------------ sampling


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak RSS is the best portable proxy
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_nodes(adapter) -> int | None:
    """Nodes (or state slots) the implementation holds, where it can be counted."""
    cache = getattr(adapter, "cache", None)
    if cache is None:
        return None
    for attr in ("state_count", "num_states"):
        f = getattr(cache, attr, None)
        if callable(f):
            return int(f())
    try:
        root = getattr(cache, "root_node", None)
    except NotImplementedError:  # Rust tree core: nodes live in Rust, not countable from here
        root = None
    if root is not None and hasattr(root, "children"):
        count, stack = 0, [root]
        while stack:
            node = stack.pop()
            children = list(node.children.values())
            count += len(children)
            stack.extend(children)
        return count
    if hasattr(cache, "__len__") and not hasattr(cache, "root_node"):
        return len(cache)
    return None


def sample(lockstep, ops: int, start: float) -> dict:
    lanes = {}
    for lane in lockstep.lanes:
        sizes = lane.adapter.sizes()
        lanes[lane.name] = {
            "cached_blocks": len(lane.shadow), "nodes": live_nodes(lane.adapter),
            "evictable": sizes.evictable if sizes else lane.shadow.evictable_tokens,
            "protected": sizes.protected if sizes else lane.shadow.protected_tokens,
            "free_pages": lane.adapter.available_pages(),
        }
    from bcr_verify.shape import lockstep_shape

    return {"t": round(time.monotonic() - start, 2), "ops": ops, "rss_mb": round(rss_mb(), 2),
            "heap_blocks": sys.getallocatedblocks(), "lanes": lanes,
            "tree_shape": lockstep_shape(lockstep)}


def fit_slope(xs, ys) -> float:
    """Least-squares slope of ys against xs (0 when xs has no spread)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


RSS_DRIFT_MB = 8.0
"""Fitted RSS growth over the measured window above which the verdict is "growing"."""
RSS_DRIFT_FRACTION = 0.02
COUNT_DRIFT_FRACTION = 0.25
"""Fitted growth of a bounded count (nodes, Python heap blocks) above this fraction of its mean."""
WARMUP_FRACTION = 0.2
WARMUP_MIN_SAMPLES = 2
GROWTH_MIN_SAMPLES = 10
"""Fewer samples than this are not judged. With four, as before, nothing was dropped as
warm-up, and a run that failed after eight seconds had a line fitted through the pool's first
filling printed as ``GROWING: rss_mb``; ten leave eight past at least two of warm-up, five
seconds of a run at the default sampling."""


def growth_verdict(samples: list[dict], capacity_pages: int | None = None) -> dict:
    """A fitted slope per series after warm-up, its projected drift, and a verdict.

    Fewer than ``GROWTH_MIN_SAMPLES`` are "too few samples". Otherwise the first
    ``WARMUP_FRACTION`` of them, and at least ``WARMUP_MIN_SAMPLES`` (allocator pools,
    interpreter caches filling), are dropped; over the rest each series gets a least-squares
    slope against operations. The drift is slope × operations in that window. RSS is
    "growing" when its fitted drift exceeds ``max(RSS_DRIFT_MB, RSS_DRIFT_FRACTION × RSS)``; a
    count (Python's allocated heap blocks, ``sys.getallocatedblocks()``: every small object a
    leak keeps, read in well under a millisecond where counting ``gc.get_objects()`` took
    ~110 ms a sample) when its drift exceeds ``COUNT_DRIFT_FRACTION`` × its mean + 2, and a
    lane's live nodes / blocks when theirs exceeds the whole pool (``capacity_pages``): those
    swing between empty and full with flushes, and a short run may only fill the pool once,
    while a leak keeps climbing past it. Bounded caches churning at steady state give near-zero
    slopes; a leak gives a steady positive one.
    """
    if len(samples) < GROWTH_MIN_SAMPLES:
        return {"verdict": "too few samples", "samples": len(samples),
                "needed": GROWTH_MIN_SAMPLES, "series": {}}
    kept = samples[max(WARMUP_MIN_SAMPLES, int(len(samples) * WARMUP_FRACTION)):]
    xs = [s["ops"] for s in kept]
    span = xs[-1] - xs[0]
    series: dict[str, list[float]] = {"rss_mb": [s["rss_mb"] for s in kept],
                                      "heap_blocks": [s["heap_blocks"] for s in kept]}
    for name in kept[0]["lanes"]:
        for key in ("nodes", "cached_blocks"):
            values = [s["lanes"][name][key] for s in kept]
            if all(v is not None for v in values):
                series[f"{name}.{key}"] = values
    out, growing = {}, []
    for key, ys in series.items():
        slope = fit_slope(xs, ys)
        drift = slope * span
        mean = sum(ys) / len(ys)
        if key == "rss_mb":
            limit = max(RSS_DRIFT_MB, RSS_DRIFT_FRACTION * mean)
        elif key == "heap_blocks" or not capacity_pages:
            limit = COUNT_DRIFT_FRACTION * mean + 2
        else:  # a lane's nodes / blocks: bounded by the pool, so churn swings up to it
            limit = capacity_pages
        out[key] = {"slope_per_million_ops": round(slope * 1e6, 4),
                    "fitted_drift": round(drift, 3), "limit": round(limit, 3),
                    "first": ys[0], "last": ys[-1], "mean": round(mean, 2),
                    "growing": drift > limit}
        if drift > limit:
            growing.append(key)
    return {"verdict": "growing: " + ", ".join(growing) if growing else "flat",
            "warmup_samples_dropped": len(samples) - len(kept), "series": out}


# ------------------------------------------------------------------ the driver


@dataclass
class SoakConfig:
    implementations: list[str] | None = None
    block_size: int = 16
    workload: str = "mixed"
    seed: int = 0
    minutes: float | None = 1.0
    max_ops: int | None = None
    check_every: int = 64
    sample_seconds: float | None = None
    max_running: int = 3
    trace_dir: str = "corpus/traces"
    shrink_seconds: float = DEFAULT_SHRINK_SECONDS
    op_timeout: float | None = DEFAULT_OP_TIMEOUT
    strict_lru: bool = False
    events: bool = False
    known: tuple[str, ...] = ()
    """Checks already known to fail: a hit is counted, the shortest window that hit it kept
    as its witness, and the caches flushed, so the soak goes on looking for other findings."""
    shape: str = "mixed"
    """``mixed``: the workload's prompts, flushes and evictions as the machine draws them;
    ``deep``: long chains and fan-outs (:class:`DeepDrawer`), never flushed."""


@dataclass
class SoakResult:
    config: SoakConfig
    report: dict
    samples: list = field(default_factory=list)
    failure: Trace | None = None
    trace_path: str | None = None

    @property
    def verdict(self) -> str:
        return self.report["verdict"]

    @property
    def ok(self) -> bool:
        """Nothing found and nothing left undecided (a pass, or growth inconclusive)."""
        return self.verdict in ("pass", "inconclusive")


def soak(config: SoakConfig, progress=None) -> SoakResult:
    import math

    from bcr_verify.provenance import provenance
    from bcr_verify.runner import select_implementations
    from bcr_verify.session import (
        build_lockstep, known_not_seen, prompt_source, start_afresh, vacuity_warnings,
    )

    if config.minutes is None and config.max_ops is None:
        raise UsageError("give minutes or max_ops")
    if config.minutes is not None and not (math.isfinite(config.minutes) and config.minutes > 0):
        raise UsageError(f"minutes must be a finite number > 0, got {config.minutes}")
    if config.check_every < 1:
        raise UsageError(f"check_every must be >= 1, got {config.check_every}")
    impls, not_run = select_implementations(config.implementations, config.block_size)
    source = prompt_source(config.workload, config.block_size)
    if config.shape not in ("mixed", "deep"):
        raise UsageError(f"shape must be 'mixed' or 'deep', got {config.shape!r}")
    deep = config.shape == "deep"
    capacity = max(source.capacity_pages, 2 * DEEP_TARGET_BLOCKS + 64) if deep \
        else source.capacity_pages
    budget = StepBudget(config.max_ops)
    lockstep = build_lockstep(impls, config.block_size, capacity, check_every=config.check_every,
                              op_timeout=config.op_timeout, budget=budget,
                              strict_lru=config.strict_lru, events=config.events)
    explicit = any(l.adapter.contract.eviction in ("explicit", "lazy") for l in lockstep.lanes)
    rng = random.Random(config.seed)
    clock_mask = 15 if deep else 255  # deep steps take ~50 ms: read the clock more often
    prompts = DeepDrawer(config.block_size, rng) if deep else \
        PromptDrawer(source.pool, config.block_size, rng)
    lookups = prompts.peek if deep else prompts.draw
    pool_tokens = capacity * config.block_size
    budget_s = config.minutes * 60 if config.minutes else None
    every = config.sample_seconds or max(0.5, (budget_s or 60) / 240)

    running: list[int] = []
    begin_at: dict[int, int] = {}  # rid -> index in the step window of the begin that made it
    ops = 0
    flushes = 0
    rules = Counter()
    samples = []
    failure: VerificationFailure | FatalFinding | None = None
    known: dict[str, dict] = {}  # check -> {"count", "witness": shortest window, "failure"}
    window: list[dict] = []
    begin_map: dict[int, int] = {}
    for lane in lockstep.lanes:  # what building the lanes called is not the soak's
        lane.adapter.call_times.reset()
    # Torch, SGLang and the lanes live as long as the soak: frozen, they are left out of the
    # collector's full scans (~0.4 s each with torch loaded).
    gc.collect()
    gc.freeze()
    start = time.monotonic()
    next_sample = start
    interrupted = False

    def flush_window():
        lockstep.forget_steps()
        begin_at.clear()

    def count_known(exc: VerificationFailure) -> None:
        found = known.setdefault(exc.check, {"count": 0, "witness": None})
        found["count"] += 1
        if found["witness"] is None or len(lockstep.steps) < len(found["witness"]):
            found["witness"], found["failure"] = list(lockstep.steps), exc.as_dict()

    def do_begin():
        rid = lockstep.begin(prompts.draw())
        if rid is not None:
            begin_at[rid] = len(lockstep.steps) - 1
        return rid

    try:
        while True:
            if (ops & clock_mask) == 0:
                now = time.monotonic()
                if now >= next_sample:
                    samples.append(sample(lockstep, lockstep.executed, start))
                    next_sample = now + every
                    if progress:
                        s = samples[-1]
                        rate = s["ops"] / max(s["t"], 1e-9)
                        progress(f"{s['ops']:,} ops, {rate:,.0f} ops/s, RSS {s['rss_mb']:.1f} MB, "
                                 f"{now - start:.0f}s" + (f"/{budget_s:.0f}s" if budget_s else ""))
                if budget_s is not None and now - start >= budget_s:
                    break
            if deep:
                rule = rng.choice(DEEP_RULES)
                if (rule == "begin" and len(lockstep.requests) >= config.max_running) or (
                        rule in ("finish", "abort") and not running):
                    rule = "serve"
            else:
                enabled = ["serve", "match", "evict", "evict_value", "reset"]
                if len(lockstep.requests) < config.max_running:
                    enabled.append("begin")
                if running:
                    enabled += ["finish", "abort"]
                rule = rng.choice(enabled)
            rules[rule] += 1
            try:
                if rule == "serve":
                    rid = do_begin()
                    if rid is not None:
                        lockstep.finish(rid)
                elif rule == "begin":
                    rid = do_begin()
                    if rid is not None:
                        running.append(rid)
                elif rule in ("finish", "abort"):
                    rid = running.pop(rng.randrange(len(running)))
                    if rid in lockstep.requests:
                        getattr(lockstep, rule)(rid)
                elif rule == "match":
                    lockstep.match(lookups())
                elif rule == "evict":
                    percent = rng.randint(1, 3 if deep else 50)
                    lockstep.evict(max(1, pool_tokens * percent // 100))
                elif rule == "evict_value":
                    pick = rng.randint(0, 10_000)
                    if explicit:
                        lockstep.evict_value(pick)
                elif rule == "reset" and (rng.randrange(10) == 0
                                          or len(lockstep.steps) > MAX_WINDOW):
                    lockstep.check()  # no corruption may hide behind a flush
                    lockstep.reset()
                    running.clear()
                    flushes += 1
                    flush_window()
            except VerificationFailure as exc:
                if exc.check not in config.known:
                    raise
                count_known(exc)
                start_afresh(lockstep)
                running.clear()
                begin_at.clear()
            ops += 1
    except BudgetSpent:
        pass
    except (VerificationFailure, FatalFinding) as exc:
        failure = exc
        window = list(lockstep.steps)
        begin_map = dict(begin_at)
    except KeyboardInterrupt:
        interrupted = True
    if failure is None and not interrupted:
        try:
            lockstep.budget = None  # the closing check is not a step
            lockstep.check()
        except (VerificationFailure, FatalFinding) as exc:
            if isinstance(exc, VerificationFailure) and exc.check in config.known:
                count_known(exc)
            else:
                failure = exc
                window = list(lockstep.steps)
                begin_map = dict(begin_at)
    elapsed = time.monotonic() - start
    gc.unfreeze()
    total_ops = lockstep.executed
    if failure is None and not interrupted:  # a failed lane may raise or hang again
        samples.append(sample(lockstep, total_ops, start))

    def window_trace(steps: list[dict], failed: dict, **meta) -> Trace:
        """Steps since the lanes last started empty, as the soak ran them."""
        return Trace(implementations=list(impls), block_size=config.block_size,
                     capacity_pages=capacity, steps=steps, failure=failed,
                     strict_lru=config.strict_lru, events=config.events,
                     check_every=config.check_every,
                     meta={"workload": config.workload, "source": "soak", "seed": config.seed,
                           **meta})

    trace = trace_path = shrink_info = None
    if failure is not None:
        from bcr_verify.shrink import shrink

        unshrunk = window_trace(window, failure.as_dict(),
                                global_step=lockstep.forgotten + (failure.step or 0))
        if isinstance(failure, FatalFinding):  # each attempt would hang again: keep it whole
            trace, shrink_info = unshrunk, {"reproduced": None, "skipped": failure.kind}
        else:
            try:
                if progress:
                    progress(f"found after {unshrunk.meta['global_step']:,} operations: "
                             f"{str(failure):.200}; shrinking it (at most "
                             f"{config.shrink_seconds:g} s; Ctrl-C keeps the smallest so far)",
                             final=True)
                trace, shrink_info = shrink(unshrunk, begin_map, seconds=config.shrink_seconds,
                                            progress=progress, known=config.known)
            except KeyboardInterrupt:
                trace, shrink_info = unshrunk, {"reproduced": None, "interrupted": True}
            if shrink_info.get("interrupted"):
                interrupted = True
            if shrink_info["reproduced"] is False:
                trace.meta["note"] = (
                    "did not reproduce from the last flush on fresh lanes: the failure depends "
                    "on history before it" + (
                        " (or on what a known failure, met there first when checking after "
                        "every step, left behind)" if shrink_info.get("known_met") else "")
                    + "; steps since flush kept")
        trace_path = str(trace.save(config.trace_dir))

    known_witnesses = {
        check: {"count": found["count"], "steps": len(found["witness"]),
                "trace": str(window_trace(found["witness"], found["failure"], known=True
                                          ).save(config.trace_dir))}
        for check, found in known.items()}
    times = {lane.name: lane.adapter.call_times for lane in lockstep.lanes}
    raw_op = sum(t.seconds(TIMED) for t in times.values())
    raw_check = sum(t.seconds(CHECKS) for t in times.values())
    lanes = len(lockstep.lanes)
    per_impl = {}
    for lane in lockstep.lanes:
        op_s = times[lane.name].seconds(TIMED)
        per_impl[lane.name] = {
            "raw_op_seconds": round(op_s, 3), "raw_calls": times[lane.name].count(TIMED),
            "check_seconds": round(times[lane.name].seconds(CHECKS), 3),
            "raw_ops_per_second_alone": round(total_ops / op_s, 1) if op_s else None,
            **lane.stats.as_dict(),
        }
    from bcr_verify.runner import witnesses
    relaxations = witnesses({"implementations": per_impl}, impls, config.block_size,
                            capacity, config.workload)
    growth = growth_verdict(samples, capacity) if not deep else {
        "verdict": "not judged: the deep shape grows its trees by design", "series": {}}
    observed = {k: v for o in lockstep.observers for k, v in o.report().items()}
    if failure is not None:
        verdict = "fail"
    elif interrupted:
        verdict = "interrupted"
    elif growth["verdict"].startswith("growing"):
        verdict = "fail"
    elif growth["verdict"] == "too few samples":
        verdict = "inconclusive"
    else:
        verdict = "pass"
    report = {
        "verdict": verdict, "ok": verdict in ("pass", "inconclusive"),
        "interrupted": interrupted,
        "implementations": impls, "not_run": not_run, "block_size": config.block_size,
        "workload": config.workload, "seed": config.seed, "capacity_pages": capacity,
        "check_every": config.check_every, "seconds": round(elapsed, 2),
        "lockstep_operations": total_ops,
        "implementation_operations": total_ops * lanes,
        "ops_per_second": round(total_ops / elapsed, 1) if elapsed else 0.0,
        "shape": config.shape, "tree_shape": _widest_shape(samples),
        "lru_relaxations": relaxations,
        "rules": dict(rules), "flushes": flushes, "invariant_checks": lockstep.checks,
        "rejected_requests": lockstep.rejected,
        "known": known_witnesses,
        "known_not_seen": known_not_seen(config.known, known_witnesses),
        "overhead": {
            "wall_seconds": round(elapsed, 3),
            "raw_implementation_op_seconds": round(raw_op, 3),
            "implementation_self_check_seconds": round(raw_check, 3),
            "harness_seconds": round(elapsed - raw_op - raw_check, 3),
            "ratio_wall_to_raw_ops": round(elapsed / raw_op, 2) if raw_op else None,
            "explanation": "wall time of the soak / summed time spent inside the implementations' "
                           "own operation calls (match, lock, unlock, insert, evict, alloc, free), "
                           "all lanes, same run; 1.0 would be zero harness overhead",
        },
        "rss_mb": {"start": samples[0]["rss_mb"], "end": samples[-1]["rss_mb"],
                   "drift": round(samples[-1]["rss_mb"] - samples[0]["rss_mb"], 2),
                   "max": max(s["rss_mb"] for s in samples)},
        "growth": growth,
        "implementations_detail": per_impl,
        **observed,
        "vacuous_warnings": vacuity_warnings(
            {"implementations": per_impl, "steps": total_ops, **observed,
             "cross_lane_checks": lockstep.cross_checks}, not_run)
        if verdict in ("pass", "inconclusive") else [],
        "failure": trace.failure if trace is not None else None,
        "found_as": failure.as_dict() if failure else None,
        "trace": trace_path, "shrink": shrink_info,
        "samples": samples,
        "counts": COUNTS,
        "provenance": provenance(impls, minutes=config.minutes, max_ops=config.max_ops,
                                 seed=config.seed, block_size=config.block_size,
                                 workload=config.workload, check_every=config.check_every,
                                 op_timeout=config.op_timeout),
    }
    try:
        report["load_average"] = os.getloadavg()
    except OSError:
        pass
    return SoakResult(config, report, samples, trace, trace_path)


def _widest_shape(samples: list[dict]) -> dict:
    from bcr_verify.shape import widest

    out: dict = {}
    for s in samples:
        out = widest(out, s.get("tree_shape", {}))
    return out


# ------------------------------------------------------------------ output


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    xs = [s["ops"] / 1e6 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(xs, [s["rss_mb"] for s in samples], color="black")
    axes[0].set_ylabel("RSS (MB)")
    g = report["growth"]
    axes[0].set_title(f"soak: {', '.join(report['implementations'])} | "
                      f"{report['lockstep_operations']:,} ops in {report['seconds']:.0f}s | "
                      f"growth verdict: {g['verdict']}", fontsize=9)
    for name in samples[0]["lanes"]:
        nodes = [s["lanes"][name]["nodes"] for s in samples]
        if all(n is not None for n in nodes):
            axes[1].plot(xs, nodes, label=f"{name} nodes")
        axes[2].plot(xs, [s["lanes"][name]["evictable"] for s in samples],
                     label=f"{name} evictable")
        axes[2].plot(xs, [s["lanes"][name]["protected"] for s in samples], linestyle="--",
                     label=f"{name} protected")
    axes[1].set_ylabel("live nodes / blocks")
    axes[2].set_ylabel("tokens")
    axes[2].set_xlabel("lockstep operations (millions)")
    for ax in axes[1:]:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def seen_first_as(failure: dict, found_as: dict | None) -> dict | None:
    """What the soak saw when that differs from what its shrunk trace fails (another check,
    or another implementation): the soak checks invariants every ``check_every`` steps and
    the trace after every step, and ``--known`` takes the name the soak saw."""
    if found_as and any(found_as.get(key, failure.get(key)) != failure.get(key)
                        for key in ("impl", "check")):
        return found_as
    return None


def shrink_text(info: dict) -> str:
    """How the soak's window became the saved trace, in words (the JSON keeps the numbers)."""
    if info.get("skipped"):
        return f"kept whole: every replay would end the same way ({info['skipped']})"
    if info["reproduced"] is None:
        return "kept whole: interrupted before shrinking"
    if not info["reproduced"]:
        return (f"kept whole, {info['shrunk_steps']} steps: the window did not fail again on "
                "fresh lanes")
    text = (f"shrunk from {info['original_steps']:,} to {info['shrunk_steps']} steps in "
            f"{info['seconds']:g} s, {info['tests']:,} replays")
    if info.get("capped") or info.get("interrupted"):
        text += ", stopped early (" + ("interrupted" if info.get("interrupted") else
                                       "its time cap") + "): the smallest found so far"
    met = info.get("known_met")
    if info.get("check_every"):
        text += ("; checking every step met a known failure first, and on fresh lanes after it "
                 f"this one never came, so invariants run every {info['check_every']} steps, "
                 "as the soak checked them")
    elif met:
        text += (f"; went past a known failure {met} time{'s' if met > 1 else ''} on fresh "
                 "lanes, as the soak does")
    return text


def _inside_dynamo(events: dict | None) -> str:
    """The harness's time that Dynamo's RadixTree, itself judged, spent in its own calls."""
    seconds = sum(c.get("dynamo_seconds", 0) for c in (events or {}).get("lanes", {}).values())
    return f"; of the harness, inside Dynamo's RadixTree {seconds:.2f} s" if seconds else ""


def summary(report: dict) -> str:
    o = report["overhead"]
    lines = [
        f"implementations: {', '.join(report['implementations'])}",
        *[f"NOT RUN: {n} ({why})" for n, why in report["not_run"].items()],
        f"{report['lockstep_operations']:,} lockstep operations "
        f"({report['implementation_operations']:,} implementation operations) in "
        f"{report['seconds']} s = {report['ops_per_second']:,} ops/s; "
        f"{report['invariant_checks']:,} invariant checks (every {report['check_every']} steps, "
        f"before each of {report['flushes']:,} flushes, and at the end)",
        f"RSS {report['rss_mb']['start']} -> {report['rss_mb']['end']} MB "
        f"(drift {report['rss_mb']['drift']:+} MB); growth verdict: {report['growth']['verdict']}",
        f"harness overhead: wall {o['wall_seconds']} s / raw implementation ops "
        f"{o['raw_implementation_op_seconds']} s = {o['ratio_wall_to_raw_ops']}x "
        f"(implementation self-checks {o['implementation_self_check_seconds']} s"
        + _inside_dynamo(report.get("events")) + ")",
    ]
    from bcr_verify.cli import events_lines
    from bcr_verify.session import known_not_seen_line
    from bcr_verify.shape import shape_line
    lines.append(shape_line(report.get("tree_shape", {})))
    lines += events_lines(report.get("events"))
    for name, r in report.get("lru_relaxations", {}).items():
        counts = ", ".join(f"{impl} {n:,}" for impl, n in r["count"].items())
        lines.append(f"deviation from strict LRU, accepted: {name} ({counts}); a "
                     f"{r['steps']}-step witness is in the JSON report")
    for name, d in report["implementations_detail"].items():
        lines.append(f"  {name:<22} raw ops {d['raw_op_seconds']:>8} s, checks "
                     f"{d['check_seconds']:>8} s, hit rate {d['hit_rate']:.3f}, "
                     f"evictions {d['evictions']:,}")
    if report["failure"]:
        f = report["failure"]
        lines.append(f"FAIL: {f['kind']} in {f['impl']} [{f['check']}]: {f['detail']}")
        seen = seen_first_as(f, report.get("found_as"))
        if seen:
            lines.append(f"(the soak saw it first as {seen['kind']} in {seen['impl']} "
                         f"[{seen['check']}], checking invariants every "
                         f"{report['check_every']} steps, the name --known takes; the trace "
                         "checks after every step)")
        lines.append(f"trace saved: {report['trace']} ({shrink_text(report['shrink'])})")
        lines.append(f"reproduce with: bcr-verify replay {report['trace']}")
    for key, series in report["growth"]["series"].items():
        if series["growing"]:
            lines.append(f"GROWING: {key} {series['first']} -> {series['last']} (fitted drift "
                         f"{series['fitted_drift']:+} over the measured window, limit "
                         f"{series['limit']}; {series['slope_per_million_ops']:+} per million ops)")
    for check, found in report.get("known", {}).items():
        lines.append(f"KNOWN: {check} failed {found['count']:,} times (not a new finding; the "
                     "lanes started again on fresh caches after each); a "
                     f"{found['steps']}-step witness: {found['trace']}")
    lines += [known_not_seen_line(check) for check in report.get("known_not_seen", [])]
    lines += [f"WARNING (pass may be vacuous): {w}" for w in report.get("vacuous_warnings", [])]
    verdict = report["verdict"]
    if verdict == "fail" and report["failure"]:
        if report["interrupted"]:
            lines.append("(interrupted while shrinking: the trace is the smallest found so far)")
    elif verdict == "fail":
        lines.append("FAIL: growth: state or memory kept growing (a leak is a finding); "
                     "see the plot (--plot) for the series")
    elif verdict == "inconclusive":
        g = report["growth"]
        lines.append(f"INCONCLUSIVE: every check passed, but too few samples to judge growth "
                     f"({g['samples']} of the {g['needed']} needed: run longer, or sample more "
                     "often with --sample-seconds)")
    elif verdict == "interrupted":
        lines.append("INTERRUPTED: no divergence in what ran, but the run did not finish")
    else:
        lines.append("PASS")
    return "\n".join(lines)


def cmd_soak(args) -> int:
    from bcr_verify.cli import pin_for_events, verdict_reached
    from bcr_verify.session import progress_printer

    if args.workers > 1:
        from bcr_verify.campaign import cmd_campaign
        return cmd_campaign(args)
    config = SoakConfig(
        implementations=args.impls, block_size=args.block_size, workload=args.workload,
        seed=args.seed, minutes=None if args.ops and not args.minutes else args.minutes or (
            DEEP_DEFAULT_MINUTES if args.shape == "deep" else 1.0),
        max_ops=args.ops, check_every=args.check_every, sample_seconds=args.sample_seconds,
        trace_dir=args.trace_dir, op_timeout=args.op_timeout, shape=args.shape,
        strict_lru=args.strict_lru, events=args.events, shrink_seconds=args.shrink_seconds,
        known=tuple(args.known or ()))
    show = None if args.quiet else progress_printer()
    args.pinned_cpu = pin_for_events(args)
    result = soak(config, progress=show)
    with verdict_reached():
        return _report_soak(args, result, show)


def _report_soak(args, result, show) -> int:
    from bcr_verify.cli import pinned_line
    from bcr_verify.runner import write_json

    if show:
        show("", final=True)
    if args.json:
        write_json(result.report, args.json)
    if args.plot:
        plot(result.report, args.plot)
    if args.pinned_cpu is not None:
        print(pinned_line(args.pinned_cpu))
    print(summary(result.report))
    if args.plot:
        print(f"plot: {args.plot}")
    if result.failure is not None:
        print("\n" + result.failure.render())
    if result.verdict == "fail":
        return 1
    return 130 if result.verdict == "interrupted" else 0


def register(subparsers) -> None:
    from bcr_verify.cli import (
        _positive_float, _positive_int, add_events_args, add_impl_args, add_known_arg,
        add_shrink_arg,
    )

    import argparse

    from bcr_verify.cli import EXIT_CODES

    p = subparsers.add_parser(
        "soak", help="millions of lockstep operations from a seeded RNG, with RSS / size "
        "sampling, a growth verdict, JSON report and PNG plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Growth is a finding: a soak whose memory or live state keeps climbing exits 1, "
               "saying what grew and by how much;\ntoo few samples to judge is INCONCLUSIVE, "
               "never PASS.\n\n" + EXIT_CODES)
    add_impl_args(p)
    p.add_argument("--minutes", type=_positive_float("--minutes"),
                   help="run this long (default 1, or 3 with --shape deep, unless --ops is "
                        "given)")
    p.add_argument("--ops", type=_positive_int("--ops"),
                   help="stop after this many lockstep operations (with --workers: in total, "
                        "split between the workers)")
    p.add_argument("--workers", type=_positive_int("--workers"), default=1, metavar="N",
                   help="run N soaks at once, worker i with --seed SEED+i, each supervised "
                        "on its own, and merge their reports into one (default 1: one soak); "
                        "--minutes is each worker's; see bcr_verify/campaign.py")
    p.add_argument("--check-every", type=_positive_int("--check-every"), default=64,
                   help="run every lane's invariants every N steps (default 64), plus before "
                        "every flush and at the end; results are compared on every step")
    p.add_argument("--sample-seconds", type=_positive_float("--sample-seconds"),
                   help="sample RSS and sizes this often (default: ~240 samples per run)")
    p.add_argument("--strict-lru", action="store_true",
                   help="an eviction legal only under a relaxation of strict LRU is a failure")
    add_events_args(p)
    add_known_arg(p)
    p.add_argument("--shape", choices=("mixed", "deep"), default="mixed",
                   help="mixed: the workload's prompts with flushes (default); deep: long "
                        "chains (past 1,000 radix nodes) and fan-outs, never flushed")
    p.add_argument("--json", metavar="PATH", help="write the report (with samples) here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the samples here")
    p.add_argument("--trace-dir", default="corpus/traces",
                   help="where a failure's shrunk trace is saved (default corpus/traces)")
    add_shrink_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_soak, supervise=True)
