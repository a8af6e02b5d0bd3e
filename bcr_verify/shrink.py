"""Delta-debugging of failing step lists, for failures found without Hypothesis (soak runs).

A soak finds a divergence after an arbitrary history; this module cuts that history down to a
short trace with the same failure, as Hypothesis does for its own examples. Steps are kept in
an *abstract* form where ``finish``/``abort`` name the index of the ``begin`` step they end
(``ref``) instead of a request id, because ids are handed out sequentially per lockstep and
change as soon as a step before them is removed. A candidate is re-run on fresh lanes with
checks after every step; a ``finish`` or ``abort`` whose ``begin`` is gone (removed, rejected
or flushed) is skipped, so every candidate is a valid run. It counts as failing only if it
fails the *same* check in the *same* implementation as the original. A failure the soak was
told is known (``--known``) is gone past as the soak goes past it, every lane on a fresh cache;
where only the soak's own invariant cadence reproduces the failure, candidates run at it.

:func:`ddmin` is Zeller's minimising delta-debugging; the result is 1-minimal (no single step
can be removed), within a time budget.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Sequence

from bcr_verify.errors import UsageError, VerificationFailure
from bcr_verify.trace import Trace, final_check

ENDS = ("finish", "abort")


def abstract_steps(steps: Sequence[dict], begin_index_of_rid: dict[int, int]) -> list[dict]:
    """``steps`` with each ``finish``/``abort`` rid replaced by the index of its ``begin``."""
    out = []
    for step in steps:
        op, args = step["op"], dict(step.get("args", {}))
        if op in ENDS:
            out.append({"op": op, "args": {}, "ref": begin_index_of_rid.get(args["rid"], -1)})
        else:
            out.append({"op": op, "args": args})
    return out


def rids_by_replay(trace: Trace) -> dict[int, int]:
    """Which begin step got which rid when ``trace`` runs on fresh lanes (rid -> step index)."""
    from bcr_verify.session import build_lockstep

    lockstep = build_lockstep(trace.implementations, trace.block_size, trace.capacity_pages,
                              kv_replay=False, check_every=0, strict_lru=trace.strict_lru,
                              events=trace.events)
    found = {}
    for i, step in enumerate(trace.steps):
        try:
            got = lockstep.apply(step)
        except (VerificationFailure, UsageError):
            break
        if step["op"] == "begin" and got is not None:
            found[got] = i
    return found


class Replayed(NamedTuple):
    """What :func:`run_abstract` saw."""

    failure: VerificationFailure | None
    steps: list[dict]
    """The concrete steps since the lanes last started fresh: a trace that replays alone."""
    ran: int
    """How many of the abstract steps ran, the failing one included."""
    known_met: int
    """How often a known check failed and every lane started again on a fresh cache."""


def run_abstract(trace: Trace, steps: Sequence[dict], known: Sequence[str] = ()) -> Replayed:
    """Run abstract ``steps`` on fresh lanes, with checks every ``trace.check_every`` steps.

    A failure of a check in ``known`` is met as the soak meets it (``--known``): every lane
    starts again on a fresh cache and the steps go on, those ending a request begun before
    skipped. Checking after every step can meet a known failure the soak, checking every
    ``check_every`` steps, had not yet seen; stopping there would shrink the known failure
    in place of the soak's new one."""
    from bcr_verify.session import build_lockstep, start_afresh

    lockstep = build_lockstep(trace.implementations, trace.block_size, trace.capacity_pages,
                              kv_replay=trace.kv_replay, check_every=trace.check_every,
                              strict_lru=trace.strict_lru, events=trace.events)
    rid_of: dict[int, int] = {}
    met = 0
    for ran, step in enumerate(steps, 1):
        op = step["op"]
        try:
            if op in ENDS:
                rid = rid_of.get(step["ref"])
                if rid is None or rid not in lockstep.requests:
                    continue
                getattr(lockstep, op)(rid)
            else:
                got = lockstep.apply({"op": op, "args": step["args"]})
                if op == "begin" and got is not None:
                    rid_of[step.get("index", -2)] = got
        except VerificationFailure as failure:
            if failure.check not in known:
                return Replayed(failure, list(lockstep.steps), ran, met)
            met += 1
            start_afresh(lockstep)
            rid_of.clear()
        except UsageError:  # a candidate that does not apply: not the failure
            return Replayed(None, list(lockstep.steps), ran, met)
    failure = final_check(lockstep)
    if failure is not None and failure.check not in known:
        return Replayed(failure, list(lockstep.steps), len(steps), met)
    return Replayed(None, list(lockstep.steps), len(steps), met + (failure is not None))


class Interrupted(Exception):
    """Shrinking was interrupted; ``best`` is the smallest failing list found so far."""

    def __init__(self, best: list):
        super().__init__("shrinking interrupted")
        self.best = best


def ddmin(items: list, fails: Callable[[list], bool], deadline: float | None = None,
          on_smaller: Callable[[int], None] | None = None) -> list:
    """The smallest sublist of ``items`` found that still ``fails`` (1-minimal if time allows);
    ``on_smaller`` hears the length of each smaller failing list as it is found.

    A ``KeyboardInterrupt`` becomes :class:`Interrupted` carrying the best list so far.
    """
    def test(candidate):
        try:
            return fails(candidate)
        except KeyboardInterrupt:
            raise Interrupted(items) from None

    n = 2
    while len(items) >= 2:
        if deadline is not None and time.monotonic() > deadline:
            break
        chunk = max(1, len(items) // n)
        subsets = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        reduced = False
        for i, subset in enumerate(subsets):  # try a subset alone
            if len(subsets) > 2 and test(subset):
                items, n, reduced = subset, 2, True
                break
        if not reduced:
            for i in range(len(subsets)):  # try the complement
                complement = [x for j, s in enumerate(subsets) if j != i for x in s]
                if test(complement):
                    items, n, reduced = complement, max(n - 1, 2), True
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
        if reduced and on_smaller:
            on_smaller(len(items))
        if not reduced:
            if n >= len(items):
                break
            n = min(len(items), n * 2)
    return items


def shrink(trace: Trace, begin_index_of_rid: dict[int, int] | None = None,
           seconds: float = 60.0, progress: Callable[[str], None] | None = None,
           known: Sequence[str] = ()) -> tuple[Trace, dict]:
    """A shorter trace failing the same way as ``trace``; plus how the shrink went.

    ``begin_index_of_rid`` maps each rid in ``trace`` to its begin step; by default it is
    found by replaying ``trace`` on fresh lanes (right for traces that start from empty lanes).
    Candidates are checked after every step; only where that meets a known failure first and
    the lanes, started again, never reach the failure, at ``trace.check_every`` as recorded.
    Shrinking stops after ``seconds`` (``info["capped"]``); ``progress`` hears each smaller
    failing trace found. A failure of a check in ``known`` is gone past as the soak goes past
    it (:func:`run_abstract`); ``info["known_met"]`` counts those a replay checking every step
    met, and ``info["check_every"]`` is there when the trace keeps the recorded cadence.
    """
    start = time.monotonic()
    if begin_index_of_rid is None:
        begin_index_of_rid = rids_by_replay(trace)
    steps = abstract_steps(trace.steps, begin_index_of_rid)
    for i, step in enumerate(steps):
        step["index"] = i
    recorded, trace = trace, dataclasses.replace(trace, check_every=1)
    first = run_abstract(trace, steps, known)
    tests, known_met = [1], first.known_met
    if first.failure is None and known_met and recorded.check_every > 1:
        trace = recorded
        first = run_abstract(trace, steps, known)
        tests[0] += 1
    original = first.failure
    info = {"original_steps": len(trace.steps), "reproduced": original is not None,
            "tests": tests[0], **({"known_met": known_met} if known else {}),
            **({"check_every": trace.check_every} if trace.check_every > 1 else {})}
    if original is None:
        info.update(shrunk_steps=len(recorded.steps), seconds=round(time.monotonic() - start, 2))
        return recorded, info
    want = (original.impl, original.check)

    def fails(candidate: list) -> bool:
        tests[0] += 1
        failure = run_abstract(trace, candidate, known).failure
        return failure is not None and (failure.impl, failure.check) == want

    # Everything after the failing step is irrelevant: cut there first.
    steps = steps[:first.ran]
    try:
        small = ddmin(steps, fails, deadline=start + seconds, on_smaller=progress and (
            lambda n: progress(f"shrinking: a failing trace of {n} steps, {tests[0]} tried, "
                               f"{time.monotonic() - start:.0f}s of at most {seconds:g}s")))
    except Interrupted as stop:
        small, info["interrupted"] = stop.best, True
    last = run_abstract(trace, small, known)
    failure, concrete = last.failure, last.steps
    if failure is None:  # budget ran out mid-way on a flaky candidate: keep the original
        failure, concrete = original, first.steps
    shrunk = Trace(implementations=list(trace.implementations), block_size=trace.block_size,
                   capacity_pages=trace.capacity_pages, steps=concrete,
                   failure=failure.as_dict(), kv_replay=trace.kv_replay,
                   strict_lru=trace.strict_lru, events=trace.events,
                   check_every=trace.check_every,
                   meta={**trace.meta, "shrunk_by": "ddmin",
                         "unshrunk_steps": len(trace.steps)})
    info.update(shrunk_steps=len(concrete), tests=tests[0],
                seconds=round(time.monotonic() - start, 2),
                capped=time.monotonic() > start + seconds)
    return shrunk, info
