"""Crash survival: the work runs in a child process, and the parent outlives whatever it does.

A cache in native code can take its process down (a segfault, an abort, ``os._exit``) or
hang inside a call that never returns to the interpreter, where no in-process watchdog can
reach it. So the command-line commands that drive implementations fork once, before
importing any of them, and the parent only watches:

* the child journals every step before running it (:mod:`bcr_verify.journal`) and keeps the
  call in progress in a :class:`~bcr_verify.guard.Beacon` in shared memory;
* if the child dies without saying it finished, the parent rebuilds the trace from the
  journal and hands a :class:`Death` (how it died, in which call of which implementation, at
  which step) to the command, which reports it as "implementation crashed" and saves the
  trace, so ``bcr-verify replay`` can reproduce the crash, supervised in its turn;
* a call still running ``op_timeout + grace`` seconds after it began (the in-process
  watchdog had its chance at ``op_timeout``) is a hang in native code: the parent kills the
  child and reports "implementation hung";
* SIGINT / SIGTERM to the parent is passed to the child once, as SIGTERM, which the child
  turns into ``KeyboardInterrupt`` so it writes its evidence and reports "interrupted"; a
  second signal, or a child that does not finish within ``INTERRUPT_GRACE_S``, is killed and
  the evidence is rebuilt from the journal instead.

A fork costs milliseconds once per command; the journal costs a ``write(2)`` per step
(measured in ``docs/reliability.md``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bcr_verify import interrupts, journal
from bcr_verify.cli import EXIT_INTERNAL, EXIT_INTERRUPTED
from bcr_verify.guard import BEACON, DONE, ENTERED

INTERRUPT_GRACE_S = 30.0
"""How long an interrupted child may take to write its report and trace."""


@dataclass
class Death:
    """How a supervised child ended without finishing its work."""

    how: str
    """``signal 11 (SIGSEGV)``, ``exit status 3``, or why the parent killed it."""
    kind: str
    """``implementation crashed``, ``implementation hung`` or ``interrupted``."""
    impl: str
    method: str | None
    step: int | None
    origin: dict | None
    steps: list = field(default_factory=list)

    @property
    def in_call(self) -> bool:
        return self.method is not None

    def failure(self) -> dict:
        where = (f"the process died inside {self.impl}.{self.method}()" if self.in_call
                 else "the process died outside any implementation call")
        check = self.how
        if self.kind == "implementation hung":
            where, check = f"{self.impl}.{self.method}() never returned", "timeout"
        return {"kind": self.kind, "impl": self.impl, "check": check,
                "detail": f"{where}: {self.how}", "step": self.step}

    def trace(self, meta: dict | None = None):
        """The journalled steps since the lanes were fresh, as a replayable trace."""
        from bcr_verify.trace import Trace

        if self.origin is None:
            return None
        return Trace(implementations=list(self.origin["implementations"]),
                     block_size=self.origin["block_size"],
                     capacity_pages=self.origin["capacity_pages"],
                     kv_replay=self.origin.get("kv_replay", False), steps=list(self.steps),
                     strict_lru=self.origin.get("strict_lru", False),
                     events=self.origin.get("events", False),
                     failure=self.failure(), meta={"source": "journal", **(meta or {})})


def supervised(work: Callable[[], int], on_death: Callable[[Death], int],
               op_timeout: float | None) -> int:
    """Run ``work()`` in a forked child; its exit code, or ``on_death(death)``'s."""
    workdir = Path(tempfile.mkdtemp(prefix="bcr-verify-"))
    journal_path = workdir / "journal"
    BEACON.share()
    for slot in range(len(BEACON.slots)):
        BEACON.slots[slot] = 0
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _child(work, journal_path)
    try:
        return _watch(child, on_death, op_timeout, journal_path)
    finally:
        journal_path.unlink(missing_ok=True)
        workdir.rmdir()


def _child(work: Callable[[], int], journal_path: Path) -> None:
    """Never returns: runs ``work`` and leaves through ``os._exit``."""
    code = EXIT_INTERNAL
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards it, once
        journal.JOURNAL = journal.Journal(journal_path)
        with interrupts.handling(signal.SIGTERM):
            code = work()
            BEACON.slots[DONE] = code + 1
    except SystemExit as exc:  # sys.exit() from inside an implementation: not finished
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # the forwarded interrupt landed outside the command's handler
        print("interrupted", file=sys.stderr)
        BEACON.slots[DONE] = EXIT_INTERRUPTED + 1
        code = EXIT_INTERRUPTED
    except BaseException:  # noqa: BLE001 - the last line of defence of the child
        traceback.print_exc()
        print("bcr-verify: internal error (exit 3): the traceback above is bcr_verify's own; "
              "please report it", file=sys.stderr)
        BEACON.slots[DONE] = EXIT_INTERNAL + 1
        code = EXIT_INTERNAL
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the parent is killed outright (best effort)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _watch(child: int, on_death: Callable[[Death], int], op_timeout: float | None,
           journal_path: Path) -> int:
    state = {"interrupted_at": None, "killed": None}

    def forward(signum, frame):
        if state["interrupted_at"] is None:
            state["interrupted_at"] = time.monotonic()
            _kill(child, signal.SIGTERM)
        elif state["killed"] is None:
            state["killed"] = "interrupted twice: the process was killed"
            _kill(child, signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    backstop = None if op_timeout is None else op_timeout + max(5.0, op_timeout)
    hung = False
    try:
        while True:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
            entered = BEACON.slots[ENTERED]
            if (backstop is not None and entered and state["killed"] is None
                    and time.monotonic_ns() - entered > backstop * 1e9):
                hung = True
                state["killed"] = (f"no return within {backstop:g} s (the in-process timeout of "
                                   f"{op_timeout:g} s could not end it: native code, or Python "
                                   "that dropped its exception); the process was killed")
                _kill(child, signal.SIGKILL)
            began = state["interrupted_at"]
            if (began is not None and state["killed"] is None
                    and time.monotonic() - began > INTERRUPT_GRACE_S):
                state["killed"] = (f"interrupted, and still running {INTERRUPT_GRACE_S:g} s "
                                   "later: the process was killed")
                _kill(child, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    done = BEACON.slots[DONE]
    if done:
        return done - 1
    origin, steps = journal.read(journal_path)
    names = list((origin or {}).get("implementations", []))
    lane = BEACON.lane_index()
    in_call = bool(BEACON.slots[ENTERED])
    if hung:
        kind, how = "implementation hung", state["killed"]
    elif state["killed"] is not None or (state["interrupted_at"] and not in_call):
        kind, how = "interrupted", state["killed"] or _how(status)
    else:
        kind, how = "implementation crashed", _how(status)
    return on_death(Death(
        how=how, kind=kind, impl=names[lane] if in_call and lane < len(names) else "unknown",
        method=BEACON.method_name() if in_call else None,
        step=len(steps) - 1 if steps else None, origin=origin, steps=steps))


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        return f"signal {number} ({name})"
    return f"exit status {os.WEXITSTATUS(status)}"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
