"""A ready-made Hypothesis state machine that drives implementations in lockstep.

Use it as zarr's ``zarr.testing`` machines are used: configure a subclass and run its
``TestCase``::

    from bcr_verify.machine import LockstepMachine

    class MyCacheMachine(LockstepMachine):
        implementations = ["reference", "my_project.cache:make_cache"]
        block_size = 16

    TestMyCache = MyCacheMachine.TestCase

No ``@settings`` are fixed here, so ``--hypothesis-profile`` rules example counts and step
counts. Each rule is one :class:`~bcr_verify.lockstep.Lockstep` operation; the lockstep records
what actually ran, and when a check fails the machine keeps that record as a
:class:`~bcr_verify.trace.Trace` (the last one kept is Hypothesis's final, shrunk example).
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle, RuleBasedStateMachine, consumes, invariant, multiple, precondition, rule,
)

from bcr_verify.errors import FatalFinding, VerificationFailure
from bcr_verify.guard import DEFAULT_OP_TIMEOUT
from bcr_verify.lockstep import StepBudget
from bcr_verify.trace import Trace


class LockstepMachine(RuleBasedStateMachine):
    """Configure by overriding the class attributes below in a subclass."""

    implementations: list[str] = ["reference"]
    block_size: int = 16
    workload: str = "mixed"
    kv_replay: bool = False
    capacity_pages: int | None = None
    """Pool size per implementation; None sizes it from the workload so evictions happen."""
    max_running: int = 3
    """Requests running at once; more would pin most of a small pool and starve the cache."""
    op_timeout: float | None = DEFAULT_OP_TIMEOUT
    """Seconds one implementation call may take before it is reported hung."""
    budget: StepBudget | None = None
    """Shared by every example of a run: caps the steps searched, counts the steps shrunk."""
    strict_lru: bool = False
    """An eviction legal only under a relaxation of strict LRU is a divergence."""
    events: bool = False
    """Every lane that publishes KV-cache events is checked by :mod:`bcr_verify.events`."""
    known: tuple[str, ...] = ()
    """Checks already known to fail: a hit is counted (``known_found``) and ends the example
    quietly, so the search goes on for other findings."""
    known_found: dict | None = None
    """check -> {"count": examples that hit it, "witness": the shortest Trace}."""

    last_failure: Trace | None = None
    """The trace of the most recent failing example (the shrunk one, once Hypothesis is done)."""

    requests = Bundle("requests")

    def __init__(self):
        super().__init__()
        from bcr_verify.session import prompt_source

        source = prompt_source(self.workload, self.block_size)
        self._prompts = source.strategy
        self._capacity = self.capacity_pages or source.capacity_pages
        self._shrinking = bool(self.budget and self.budget.shrinking)
        self.lockstep = None
        self._fresh_lanes()
        self._explicit = any(l.adapter.contract.eviction in ("explicit", "lazy")
                             for l in self.lockstep.lanes)

    def _fresh_lanes(self) -> None:
        from bcr_verify.session import TOTALS, build_lockstep

        if self.lockstep is not None and not self._shrinking:
            TOTALS.add(self.lockstep, example=False)
        self.lockstep = build_lockstep(self.implementations, self.block_size, self._capacity,
                                       kv_replay=self.kv_replay, op_timeout=self.op_timeout,
                                       budget=self.budget, strict_lru=self.strict_lru,
                                       events=self.events)

    @classmethod
    def configure(cls, name: str = "ConfiguredLockstepMachine", **attrs) -> type["LockstepMachine"]:
        """A subclass with ``attrs`` set, e.g. ``configure(implementations=[...], block_size=1)``."""
        unknown = set(attrs) - {"implementations", "block_size", "workload", "kv_replay",
                                "capacity_pages", "max_running", "op_timeout", "budget",
                                "known", "strict_lru", "events"}
        if unknown:
            raise TypeError(f"configure() got unknown settings {sorted(unknown)}")
        return type(name, (cls,), {**attrs, "last_failure": None, "known_found": {}})

    def _run(self, operation, *args):
        try:
            return operation(*args)
        except (VerificationFailure, FatalFinding) as failure:
            trace = Trace(
                implementations=list(self.implementations), block_size=self.block_size,
                capacity_pages=self._capacity, steps=list(self.lockstep.steps),
                failure=failure.as_dict(), kv_replay=self.kv_replay, strict_lru=self.strict_lru,
                events=self.events,
                meta={"workload": self.workload, "source": "hypothesis"})
            if failure.check in self.known and isinstance(failure, VerificationFailure):
                found = type(self).known_found.setdefault(failure.check, {"count": 0})
                found["count"] += 1
                if "witness" not in found or len(trace.steps) < len(found["witness"].steps):
                    found["witness"] = trace
                self._fresh_lanes()  # and go on looking, from empty caches
                return None
            type(self).last_failure = trace
            if self.budget is not None:
                self.budget.found(failure, len(trace.steps))  # Hypothesis shrinks from here on
            raise

    @rule(data=st.data())
    def serve(self, data):
        """A request that runs to completion at once: the common case, and what fills caches."""
        rid = self._run(self.lockstep.begin, data.draw(self._prompts, label="tokens"))
        if rid is not None:
            self._run(self.lockstep.finish, rid)

    @precondition(lambda self: len(self.lockstep.requests) < self.max_running)
    @rule(target=requests, data=st.data())
    def begin(self, data):
        """A request that stays running, its prefix locked, until a later finish or abort."""
        rid = self._run(self.lockstep.begin, data.draw(self._prompts, label="tokens"))
        return multiple() if rid is None else rid

    @rule(rid=consumes(requests))
    def finish(self, rid):
        if rid in self.lockstep.requests:  # a flush since it began ended it already
            self._run(self.lockstep.finish, rid)

    @rule(rid=consumes(requests))
    def abort(self, rid):
        if rid in self.lockstep.requests:
            self._run(self.lockstep.abort, rid)

    @rule(data=st.data())
    def match(self, data):
        self._run(self.lockstep.match, data.draw(self._prompts, label="tokens"))

    @rule(fraction=st.integers(1, 50))
    def evict(self, fraction):
        """Evict ``fraction`` percent of the pool: small asks probe LRU order, large ones churn."""
        tokens = max(1, self._capacity * self.block_size * fraction // 100)
        self._run(self.lockstep.evict, tokens)

    @rule(pick=st.integers(0, 10_000))
    def evict_value(self, pick):
        if self._explicit:
            self._run(self.lockstep.evict_value, pick)

    @rule(when=st.integers(0, 9))
    def reset(self, when):
        """A flush, drawn rarely: one in ten times this rule fires, so caches can fill."""
        if when == 0:
            self._run(self.lockstep.reset)

    @invariant()
    def invariants_ran(self):
        # Lockstep.check() runs after every operation; this keeps the count honest in
        # --hypothesis-show-statistics and fails loudly if checks were switched off.
        assert self.lockstep.check_every >= 1, "invariant checks are disabled"

    def teardown(self):
        from bcr_verify.session import TOTALS
        from bcr_verify.shape import lockstep_shape, widest
        TOTALS.tree_shape = widest(TOTALS.tree_shape, lockstep_shape(self.lockstep))
        if self._shrinking:
            TOTALS.shrink_examples += 1
        else:
            TOTALS.add(self.lockstep)
