"""``bcr-verify run``: the lockstep machine under Hypothesis, to a step or time budget.

Hypothesis runs in chunks of examples, each chunk with its own seed derived from the run's
seed, until the budget is spent; this gives progress between chunks and a budget in steps or
minutes, which Hypothesis's own settings cannot express. The step budget is exact: the step
after the last one allowed ends the run where it stands (:class:`~bcr_verify.lockstep.StepBudget`).
A failure stops the search; Hypothesis shrinks it (those steps are counted apart, progress is
shown as it goes) for at most ``shrink_seconds``, and the smallest failing example found by then
is saved as a trace and printed with the command that replays it.

Every way a run can end is a :attr:`RunResult.verdict`: ``pass``, ``fail`` (a divergence,
an invariant violation, an implementation that raised or hung), or ``interrupted``
(SIGINT / SIGTERM; the best failing trace so far is still saved, and the report written).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed as hypothesis_seed, settings
from hypothesis.stateful import run_state_machine_as_test

from bcr_verify.adapters.registry import DEFAULT, resolve
from bcr_verify.errors import FatalFinding, UsageError
from bcr_verify.guard import DEFAULT_OP_TIMEOUT
from bcr_verify.lockstep import (
    DEFAULT_SHRINK_SECONDS, BudgetSpent, ShrinkCapReached, StepBudget,
)
from bcr_verify.machine import LockstepMachine
from bcr_verify.session import TOTALS, known_not_seen, vacuity_warnings
from bcr_verify.trace import Trace

STEPS_PER_EXAMPLE = 50
EXAMPLES_PER_CHUNK = 10

COUNTS = {
    "steps": "lockstep steps executed while searching (each one operation on every "
             "implementation); at most --max-steps",
    "examples": "Hypothesis examples run while searching, each on fresh lanes",
    "shrink_steps": "lockstep steps executed while Hypothesis shrank a failure (not in steps)",
    "shrink_examples": "examples Hypothesis ran while shrinking",
    "shrink_seconds": "seconds from the first failure to the end of shrinking (None: nothing "
                      "failed); shrink_capped: it stopped at --shrink-seconds",
    "implementations.*.lookups": "prefix matches checked against the model (searching only)",
    "implementations.*.hits": "lookups that matched at least one block",
    "implementations.*.evictions": "evictions that freed at least one page",
    "tree_shape.*": "per implementation, the deepest chain (in blocks, and in radix nodes where "
                    "the tree can be walked) and the widest fan-out any example reached",
}
"""What each count in the JSON report counts; written into the report itself."""


@dataclass
class RunConfig:
    implementations: list[str] | None = None
    """None: every available implementation, the unavailable ones reported as not run."""
    block_size: int = 16
    seed: int = 0
    max_steps: int | None = 2000
    minutes: float | None = None
    workload: str = "mixed"
    kv_replay: bool = False
    trace_dir: str = "corpus/traces"
    op_timeout: float | None = DEFAULT_OP_TIMEOUT
    known: tuple[str, ...] = ()
    """Checks known to fail: counted with one witness trace each, not reported as findings."""
    strict_lru: bool = False
    """Evictions legal only under a relaxation of strict LRU fail the run."""
    events: bool = False
    """Check every KV-cache event of the implementations that publish them."""
    shrink_seconds: float | None = DEFAULT_SHRINK_SECONDS
    """How long a failure may be shrunk; then the smallest failing example so far is kept."""


@dataclass
class RunResult:
    config: RunConfig
    implementations: list[str]
    not_run: dict[str, str]
    totals: dict
    seconds: float
    failure: Trace | None = None
    trace_path: str | None = None
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    first_failure_seconds: float | None = None
    known: dict = field(default_factory=dict)
    """check -> {"count", "trace"} for each known check that failed."""

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.interrupted

    @property
    def verdict(self) -> str:
        if self.failure is not None:
            return "fail"
        return "interrupted" if self.interrupted else "pass"

    def as_dict(self) -> dict:
        return {
            "verdict": self.verdict, "ok": self.ok, "interrupted": self.interrupted,
            "implementations": self.implementations, "not_run": self.not_run,
            "block_size": self.config.block_size, "seed": self.config.seed,
            "workload": self.config.workload, "kv_replay_enabled": self.config.kv_replay,
            "seconds": round(self.seconds, 2),
            "steps_per_second": round(self.totals.get("steps", 0) / self.seconds, 1)
            if self.seconds else 0.0,
            "vacuous_warnings": self.warnings, "notes": self.notes, **self.totals,
            "failure": self.failure.failure if self.failure else None,
            "trace": self.trace_path, "known": self.known,
            "known_not_seen": known_not_seen(self.config.known, self.known), "counts": COUNTS,
            "provenance": self.provenance,
        }


def select_implementations(names: list[str] | None, block_size: int) -> tuple[list[str], dict]:
    """The implementations to run and, for defaults, those skipped with the reason.

    Named implementations must be available (a clear error otherwise); the default set drops
    unavailable ones and reports them, so a pass never hides a skipped implementation.
    """
    chosen, not_run = [], {}
    for name in names or DEFAULT:
        why = resolve(name).availability(block_size)
        if why is None:
            chosen.append(name)
        elif names:
            raise UsageError(f"impl {name!r} is unavailable: {why}")
        else:
            not_run[name] = why
    return chosen, not_run


def validate(config: RunConfig) -> None:
    """Reject a configuration before any work, naming the setting."""
    from bcr_verify.strategies import WORKLOADS

    if config.workload not in WORKLOADS:
        raise UsageError(f"workload {config.workload!r} is unknown; choose one of: "
                         f"{', '.join(WORKLOADS)}")
    if config.max_steps is None and config.minutes is None:
        raise UsageError("give max_steps or minutes")
    if config.max_steps is not None and config.max_steps < 1:
        raise UsageError(f"max_steps must be >= 1, got {config.max_steps}")
    if config.minutes is not None and not (math.isfinite(config.minutes) and config.minutes > 0):
        raise UsageError(f"minutes must be a finite number > 0, got {config.minutes}")
    if config.op_timeout is not None and not (math.isfinite(config.op_timeout)
                                              and config.op_timeout > 0):
        raise UsageError(f"op_timeout must be a finite number > 0, got {config.op_timeout}")


def run(config: RunConfig, progress=None) -> RunResult:
    from bcr_verify.provenance import provenance

    validate(config)
    impls, not_run = select_implementations(config.implementations, config.block_size)
    budget = StepBudget(config.max_steps, config.shrink_seconds)
    if progress:
        cap = f"at most {config.shrink_seconds:g} s; " if config.shrink_seconds else ""
        budget.on_found = lambda failure: progress(
            f"found after {budget.searched} steps: {str(failure):.200}; shrinking it ({cap}"
            "Ctrl-C keeps the smallest failing example so far)", final=True)
        budget.on_shrunk = lambda steps: progress(
            f"shrinking: a failing example of {steps} steps, {budget.shrink_steps} steps run, "
            f"{time.monotonic() - budget.found_at:.0f}s")
    machine = LockstepMachine.configure(
        implementations=impls, block_size=config.block_size, workload=config.workload,
        kv_replay=config.kv_replay, op_timeout=config.op_timeout, budget=budget,
        known=tuple(config.known), strict_lru=config.strict_lru, events=config.events)
    run_settings = settings(
        max_examples=EXAMPLES_PER_CHUNK, stateful_step_count=STEPS_PER_EXAMPLE, deadline=None,
        database=None, suppress_health_check=list(HealthCheck), print_blob=False,
        report_multiple_bugs=False, phases=[Phase.generate, Phase.shrink])
    TOTALS.reset()
    start = time.monotonic()
    deadline = start + config.minutes * 60 if config.minutes else None
    failure = trace_path = None
    interrupted = False
    notes: list[str] = []
    chunk = 0
    try:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                break
            hypothesis_seed(config.seed * 1_000_003 + chunk)(machine)
            chunk += 1
            try:
                run_state_machine_as_test(machine, settings=run_settings)
            except BudgetSpent:
                break
            except ShrinkCapReached:
                notes.append(f"shrinking stopped at its cap of {config.shrink_seconds:g} s "
                             "(--shrink-seconds): the trace is the smallest failing example "
                             "found by then")
                break
            except (Exception, FatalFinding) as exc:
                if _during_interrupt(exc):  # Hypothesis's own handling failed under it
                    raise KeyboardInterrupt from exc
                if machine.last_failure is None:
                    raise
                break
            if progress:
                s = TOTALS.as_dict()
                hits = sum(i.get("hits", 0) for i in s["implementations"].values())
                evictions = sum(i.get("evictions", 0) for i in s["implementations"].values())
                progress(f"{budget.searched} steps, {s['examples']} examples, {hits} hits, "
                         f"{evictions} evictions, {time.monotonic() - start:.0f}s")
    except KeyboardInterrupt:
        interrupted = True
        if machine.last_failure is not None:
            notes.append("interrupted while shrinking: the trace is the smallest failing "
                         "example found so far")
    if machine.last_failure is not None:
        failure = machine.last_failure
        failure.meta.update(seed=config.seed, chunk=chunk - 1)
        trace_path = str(failure.save(config.trace_dir))
    known = {check: {"count": found["count"],
                     "trace": str(found["witness"].save(config.trace_dir))}
             for check, found in machine.known_found.items()}
    totals = TOTALS.as_dict()
    totals.update(steps=budget.searched, shrink_steps=budget.shrink_steps,
                  shrink_seconds=round(time.monotonic() - budget.found_at, 2)
                  if budget.found_at is not None else None,
                  shrink_capped=budget.shrink_capped)
    from bcr_verify.session import prompt_source
    totals["lru_relaxations"] = witnesses(
        totals, impls, config.block_size,
        prompt_source(config.workload, config.block_size).capacity_pages, config.workload)
    result = RunResult(config, impls, not_run, totals, time.monotonic() - start, failure,
                       trace_path, interrupted=interrupted, notes=notes,
                       provenance=provenance(impls, max_steps=config.max_steps,
                                             minutes=config.minutes, seed=config.seed,
                                             block_size=config.block_size,
                                             workload=config.workload,
                                             op_timeout=config.op_timeout,
                                             shrink_seconds=config.shrink_seconds))
    result.known = known
    if budget.found_at is not None:
        result.first_failure_seconds = round(budget.found_at - start, 3)
    if result.verdict == "pass":
        result.warnings = vacuity_warnings(totals, not_run)
    return result


def _during_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a KeyboardInterrupt was being handled."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__context__ or exc.__cause__
    return False


def witnesses(totals: dict, impls: list[str], block_size: int, capacity_pages: int,
              workload: str) -> dict:
    """Each relaxation of strict LRU, its counts and its shortest witness as a strict-LRU
    trace, inline (a passing run writes no trace files into the corpus).

    Returns ``{relaxation: {"meaning", "count": {impl: n}, "steps", "witness": trace}}``,
    and leaves only the counts in each implementation's stats. Save a witness as a file
    (``Trace.from_json(...).save(dir)``) and replay it to see the eviction refused.
    """
    from bcr_verify.models.reference import RELAXATIONS

    out: dict = {}
    for name, stats in totals.get("implementations", {}).items():
        shortest = stats.pop("lru_witnesses", {}) or {}
        for relaxation, count in stats.get("lru_deviations", {}).items():
            entry = out.setdefault(relaxation, {"meaning": RELAXATIONS[relaxation],
                                                "count": {}, "witness": None})
            entry["count"][name] = count
            steps = shortest.get(relaxation)
            if steps and (entry["witness"] is None or len(steps) < entry["steps"]):
                trace = Trace(implementations=list(impls), block_size=block_size,
                              capacity_pages=capacity_pages, steps=steps, strict_lru=True,
                              meta={"witness_of": relaxation, "workload": workload})
                entry["witness"], entry["steps"] = trace.to_json(), len(steps)
    return out


def write_json(report: dict, path: str) -> None:
    """Write ``report`` atomically: a reader never sees half a file, a crash leaves the old."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=dict))
    os.replace(tmp, target)
