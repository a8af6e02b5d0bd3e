"""Traces: a failing run's steps as JSON, replayed later without the Hypothesis engine.

A trace names the implementations, block size and pool capacity it ran with, the version of
each implementation it was recorded on, the executed steps with their arguments, and the
check that failed. Replaying it rebuilds the same lanes and applies the same steps through
:class:`~bcr_verify.lockstep.Lockstep`, so it is stable across Hypothesis versions. Traces
are written atomically under a content-derived name, with the process's umask, and never
overwritten, so a crash or a second failure cannot lose one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bcr_verify.errors import FatalFinding, UsageError, VerificationFailure

FORMAT = "bcr-verify-trace/1"


def file_mode() -> int:
    """The mode ``open()`` would give a new file now (``mkstemp`` alone makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@dataclass
class Trace:
    implementations: list[str]
    block_size: int
    capacity_pages: int
    steps: list[dict]
    failure: dict | None = None
    kv_replay: bool = False
    meta: dict = field(default_factory=dict)
    strict_lru: bool = False
    """Recorded with ``--strict-lru``: replays judge eviction by strict LRU too."""
    events: bool = False
    """Recorded with ``--events``: replays check the KV-cache events too."""
    versions: dict = field(default_factory=dict)
    """Implementation -> ``package==version`` it was recorded on (filled in when saved)."""
    check_every: int = 1
    """Invariants run after every ``check_every``-th step and after the last, as when it was
    recorded. A soak's window saved whole (a known failure's witness, a crash, a window that
    would not shrink), or shrunk where only the soak's cadence reproduces its failure
    (checking every step met a known failure first), keeps that cadence; anything else
    checks every step."""

    def to_json(self) -> dict:
        return {"format": FORMAT, "implementations": self.implementations,
                "block_size": self.block_size, "capacity_pages": self.capacity_pages,
                "kv_replay": self.kv_replay, "strict_lru": self.strict_lru,
                "events": self.events,
                "versions": self.versions,
                **({"check_every": self.check_every} if self.check_every != 1 else {}),
                "failure": self.failure, "meta": self.meta, "steps": self.steps}

    @classmethod
    def from_json(cls, data: dict, source: str = "trace") -> "Trace":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"{source}: not a bcr-verify trace (expected format {FORMAT!r})")
        try:
            trace = cls(implementations=[str(i) for i in data["implementations"]],
                        block_size=int(data["block_size"]),
                        capacity_pages=int(data["capacity_pages"]),
                        steps=list(data["steps"]), failure=data.get("failure"),
                        kv_replay=bool(data.get("kv_replay", False)),
                        strict_lru=bool(data.get("strict_lru", False)),
                        events=bool(data.get("events", False)),
                        meta=dict(data.get("meta") or {}),
                        versions=dict(data.get("versions") or {}),
                        check_every=int(data.get("check_every", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{source}: malformed trace ({type(exc).__name__}: {exc})") from None
        bad = next((i for i, s in enumerate(trace.steps) if not isinstance(s, dict)
                    or not isinstance(s.get("op"), str)
                    or not isinstance(s.get("args", {}), dict)), None)
        if bad is not None:
            raise UsageError(f"{source}: malformed trace (step {bad} is not "
                             '{"op": NAME, "args": {...}})')
        if (trace.block_size < 1 or trace.capacity_pages < 1 or trace.check_every < 1
                or not trace.implementations):
            raise UsageError(f"{source}: malformed trace (needs implementations, block_size "
                             ">= 1, capacity_pages >= 1 and check_every >= 1)")
        return trace

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"trace {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"trace {path}: cannot be read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"trace {path}: not JSON ({exc})") from None
        return cls.from_json(data, source=f"trace {path}")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write into ``directory`` under a name derived from the failed check and the
        content; returns the path."""
        from bcr_verify.adapters.registry import resolve

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.implementations:
            if name not in self.versions:
                try:
                    self.versions[name] = resolve(name).version()
                except Exception as exc:  # noqa: BLE001 - never lose a trace over provenance
                    self.versions[name] = f"unknown ({type(exc).__name__})"
        text = json.dumps(self.to_json(), indent=1)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        check = re.sub(r"[^A-Za-z0-9._+=]+", "-", (self.failure or {}).get("check", "trace"))
        check = check.strip("-")[:40] or "trace"
        path = directory / f"{check}-{digest}.json"
        if path.exists():
            return path
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @property
    def cadence(self) -> str:
        """How a replay checks invariants, for a header line: nothing when after every step."""
        if self.check_every == 1:
            return ""
        return f" | invariants every {self.check_every} steps and after the last, as recorded"

    def render(self) -> str:
        """The steps as short lines, one per step, the failing step marked."""
        failed_at = (self.failure or {}).get("step")
        lines = [f"# {', '.join(self.implementations)} | block size {self.block_size} | "
                 f"capacity {self.capacity_pages} pages{self.cadence}"]
        if self.versions:
            lines.append(f"# recorded on {', '.join(sorted(set(self.versions.values())))}")
        for i, step in enumerate(self.steps):
            mark = "  <-- " + self.failure["check"] if i == failed_at else ""
            lines.append(f"{i:>4}  {step['op']}({_args(step.get('args', {}))}){mark}")
        if self.failure:
            lines.append(f"# {self.failure['kind']} in {self.failure['impl']}: "
                         f"{self.failure['detail']}")
        return "\n".join(lines)


def _args(args: dict) -> str:
    out = []
    for key, value in args.items():
        if key == "tokens" and isinstance(value, list) and len(value) > 8:
            value = f"<{len(value)} tokens: {value[:4]}...{value[-2:]}>"
        out.append(f"{key}={value}")
    return ", ".join(out)


def replay(trace: Trace, implementations: Sequence[str] | None = None,
           kv_replay: bool | None = None, op_timeout: float | None = None,
           ) -> tuple[VerificationFailure | FatalFinding | None, "object"]:
    """Re-run ``trace`` (optionally on other implementations). Returns (failure, lockstep).

    A step that does not apply here (a ``finish`` of a request that this replay never
    admitted) is a :class:`UsageError` naming the step.
    """
    from bcr_verify.guard import DEFAULT_OP_TIMEOUT
    from bcr_verify.session import build_lockstep

    lockstep = build_lockstep(
        list(implementations or trace.implementations), trace.block_size, trace.capacity_pages,
        kv_replay=trace.kv_replay if kv_replay is None else kv_replay,
        check_every=trace.check_every,
        op_timeout=DEFAULT_OP_TIMEOUT if op_timeout is None else op_timeout,
        strict_lru=trace.strict_lru, events=trace.events)
    for index, step in enumerate(trace.steps):
        try:
            lockstep.apply(step)
        except (VerificationFailure, FatalFinding) as failure:
            return failure, lockstep
        except UsageError as exc:
            raise UsageError(f"step {index} ({step.get('op')}): {exc}") from None
    return final_check(lockstep), lockstep


def final_check(lockstep) -> VerificationFailure | FatalFinding | None:
    """The invariants once more after the last step of a lockstep that checks them every
    ``check_every`` > 1 steps (a trace recorded so), as a soak checks before each flush and
    at its end; a failure there is marked at the last step."""
    if lockstep.check_every <= 1 or not lockstep.steps:
        return None
    try:
        lockstep.check()
    except (VerificationFailure, FatalFinding) as failure:
        return failure.at_step(len(lockstep.steps) - 1)
    return None
