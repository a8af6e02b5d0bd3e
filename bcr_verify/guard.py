"""Every call into an implementation ends in a verdict: it returns, raises, hangs or crashes.

:func:`guard` wraps an adapter's methods so that

* an exception from the implementation (or its thin adapter) becomes
  :class:`~bcr_verify.errors.ImplementationRaised`, naming the call, the exception and where
  it was raised, and is shrunk and saved like any other failure;
* a call still running after ``op_timeout`` seconds becomes
  :class:`~bcr_verify.errors.ImplementationHung`, raised in the main thread by a watchdog
  thread (through :func:`_thread.interrupt_main`, so it lands at the next Python bytecode);
* the call in progress is always written to the process's :class:`Beacon`. When bcr_verify
  runs the work in a supervised child (:mod:`bcr_verify.supervise`), the beacon lives in
  memory shared with the parent, which therefore knows which call of which implementation
  was running when the child died, and can end a hang in native code that never returns
  to the interpreter.

Each call's time is also added up per method (:class:`CallTimes`, ``adapter.call_times``):
the guard reads the clock on entry anyway, so the soak's harness-overhead ratio costs one more
clock read per call rather than a second wrapper.

The cost on a well-behaved call is a few hundred nanoseconds: three stores into the beacon,
two clock reads and a ``try``. The wrapper takes positional arguments only: a ``**kwargs``
costs every call a dict (callers pass adapter arguments by position, as the protocol
declares them).
"""

from __future__ import annotations

import _thread
import mmap
import signal
import threading
import time
import traceback
from bcr_verify.errors import (
    ImplementationHung, ImplementationRaised, InvariantViolation, VerificationFailure,
)

DEFAULT_OP_TIMEOUT = 10.0
"""Seconds one call may take. Calls here take micro- to milliseconds; 10 s leaves room for a
loaded CI machine and a slow first call, and still ends a hang within a CI job."""

METHODS = ("match", "lock", "admit", "unlock", "insert", "evict_tokens", "evict_value", "alloc",
           "free", "available_pages", "sizes", "take_events", "check_invariants", "reset")
"""The adapter calls the engine makes; their index is what the beacon stores."""

CALL, STEP, ENTERED, DONE = range(4)
"""Beacon slots. ``CALL``: the call in progress, as lane index × ``len(METHODS)`` + method
index (one store per call)."""
_SLOTS = 8
_HANG_SIGNAL = signal.SIGUSR2
"""Which Python-level handler the watchdog trips; no OS signal is sent (interrupt_main)."""


class Beacon:
    """Where this process is: which lane, which call, which step, and since when.

    ``ENTERED`` is a ``time.monotonic_ns()`` stamp (one system-wide clock, so a parent
    process can compare it with its own) or 0 between calls.
    """

    def __init__(self):
        self._buffer = bytearray(8 * _SLOTS)
        self.slots = memoryview(self._buffer).cast("q")
        self.lanes: list[str] = []
        """Lane names of the current lockstep, for messages; set by the lockstep."""

    def share(self) -> None:
        """Move into anonymous shared memory, which a child made by ``fork`` shares with its
        parent. Call before any lane is built: guarded calls hold on to ``slots``."""
        self._buffer = mmap.mmap(-1, 8 * _SLOTS)
        self.slots = memoryview(self._buffer).cast("q")

    def lane_index(self) -> int:
        return self.slots[CALL] // len(METHODS)

    def method_index(self) -> int:
        return self.slots[CALL] % len(METHODS)

    def lane_name(self) -> str:
        index = self.lane_index()
        return self.lanes[index] if 0 <= index < len(self.lanes) else "?"

    def method_name(self) -> str:
        return METHODS[self.method_index()]

    def where(self) -> str:
        return f"{self.lane_name()}.{self.method_name()}()"


BEACON = Beacon()
"""This process's beacon; :mod:`bcr_verify.supervise` shares it with a child it watches."""


class Watchdog:
    """A daemon thread that turns a call running past the timeout into ImplementationHung."""

    def __init__(self):
        self.timeout: float | None = None
        self._thread: threading.Thread | None = None
        self._fired_for = 0
        self._installed = False

    def arm(self, timeout: float | None) -> bool:
        """Watch calls made from the main thread with ``timeout``; False where it cannot
        (not the main thread, or another handler owns the signal it uses)."""
        self.timeout = timeout
        if timeout is None or threading.current_thread() is not threading.main_thread():
            return False
        if not self._installed:
            if signal.getsignal(_HANG_SIGNAL) not in (signal.SIG_DFL, None):
                return False
            signal.signal(_HANG_SIGNAL, self._on_hang)
            self._installed = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="bcr-verify-watchdog",
                                            daemon=True)
            self._thread.start()
        return True

    def _watch(self) -> None:
        # It fires again at every poll while the same call still runs: Python drops an
        # exception raised inside a gc callback or a __del__ (see bcr_verify.interrupts).
        while True:
            slots = BEACON.slots
            timeout = self.timeout
            time.sleep(0.25 if timeout is None else min(1.0, max(0.02, timeout / 10)))
            entered = slots[ENTERED]
            if (timeout is not None and entered
                    and time.monotonic_ns() - entered > timeout * 1e9):
                self._fired_for = entered
                _thread.interrupt_main(_HANG_SIGNAL)

    def _on_hang(self, signum, frame):
        entered = BEACON.slots[ENTERED]
        if not entered or entered != self._fired_for:
            return  # the call returned just before the handler ran
        raise ImplementationHung(
            BEACON.lane_name(), "timeout",
            f"{BEACON.where()} did not return within {self.timeout:g} s (--op-timeout)",
            BEACON.slots[STEP])


WATCHDOG = Watchdog()


class CallTimes:
    """Nanoseconds spent inside, and calls made to, each guarded method of one adapter."""

    def __init__(self):
        self.ns = [0] * len(METHODS)
        self.calls = [0] * len(METHODS)

    def reset(self) -> None:
        self.ns[:] = [0] * len(METHODS)
        self.calls[:] = [0] * len(METHODS)

    def seconds(self, methods) -> float:
        return sum(self.ns[METHODS.index(m)] for m in methods) / 1e9

    def count(self, methods) -> int:
        return sum(self.calls[METHODS.index(m)] for m in methods)


def guard(adapter, lane_index: int, times: CallTimes | None = None) -> None:
    """Wrap ``adapter``'s methods in place so each call reports as described above, and time
    them into ``adapter.call_times``: ``times`` (an adapter's this one replaces) or new ones."""
    adapter.call_times = CallTimes() if times is None else times
    for code, name in enumerate(METHODS):
        original = getattr(adapter, name, None)
        if original is None:
            continue
        setattr(adapter, name, _guarded(adapter, original, name, code,
                                        lane_index * len(METHODS) + code))


def _guarded(adapter, original, name: str, code: int, where: int):
    """``original`` (``adapter``'s method ``name``, number ``code``) as :func:`guard` wraps it;
    ``where``: the beacon's ``CALL`` while it runs."""
    slots = BEACON.slots
    clock = time.monotonic_ns
    spent, calls = adapter.call_times.ns, adapter.call_times.calls

    def call(*args):
        slots[CALL] = where
        slots[ENTERED] = entered = clock()
        try:
            return original(*args)
        except VerificationFailure:
            raise
        except AssertionError as exc:
            if name == "check_invariants":
                raise InvariantViolation(adapter.name, "assertion", _describe(exc)) from exc
            raise raised(adapter.name, name, exc) from exc
        except Exception as exc:
            raise raised(adapter.name, name, exc) from exc
        finally:
            slots[ENTERED] = 0
            spent[code] += clock() - entered
            calls[code] += 1
    return call


def raised(impl: str, method: str, exc: BaseException) -> ImplementationRaised:
    """The finding for ``exc`` escaping ``impl``'s ``method``; its check is the type's name."""
    return ImplementationRaised(impl, type(exc).__name__, f"{method}(): {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    """``Type: message (at file:line in function)``, on one short line."""
    message = str(exc).replace("\n", " ")
    if len(message) > 240:
        message = message[:240] + "..."
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" \
        if frames else ""
    return f"{type(exc).__name__}: {message}{where}"
