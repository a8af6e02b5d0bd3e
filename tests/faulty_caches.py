"""Caches that fail the way processes fail: they raise, hang, crash, exit or leak.

Each is the reference model with one call gone wrong on its ``TRIGGER``-th use, so a fault
is deterministic for a given trace and its replay reproduces it. Named as ``module:attr``
by the fault tests (``tests/test_faults.py``) and the probes in ``docs/reliability.md``.
"""

import ctypes
import gc
import os
import signal
import time

from bcr_verify.adapters import BCRApiAdapter
from bcr_verify.models import ReferenceCache

TRIGGER = 3
_LEAKED = []


class _Faulty(ReferenceCache):
    method = "insert"

    def __init__(self, block_size):
        super().__init__(block_size)
        self.calls = 0

    def _fault(self):
        raise NotImplementedError

    def _maybe(self):
        self.calls += 1
        if self.calls == TRIGGER:
            self._fault()

    def insert(self, token_ids, block_values):
        if self.method == "insert":
            self._maybe()
        return super().insert(token_ids, block_values)

    def match_prefix(self, token_ids):
        if self.method == "match_prefix":
            self._maybe()
        return super().match_prefix(token_ids)


class RaisesInInsert(_Faulty):
    def _fault(self):
        raise KeyError("missing node 17")


class HangsInMatch(_Faulty):
    """A Python-level infinite loop: the in-process watchdog interrupts it."""

    method = "match_prefix"

    def _fault(self):
        while True:
            pass


class HangsInNativeCode(_Faulty):
    """``time.sleep`` in C never returns to the interpreter: only the supervisor can end it."""

    method = "match_prefix"

    def _fault(self):
        time.sleep(3600)


class HangsInAGcCallback(_Faulty):
    """A Python-level hang spent almost wholly inside a garbage-collector callback, where
    Python drops the exception the watchdog raises (it prints "Exception ignored in")."""

    method = "match_prefix"

    def _fault(self):
        gc.callbacks.append(_busy)
        try:
            while True:
                gc.collect()
        finally:
            gc.callbacks.remove(_busy)


def _busy(phase, info):
    for _ in range(20_000):
        pass


class InterruptedInAGcCallback(_Faulty):
    """Its process gets a SIGTERM whose handler runs inside a garbage-collector callback,
    where Python drops the KeyboardInterrupt the handler raises: as a Ctrl-C landing in
    Hypothesis's own gc callback."""

    method = "match_prefix"

    def _fault(self):
        gc.callbacks.append(_sigterm)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(_sigterm)


def _sigterm(phase, info):
    if phase == "start":
        signal.raise_signal(signal.SIGTERM)


class Segfaults(_Faulty):
    def _fault(self):
        ctypes.string_at(0)


class ExitsTheProcess(_Faulty):
    def _fault(self):
        os._exit(3)


class ExitsOnALongInsert(ReferenceCache):
    """Exits the process on an insert of exactly 23 blocks, whatever came before: in a soak
    that is long after its first flush, so the journal since the flush is the trace."""

    def insert(self, token_ids, block_values):
        if len(block_values) == 23:
            os._exit(3)
        return super().insert(token_ids, block_values)


class DeepRecursion(_Faulty):
    def _fault(self):
        def descend(depth):
            return descend(depth + 1)
        descend(0)


class RejectsEmptyPrompt(ReferenceCache):
    def match_prefix(self, token_ids):
        if not token_ids:
            raise ValueError("token_ids must not be empty")
        return super().match_prefix(token_ids)


class Leaks(ReferenceCache):
    """Keeps 16 KiB of garbage per insert, forever: BCR v1's leak, exaggerated."""

    def insert(self, token_ids, block_values):
        _LEAKED.append(b"x" * 16384)
        return super().insert(token_ids, block_values)


class SlowAndFailing(ReferenceCache):
    """Every insert takes 0.2 s, and the fourth one loses its last block: shrinking takes
    minutes (every example it tries needs four inserts), so an interrupt or a cap always
    lands in it."""

    def __init__(self, block_size):
        super().__init__(block_size)
        self.inserts = 0

    def insert(self, token_ids, block_values):
        time.sleep(0.2)
        self.inserts += 1
        if self.inserts >= 4 and len(block_values) > 1:
            block_values = block_values[:-1]
            token_ids = token_ids[:len(block_values) * self.block_size]
        return super().insert(token_ids, block_values)


class HandsOutCachedPages(BCRApiAdapter):
    """An allocator that hands out a page the cache still holds."""

    def alloc(self, num_pages):
        pages = super().alloc(num_pages)
        cached = [v for v in self.cache.evictable_values()] if num_pages else []
        if pages and cached:
            pages[0] = cached[0]
        return pages


def raises_in_insert(block_size):
    return RaisesInInsert(block_size)


def hangs_in_match(block_size):
    return HangsInMatch(block_size)


def hangs_in_native_code(block_size):
    return HangsInNativeCode(block_size)


def hangs_in_a_gc_callback(block_size):
    return HangsInAGcCallback(block_size)


def interrupted_in_a_gc_callback(block_size):
    return InterruptedInAGcCallback(block_size)


def segfaults(block_size):
    return Segfaults(block_size)


def exits_the_process(block_size):
    return ExitsTheProcess(block_size)


def exits_on_a_long_insert(block_size):
    return ExitsOnALongInsert(block_size)


def deep_recursion(block_size):
    return DeepRecursion(block_size)


def rejects_empty_prompt(block_size):
    return RejectsEmptyPrompt(block_size)


def leaks(block_size):
    return Leaks(block_size)


def slow_and_failing(block_size):
    return SlowAndFailing(block_size)


def hands_out_cached_pages(block_size):
    return HandsOutCachedPages("hands-out-cached-pages", ReferenceCache, block_size, 64,
                               eviction="lru")


def factory_raises(block_size):
    raise RuntimeError("cannot connect to the cache daemon")


def factory_takes_nothing():
    return ReferenceCache(16)


def factory_returns_int(block_size):
    return 3


class LosesABlock(ReferenceCache):
    """Drops the last block of every insert of more than ``LONG`` blocks: a divergence that
    depends on no history, so a soak's window since its last flush reproduces it."""

    LONG = 2

    def insert(self, token_ids, block_values):
        if len(block_values) > self.LONG:
            block_values = block_values[:-1]
            token_ids = token_ids[:len(block_values) * self.block_size]
        return super().insert(token_ids, block_values)


def loses_a_block(block_size):
    return LosesABlock(block_size)


def loses_a_block_unless_even_seed(block_size):
    """The reference model in a process started with an even ``--seed``, :class:`LosesABlock`
    in any other: of a campaign's workers with seeds 0 and 1, only the second fails, and the
    replay of its trace (no ``--seed``) fails the same way."""
    import sys

    argv = sys.argv
    seed = argv[argv.index("--seed") + 1] if "--seed" in argv[:-1] else None
    healthy = seed is not None and seed.lstrip("-").isdigit() and int(seed) % 2 == 0
    return ReferenceCache(block_size) if healthy else LosesABlock(block_size)


class MiscountsLongInserts(ReferenceCache):
    """Reports one block too many as already cached for every insert of three blocks or more:
    the lockstep sees it in the middle of a ``finish``, before the lanes after this one have
    ended the request."""

    def insert(self, token_ids, block_values):
        existing = super().insert(token_ids, block_values)
        return existing + self.block_size if len(block_values) > 2 else existing


def miscounts_long_inserts(block_size):
    return MiscountsLongInserts(block_size)


class FailsItsSelfCheckWhenFull(LosesABlock):
    """Its self-check fails while it caches more than ``FULL`` blocks, a failure only a check
    sees; and it drops the last block of an insert of more than ``LONG`` blocks, a divergence
    of its own step. A soak checking every 64 steps meets the second with the first unseen
    behind it, where a replay checking every step meets the first one first."""

    FULL, LONG = 24, 20

    def assert_invariants(self):
        super().assert_invariants()
        assert len(self) <= self.FULL, f"{len(self)} blocks cached, more than {self.FULL}"


def fails_its_self_check_when_full(block_size):
    return FailsItsSelfCheckWhenFull(block_size)


class FailsItsSelfCheckAfterSomeInserts(LosesABlock):
    """As :class:`FailsItsSelfCheckWhenFull`, but the self-check fails only until the next
    insert, after an insert of a multiple of three blocks: what it leaves behind is
    harmless, so fresh lanes after it still reach the divergence."""

    LONG = 20

    def __init__(self, block_size):
        super().__init__(block_size)
        self.odd = False

    def assert_invariants(self):
        super().assert_invariants()
        assert not self.odd, "the last insert was of a multiple of three blocks"

    def insert(self, token_ids, block_values):
        self.odd = len(block_values) % 3 == 0
        return super().insert(token_ids, block_values)


def fails_its_self_check_after_some_inserts(block_size):
    return FailsItsSelfCheckAfterSomeInserts(block_size)
