"""An interrupted run stops, even when Python drops the interrupt.

A signal handler's exception is raised at whatever bytecode runs next. When that bytecode
belongs to a garbage-collector callback, a ``__del__`` or a weakref callback, Python prints
"Exception ignored in ..." and drops the exception. Hypothesis keeps a gc callback, so a
Ctrl-C, or the SIGTERM the supervisor forwards, was lost often enough to matter: 3 of 20
interrupted ``bcr-verify run`` processes went on running, and the supervisor killed them
30 s later without their report.

So :func:`handling` installs handlers that also *remember* the interrupt, and every lockstep
step raises ``KeyboardInterrupt`` again while one is remembered (:func:`check`): an
interrupted run never takes another step, wherever the first exception went.
"""

from __future__ import annotations

import contextlib
import signal

requested: str | None = None
"""The name of the signal that interrupted this run, or None."""


def check() -> None:
    """Raise ``KeyboardInterrupt`` if this run was interrupted: called before every step."""
    if requested is not None:
        raise KeyboardInterrupt(requested)


@contextlib.contextmanager
def handling(*signals: signal.Signals):
    """While inside, each of ``signals`` interrupts the run: it raises ``KeyboardInterrupt``
    and is remembered for :func:`check`.

    A second SIGTERM is ignored (a supervisor sends one and waits for the report); a second
    SIGINT raises again (a user at a terminal may insist). Only the main thread can install
    handlers; elsewhere this does nothing.
    """
    global requested
    requested = None
    try:
        previous = {s: signal.signal(s, _interrupt) for s in signals}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        requested = None


def _interrupt(signum, frame):
    global requested
    name = signal.Signals(signum).name
    requested = requested or name
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(name)
