"""One CPU for a run whose KV events feed Dynamo's RadixTree.

Dynamo's tree answers every call (``find_matches``, ``apply_event``) from a thread of its own.
With the caller on one core and that thread on another, each round trip pays two cross-core
wake-ups, which on this project's 2-core virtual machine cost ~50-95 µs together, over a third
of an events soak. With both threads on one core it is a context switch (~9 µs a call), and
the same soak ran 2.2 times as many operations a second (``docs/benchmarks.md`` §4.5). So
``run --events`` and ``soak --events`` pin the process that drives the lanes to one CPU before
any tree, and so any tree's thread, exists: threads inherit the CPU of the thread that starts
them. ``--no-pin`` leaves the process free to move (a crowded machine); a ``--kv-replay`` run,
whose model uses torch's threads, and a run where Dynamo is not installed are never pinned.
"""

from __future__ import annotations

import os


def wanted(args) -> bool:
    """The command line asks for KV events, which Dynamo's tree will be fed (it is installed),
    and neither forbids pinning nor replays KV."""
    if not args.events or getattr(args, "kv_replay", False) or getattr(args, "no_pin", False):
        return False
    from bcr_verify.session import dynamo_available

    return dynamo_available()


def pin(cpu: int | None = None) -> int | None:
    """Pin the calling thread, and every thread it starts from now on, to ``cpu`` (by default
    the one it runs on now); returns the CPU, or None where the platform cannot pin."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    if cpu is None:
        cpu = current_cpu()
    os.sched_setaffinity(0, {cpu})
    return cpu


def allowed() -> list[int]:
    """The CPUs this thread may run on (every one where the platform does not say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def current_cpu() -> int:
    """The CPU this thread runs on now (Linux's ``/proc``), or the first it may run on."""
    cpus = allowed()
    try:
        with open("/proc/thread-self/stat") as stat:
            cpu = int(stat.read().rsplit(")", 1)[1].split()[36])  # field 39, "processor"
    except (OSError, ValueError, IndexError):
        return cpus[0]
    return cpu if cpu in cpus else cpus[0]
