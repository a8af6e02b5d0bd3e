"""What a verification run can find: a divergence, or a broken invariant.

Both carry the implementation and the step, so a report can say who broke what, when.
"""

from __future__ import annotations


class VerificationFailure(AssertionError):
    """Base class: a cache did something its contract forbids. ``kind`` names the check."""

    kind = "failure"

    def __init__(self, impl: str, check: str, detail: str, step: int | None = None):
        self.impl, self.check, self.detail, self.step = impl, check, detail, step
        super().__init__(self._text())

    def _text(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        return f"{self.kind} in {self.impl}{where} [{self.check}]: {self.detail}"

    def at_step(self, step: int) -> "VerificationFailure":
        self.step = step
        self.args = (self._text(),)
        return self

    def as_dict(self) -> dict:
        return {"kind": self.kind, "impl": self.impl, "check": self.check,
                "detail": self.detail, "step": self.step}


class Divergence(VerificationFailure):
    """An implementation's observable result differs from what the model allows."""

    kind = "divergence"


class InvariantViolation(VerificationFailure):
    """An implementation's internal state broke a structural invariant."""

    kind = "invariant violation"


class AdapterUnavailable(RuntimeError):
    """An implementation cannot be built here; the message says why and what would fix it."""
