"""``bcr-verify run``: the lockstep machine under Hypothesis, to a step or time budget.

Hypothesis runs in chunks of examples, each chunk with its own seed derived from the run's
seed, until the budget is spent; this gives progress between chunks and a budget in steps or
minutes, which Hypothesis's own settings cannot express. A failure stops the run, is shrunk by
Hypothesis, saved as a trace and printed with the command that replays it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed as hypothesis_seed, settings
from hypothesis.stateful import run_state_machine_as_test

from bcr_verify.adapters.registry import DEFAULT, resolve
from bcr_verify.errors import VerificationFailure
from bcr_verify.machine import LockstepMachine
from bcr_verify.session import TOTALS, vacuity_warnings
from bcr_verify.trace import Trace

STEPS_PER_EXAMPLE = 50
EXAMPLES_PER_CHUNK = 10


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

    @property
    def ok(self) -> bool:
        return self.failure is None

    def as_dict(self) -> dict:
        return {
            "ok": self.ok, "implementations": self.implementations, "not_run": self.not_run,
            "block_size": self.config.block_size, "seed": self.config.seed,
            "workload": self.config.workload, "kv_replay_enabled": self.config.kv_replay,
            "seconds": round(self.seconds, 2),
            "steps_per_second": round(self.totals.get("steps", 0) / self.seconds, 1)
            if self.seconds else 0.0,
            "vacuous_warnings": self.warnings, **self.totals,
            "failure": self.failure.failure if self.failure else None,
            "trace": self.trace_path,
        }


def select_implementations(names: list[str] | None, block_size: int) -> tuple[list[str], dict]:
    """The implementations to run and, for defaults, those skipped with the reason.

    Named implementations must be available (a clear error otherwise); the default set drops
    unavailable ones and reports them, so a pass never hides a skipped implementation.
    """
    chosen, not_run = [], {}
    for name in names or DEFAULT:
        why = resolve(name).availability()
        if why is None:
            chosen.append(name)
        elif names:
            raise ValueError(f"impl {name!r} is unavailable: {why}")
        else:
            not_run[name] = why
    return chosen, not_run


def run(config: RunConfig, progress=None) -> RunResult:
    if config.max_steps is None and config.minutes is None:
        raise ValueError("give max_steps or minutes")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {config.max_steps}")
    if config.minutes is not None and config.minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {config.minutes}")
    impls, not_run = select_implementations(config.implementations, config.block_size)
    machine = LockstepMachine.configure(
        implementations=impls, block_size=config.block_size, workload=config.workload,
        kv_replay=config.kv_replay)
    run_settings = settings(
        max_examples=EXAMPLES_PER_CHUNK, stateful_step_count=STEPS_PER_EXAMPLE, deadline=None,
        database=None, suppress_health_check=list(HealthCheck), print_blob=False,
        phases=[Phase.generate, Phase.shrink])
    TOTALS.reset()
    start = time.monotonic()
    deadline = start + config.minutes * 60 if config.minutes else None
    failure = trace_path = None
    chunk = 0
    while True:
        if config.max_steps is not None and TOTALS.steps >= config.max_steps:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        hypothesis_seed(config.seed * 1_000_003 + chunk)(machine)
        chunk += 1
        try:
            run_state_machine_as_test(machine, settings=run_settings)
        except Exception:
            if machine.last_failure is None:
                raise
            failure = machine.last_failure
            failure.meta.update(seed=config.seed, chunk=chunk - 1)
            trace_path = str(failure.save(config.trace_dir))
            break
        if progress:
            s = TOTALS.as_dict()
            hits = sum(i.get("hits", 0) for i in s["implementations"].values())
            evictions = sum(i.get("evictions", 0) for i in s["implementations"].values())
            progress(f"{s['steps']} steps, {s['examples']} examples, {hits} hits, "
                     f"{evictions} evictions, {time.monotonic() - start:.0f}s")
    totals = TOTALS.as_dict()
    result = RunResult(config, impls, not_run, totals, time.monotonic() - start, failure,
                       trace_path)
    if result.ok:
        result.warnings = vacuity_warnings(totals, not_run)
    return result


def write_json(result: RunResult, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result.as_dict(), indent=2, default=dict))
