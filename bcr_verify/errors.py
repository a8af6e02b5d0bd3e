"""What a verification run can find, and what stops it before it can find anything.

Findings about an implementation carry the implementation and the step, so a report can say
who broke what, when:

* :class:`Divergence` and :class:`InvariantViolation`: a result or a structure the model
  forbids;
* :class:`ImplementationRaised`: the implementation's own code raised (a ``KeyError`` in
  ``insert``, a ``RecursionError`` on a deep tree). Hypothesis shrinks it like any failure;
* :class:`ImplementationHung` and :class:`ImplementationCrashed`: a call that never returned,
  or a process that died. These are ``BaseException``\\ s (via :class:`FatalFinding`), so they
  stop Hypothesis at once instead of being shrunk: every shrink attempt would cost a timeout,
  or the process.

Errors that are not findings: :class:`UsageError` (bad input, named; exit 2),
:class:`SetupError` (an implementation that cannot even be built; exit 2) and
:class:`AdapterUnavailable` (an implementation that cannot exist here, with why).
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


class ImplementationRaised(VerificationFailure):
    """An implementation's code raised instead of returning. ``check`` is the exception type."""

    kind = "implementation raised"


class FatalFinding(BaseException):
    """A finding after which the implementation cannot be driven further in this process.

    Carries a :class:`VerificationFailure`-shaped record (``failure``). A ``BaseException``
    so that neither Hypothesis nor an implementation's ``except Exception`` swallows it.
    """

    kind = "fatal"

    def __init__(self, impl: str, check: str, detail: str, step: int | None = None):
        self.failure = VerificationFailure(impl, check, detail, step)
        self.failure.kind = self.kind
        super().__init__(self.failure._text())

    def at_step(self, step: int) -> "FatalFinding":
        self.failure.at_step(step)
        self.args = self.failure.args
        return self

    def as_dict(self) -> dict:
        return self.failure.as_dict()

    @property
    def impl(self) -> str:
        return self.failure.impl

    @property
    def check(self) -> str:
        return self.failure.check

    @property
    def step(self) -> int | None:
        return self.failure.step


class ImplementationHung(FatalFinding):
    """A call into the implementation did not return within the per-operation timeout."""

    kind = "implementation hung"


class ImplementationCrashed(FatalFinding):
    """The process running the implementation died (a signal, or an exit from inside it)."""

    kind = "implementation crashed"


class UsageError(ValueError):
    """Bad input from the user; the message names the argument and what would be accepted."""


class SetupError(UsageError):
    """An implementation could not be built (its factory raised, or returned no cache)."""


class AdapterUnavailable(RuntimeError):
    """An implementation cannot be built here; the message says why and what would fix it."""
