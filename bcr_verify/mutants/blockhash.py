"""A small BCR-like cache (block-hash keyed states and edges) and its v1 bug variants.

:class:`BlockHashCache` follows BCR-memory-2's design: a flat array of *states* (root = 0),
each block of ``block_size`` tokens hashed to a *symbol*, edges ``(symbol -> child state)``
per state, one opaque value per state, explicit eviction of a value with its subtree, and
``acquire``/``release`` pins. Like BCR it trusts the symbol: edges are keyed by the hash alone,
so the hash's width is the only thing between two different blocks and a wrong match.
The correct version here mirrors BCR-memory-2 (v2): 128-bit symbols, state slots reclaimed on
evict, a per-state hash index above ``EDGE_SCAN_THRESHOLD`` edges, and a writer guard.

The mutants are BCR v1's four documented bugs plus a stale lookup memo:

- :class:`LeakyStates` — evict unlinks and tombstones but never reclaims the state slot.
- :class:`NarrowSymbols` — the symbol is truncated and there is no collision check. The real
  v1 kept 64 of Murmur3's 128 bits; here it keeps 4 so that a bounded random search reaches a
  collision in seconds (a 64-bit collision is the same bug, just astronomically rarer).
- :class:`LinearEdgeScan` — documented O(1) per block, but every lookup scans the edge list.
- :class:`NoWriterGuard` — claims to be safe for concurrent writers, enforces nothing.
- :class:`StaleMemo` — a hot-path memo of the last matches, not invalidated by evict.

:class:`BlockHashAdapter` drives it through :class:`~bcr_verify.adapters.bcr_api.BCRApiAdapter`
and adds three *resource* checks any cache exposing the counters gets:
state slots bounded by cached blocks; edge comparisons per block lookup bounded by the
documented constant (a cost-ratio check: work done against work the contract allows); and, for
caches that claim thread safety, a concurrent-writer probe on a scratch instance.
"""

from __future__ import annotations

import hashlib
import threading
import time
from array import array

from bcr_verify.adapters.bcr_api import BCRApiAdapter
from bcr_verify.errors import InvariantViolation

EDGE_SCAN_THRESHOLD = 4
"""States with more edges than this get a hash index. BCR-memory-2 uses 8; 4 here keeps the
wide states that expose an O(E) scan reachable within short examples (same bug class)."""


class _NullGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class BlockHashCache:
    """BCR-like cache; see the module docstring. Values must be hashable and unique."""

    hash_bits = 128
    reclaim_states = True
    index_edges = True
    thread_safe = True
    """Claims concurrent writers are safe (enforced by ``_guard``)."""

    def __init__(self, block_size: int = 16):
        self.block_size = block_size
        self.parent = [-1]
        self.symbol = [None]
        self.value = [None]
        self.refs = [0]
        self.edges: list[list] = [[]]  # per state: [(symbol, child), ...]
        self.index: list[dict | None] = [None]
        self.free_states: list[int] = []
        self.by_value: dict = {}
        self.probes = 0
        self.max_probes = 0  # worst edge comparisons for one block lookup since last read
        self._guard = threading.Lock() if self.thread_safe else _NullGuard()

    # --------------------------------------------------------------- hashing and edges

    def _symbol(self, block) -> int:
        digest = hashlib.blake2b(array("q", block).tobytes(), digest_size=16).digest()
        return int.from_bytes(digest, "little") & ((1 << self.hash_bits) - 1)

    def _child(self, state: int, sym: int) -> int | None:
        index = self.index[state]
        if index is not None:
            self.probes += 1
            self.max_probes = max(self.max_probes, 1)
            return index.get(sym)
        n = 0
        for s, child in self.edges[state]:
            n += 1
            if s == sym:
                break
        else:
            child = None
        self.probes += n
        self.max_probes = max(self.max_probes, n)
        return child

    def _link(self, state: int, sym: int, child: int) -> None:
        self.edges[state].append((sym, child))
        if self.index[state] is not None:
            self.index[state][sym] = child
        elif self.index_edges and len(self.edges[state]) > EDGE_SCAN_THRESHOLD:
            self.index[state] = dict(self.edges[state])

    def _unlink(self, state: int, child: int) -> None:
        self.edges[state] = [(s, c) for s, c in self.edges[state] if c != child]
        if self.index[state] is not None:
            self.index[state] = {s: c for s, c in self.edges[state]}

    def _new_state(self, parent: int, sym: int, value) -> int:
        if self.reclaim_states and self.free_states:
            s = self.free_states.pop()
            self.parent[s], self.symbol[s], self.value[s], self.refs[s] = parent, sym, value, 0
            self.edges[s], self.index[s] = [], None
        else:
            s = len(self.parent)
            self.parent.append(parent)
            self.symbol.append(sym)
            self.value.append(value)
            self.refs.append(0)
            self.edges.append([])
            self.index.append(None)
        return s

    def _blocks(self, tokens):
        bs = self.block_size
        n = len(tokens) // bs * bs
        return [tuple(tokens[i:i + bs]) for i in range(0, n, bs)]

    def _walk(self, tokens) -> list[int]:
        path, state = [], 0
        for block in self._blocks(tokens):
            child = self._child(state, self._symbol(block))
            if child is None:
                break
            path.append(child)
            state = child
        return path

    # --------------------------------------------------------------- BCR-memory-2 API

    def match_prefix(self, token_ids):
        path = self._walk(list(token_ids))
        return len(path) * self.block_size, [self.value[s] for s in path]

    def insert(self, token_ids, block_values) -> int:
        with self._guard:
            tokens, values = list(token_ids), list(block_values)
            blocks = self._blocks(tokens)
            path = self._walk(tokens)
            state = path[-1] if path else 0
            for block, value in zip(blocks[len(path):], values[len(path):]):
                sym = self._symbol(block)
                child = self._new_state(state, sym, value)
                time.sleep(0)  # a preemption point: state allocated, edge not yet linked
                self._link(state, sym, child)
                self.by_value[value] = child
                state = child
            return len(path) * self.block_size

    def _subtree(self, state: int) -> list[int]:
        out, stack = [], [state]
        while stack:
            s = stack.pop()
            out.append(s)
            stack.extend(c for _, c in self.edges[s])
        return out

    def evict(self, block_value):
        with self._guard:
            state = self.by_value[block_value]
            doomed = self._subtree(state)
            if any(self.refs[s] for s in doomed):
                raise ValueError(f"{block_value!r}: its subtree is acquired")
            self._unlink(self.parent[state], state)
            removed = []
            for s in doomed:
                removed.append(self.value[s])
                del self.by_value[self.value[s]]
                self._release_state(s)
            return removed

    def _release_state(self, s: int) -> None:
        self.value[s] = None  # tombstone
        self.edges[s], self.index[s] = [], None
        if self.reclaim_states:
            self.parent[s] = -2
            self.free_states.append(s)

    def acquire(self, values) -> None:
        with self._guard:
            for v in values:
                self.refs[self.by_value[v]] += 1

    def release(self, values) -> None:
        with self._guard:
            for v in values:
                s = self.by_value[v]
                if self.refs[s] <= 0:
                    raise ValueError(f"{v!r} released more often than acquired")
                self.refs[s] -= 1

    @property
    def protected_tokens(self) -> int:
        return sum(1 for s in self.by_value.values() if self.refs[s] > 0) * self.block_size

    @property
    def evictable_tokens(self) -> int:
        return len(self.by_value) * self.block_size - self.protected_tokens

    def values(self):
        return list(self.by_value)

    def state_count(self) -> int:
        """State slots in use (root included): BCR-memory-2's liveness metric's numerator."""
        return len(self.parent) - len(self.free_states)

    def assert_invariants(self) -> None:
        seen = set()
        stack = [0]
        while stack:
            s = stack.pop()
            assert s not in seen, f"state {s} reachable twice"
            seen.add(s)
            syms = [sym for sym, _ in self.edges[s]]
            assert len(set(syms)) == len(syms), f"state {s} has two edges for one symbol"
            for sym, child in self.edges[s]:
                assert self.parent[child] == s, f"state {child} has a wrong parent link"
                assert self.symbol[child] == sym, f"state {child} filed under a wrong symbol"
                assert self.refs[child] >= 0, f"state {child} refcount {self.refs[child]}"
                stack.append(child)
            if self.index[s] is not None:
                assert self.index[s] == dict(self.edges[s]), f"state {s}: index out of step"
        live = {s for s in seen if s}
        assert set(self.by_value.values()) == live, "value index and reachable states differ"
        for v, s in self.by_value.items():
            assert self.value[s] == v, f"state {s} holds {self.value[s]!r}, indexed as {v!r}"


# ------------------------------------------------------------------- the v1 bugs


class LeakyStates(BlockHashCache):
    """v1 bug 1: evict tombstones the value but never reclaims the state slot."""

    reclaim_states = False


class NarrowSymbols(BlockHashCache):
    """v1 bug 2: a truncated block symbol with no collision check (4 bits here, 64 in v1)."""

    hash_bits = 4


class LinearEdgeScan(BlockHashCache):
    """v1 bug 3: documented O(1) per block, but every lookup scans all of a state's edges."""

    index_edges = False


class NoWriterGuard(BlockHashCache):
    """v1 bug 4: "lock-free" claimed, no atomics and no single-writer enforcement."""

    thread_safe = True  # still *claims* it
    _unguarded = True

    def __init__(self, block_size: int = 16):
        super().__init__(block_size)
        self._guard = _NullGuard()


class StaleMemo(BlockHashCache):
    """A hot-path memo of recent match results keyed by the prompt, which evict does not
    invalidate: after eviction and reuse of a page, a repeated prompt gets its stale slots."""

    def __init__(self, block_size: int = 16):
        super().__init__(block_size)
        self.memo: dict[tuple, tuple[int, list]] = {}

    def match_prefix(self, token_ids):
        key = tuple(token_ids)
        if key in self.memo:
            length, values = self.memo[key]
            return length, list(values)
        result = super().match_prefix(token_ids)
        if result[0]:
            self.memo[key] = (result[0], list(result[1]))
        return result

    def insert(self, token_ids, block_values):
        prefix = super().insert(token_ids, block_values)
        if prefix < len(token_ids) // self.block_size * self.block_size:
            self.memo.pop(tuple(token_ids), None)  # this prompt's memo is now too short
        return prefix
    # evict() is inherited unchanged: it never invalidates the memo. That is the bug.


# ------------------------------------------------------------------- the adapter and checks


class BlockHashAdapter(BCRApiAdapter):
    """BCR-API adapter plus resource checks for caches exposing ``state_count`` / ``probes``."""

    def __init__(self, name, cls, block_size, capacity_pages):
        super().__init__(name, cls, block_size, capacity_pages, eviction="explicit")
        self._cls = cls
        self._probed = False

    def check_invariants(self) -> None:
        super().check_invariants()
        cache = self.cache
        states, cached = cache.state_count(), len(cache.by_value)
        if states > cached + 1:
            raise InvariantViolation(
                self.name, "state slots bounded",
                f"{states} state slots in use for {cached} cached blocks (+1 root): slots "
                "are not reclaimed")
        worst, cache.max_probes = cache.max_probes, 0
        if worst > EDGE_SCAN_THRESHOLD + 1:
            raise InvariantViolation(
                self.name, "edge comparisons per block",
                f"one block lookup compared {worst} edges; the documented bound is O(1) "
                f"(at most {EDGE_SCAN_THRESHOLD + 1} with a linear scan below the index "
                "threshold)")
        if getattr(cache, "thread_safe", False) and not self._probed:
            self._probed = True
            concurrent_writer_probe(self.name, self._cls, self._block_size)


_PROBED: dict[type, str | None] = {}
"""Probe outcome per cache class: the probe tests the class, so every instance (and every
replay of a shrunk trace) gets the same verdict, deterministically."""


def concurrent_writer_probe(name: str, cls, block_size: int, threads: int = 4,
                            cycles: int = 60, rounds: int = 3) -> None:
    """BCR-memory-2's own regression test as a check: ``threads`` writers racing to insert the
    same new blocks on a scratch instance; then its invariants must hold. The same inserts are
    first run on one thread: a cache that fails that has a plain bug, which the lockstep
    reports itself, not a concurrency finding."""
    if cls not in _PROBED:
        _PROBED[cls] = _probe(cls, block_size, threads, cycles, rounds)
    if _PROBED[cls] is not None:
        raise InvariantViolation(name, "concurrent writers", _PROBED[cls])


def _work(w: int, c: int, block_size: int):
    tokens = [c] * block_size + [w] * block_size
    return tokens, [(w, c, i) for i in range(len(tokens) // block_size)]


def _probe(cls, block_size: int, threads: int, cycles: int, rounds: int) -> str | None:
    import sys

    serial = cls(block_size)
    try:
        for c in range(cycles):
            for w in range(threads):
                serial.insert(*_work(w, c, block_size))
        serial.assert_invariants()
    except Exception:  # noqa: BLE001 - broken single-threaded: not this check's finding
        return None
    for attempt in range(rounds):
        cache = cls(block_size)
        errors: list[str] = []
        barrier = threading.Barrier(threads)

        def writer(w: int):
            try:
                for c in range(cycles):
                    barrier.wait(timeout=5)  # all writers race for the same new block
                    cache.insert(*_work(w, c, block_size))
            except threading.BrokenBarrierError:
                pass
            except Exception as exc:  # noqa: BLE001 - any crash is a finding
                errors.append(f"writer {w}: {type(exc).__name__}: {exc}")
                barrier.abort()

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            workers = [threading.Thread(target=writer, args=(w,)) for w in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
        finally:
            sys.setswitchinterval(old)
        try:
            cache.assert_invariants()
        except AssertionError as exc:
            errors.append(f"assert_invariants: {exc}")
        if errors:
            return (f"{threads} writers x {cycles} inserts of the same new blocks corrupted "
                    f"the cache (round {attempt + 1}; one thread alone is fine): {errors[0]}")
    return None


def _factory(cls, name: str, capacity: int | None = None):
    def factory(block_size: int):
        return BlockHashAdapter(name, cls, block_size, capacity or CAPACITY_PAGES)
    factory.__doc__ = cls.__doc__
    return factory


CAPACITY_PAGES = 256
"""A roomy pool: with the "disjoint" workload at block size 16 (64 chats under one state) many
siblings stay cached at once, so wide states, where hashing and scans matter, are reached."""

correct = _factory(BlockHashCache, "blockhash")
state_leak = _factory(LeakyStates, "mutant-state-leak")
symbol_collision = _factory(NarrowSymbols, "mutant-symbol-collision")
edge_scan = _factory(LinearEdgeScan, "mutant-edge-scan")
no_writer_guard = _factory(NoWriterGuard, "mutant-no-writer-guard")
stale_memo = _factory(StaleMemo, "mutant-stale-memo", capacity=32)
"""A small pool, so pages are evicted and handed out again within a few requests."""
