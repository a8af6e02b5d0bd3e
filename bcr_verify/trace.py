"""Traces: a failing run's steps as JSON, replayed later without the Hypothesis engine.

A trace names the implementations, block size and pool capacity it ran with, the executed
steps with their arguments, and the check that failed. Replaying it rebuilds the same lanes
and applies the same steps through :class:`~bcr_verify.lockstep.Lockstep`, so it is stable
across Hypothesis versions. Traces are written atomically under a content-derived name and
never overwritten, so a crash or a second failure cannot lose one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bcr_verify.errors import VerificationFailure

FORMAT = "bcr-verify-trace/1"


@dataclass
class Trace:
    implementations: list[str]
    block_size: int
    capacity_pages: int
    steps: list[dict]
    failure: dict | None = None
    kv_replay: bool = False
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "implementations": self.implementations,
                "block_size": self.block_size, "capacity_pages": self.capacity_pages,
                "kv_replay": self.kv_replay, "failure": self.failure, "meta": self.meta,
                "steps": self.steps}

    @classmethod
    def from_json(cls, data: dict, source: str = "trace") -> "Trace":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a bcr-verify trace (expected format {FORMAT!r})")
        try:
            return cls(implementations=list(data["implementations"]),
                       block_size=int(data["block_size"]),
                       capacity_pages=int(data["capacity_pages"]),
                       steps=list(data["steps"]), failure=data.get("failure"),
                       kv_replay=bool(data.get("kv_replay", False)), meta=data.get("meta", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: malformed trace ({exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"trace {path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"trace {path}: not JSON ({exc})") from None
        return cls.from_json(data, source=f"trace {path}")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write into ``directory`` under a name derived from the content; returns the path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=1)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        check = (self.failure or {}).get("check", "trace").replace(" ", "-")
        path = directory / f"{check}-{digest}.json"
        if path.exists():
            return path
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def render(self) -> str:
        """The steps as short lines, one per step, the failing step marked."""
        failed_at = (self.failure or {}).get("step")
        lines = [f"# {', '.join(self.implementations)} | block size {self.block_size} | "
                 f"capacity {self.capacity_pages} pages"]
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
           kv_replay: bool | None = None) -> tuple[VerificationFailure | None, "object"]:
    """Re-run ``trace`` (optionally on other implementations). Returns (failure, lockstep)."""
    from bcr_verify.session import build_lockstep

    lockstep = build_lockstep(
        list(implementations or trace.implementations), trace.block_size, trace.capacity_pages,
        kv_replay=trace.kv_replay if kv_replay is None else kv_replay)
    try:
        for step in trace.steps:
            lockstep.apply(step)
    except VerificationFailure as failure:
        return failure, lockstep
    return None, lockstep
