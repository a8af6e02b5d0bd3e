"""A conformance suite a prefix-cache project subclasses to test its own cache::

    from bcr_verify.testing import PrefixCacheConformance
    from my_project.cache import make_cache       # make_cache(block_size) -> cache

    class TestMyCache(PrefixCacheConformance):
        make_cache = staticmethod(make_cache)

``make_cache`` (or ``implementation = "pkg.module:factory"``, or a name registered under the
``bcr_verify.adapters`` entry-point group) builds either a
:class:`~bcr_verify.adapters.CacheAdapter` or an object with BCR-memory-2's API
(``insert`` / ``match_prefix`` / ``evict`` / ``acquire`` / ``release`` / ``assert_invariants``).

Tests (needs the ``bcr_verify`` pytest plugin, which pip-installing bcr_verify auto-loads):

* ``test_lockstep[bsN]``: :class:`~bcr_verify.machine.LockstepMachine` drives the reference
  model and your cache (plus any ``--bcr-impl``) in lockstep, one run per block size. It is a
  Hypothesis test, so ``--hypothesis-profile`` rules its size and ``--hypothesis-show-statistics``
  shows the machine's rules. The final shrunk failure's trace is written to the corpus directory
  before the test reports (also on Ctrl-C). Under a soak budget it repeats rounds until spent.
* ``test_bounded_state_under_churn``: insert/evict churn leaves nothing behind (no growth of the
  cache's own size or of Python heap traced by ``tracemalloc``): BCR v1's leak.
* ``test_block_hash_collisions``: 100,000 distinct blocks (repeated block contents under
  different parents and positions included) are each matched to their own value; if the class
  gives ``block_hashes(tokens, block_size)``, those hashes are also checked for collisions.
* ``test_match_cost_fanout``: the cost of a match below a node with 4096 children over one with
  8 children; a ratio near 512 is a linear scan (the limit is 8). A ratio, never a wall-clock limit.
* ``test_single_writer``: several threads mutate one cache through :class:`SingleWriter` (a lock
  that refuses reentry instead of deadlocking); invariants hold and each thread reads back its
  own blocks. ``test_reentrant_mutation_refused``: where the class declares how to hook a
  callback into a mutation, a mutation from inside it must be refused and change nothing.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import sys
import threading
import time
import tracemalloc
import unittest
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, ClassVar

import pytest

from hypothesis import event

from bcr_verify.lockstep import DEFAULT_SHRINK_SECONDS, ShrinkCapReached, StepBudget
from bcr_verify.machine import LockstepMachine

__all__ = ["PrefixCacheConformance", "ReentrantMutationError", "SingleWriter",
           "lockstep_test_case", "run_lockstep"]


class ReentrantMutationError(RuntimeError):
    """A mutation was started on a single-writer cache while one was already running."""


class SingleWriter:
    """Wrap a cache so that one thread mutates it at a time, and reentry is refused.

    Every call of a cache method goes through one lock (``match_prefix`` counts: it refreshes
    LRU state). A call made while the same thread is already inside one raises
    :class:`ReentrantMutationError` instead of deadlocking.
    """

    def __init__(self, cache: Any):
        self._cache = cache
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __len__(self) -> int:
        return len(self._cache)

    def __getattr__(self, name: str):
        attr = getattr(self._cache, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self._owner == threading.get_ident():
                raise ReentrantMutationError(f"{name}() called while this thread is inside "
                                             "another call on the same single-writer cache")
            with self._lock:
                self._owner = threading.get_ident()
                try:
                    return attr(*args, **kwargs)
                finally:
                    self._owner = None
        return call




def _machine_class(implementations, block_size, workload, kv_replay, capacity_pages=None,
                   op_timeout=None, known=(), events=False, budget=None):
    attrs = dict(implementations=implementations, block_size=block_size, kv_replay=kv_replay,
                 known=tuple(known), events=events, budget=budget)
    if op_timeout:
        attrs["op_timeout"] = op_timeout
    if workload:
        attrs["workload"] = workload
    if capacity_pages:
        attrs["capacity_pages"] = capacity_pages
    base = LockstepMachine.configure("ConformanceMachine", **attrs)

    class ConformanceMachine(base):
        examples = 0

        def _run(self, operation, *args):
            event(f"rule: {sys._getframe(1).f_code.co_name}")  # the rule that ran it
            return super()._run(operation, *args)

        def teardown(self):
            type(self).examples += 1
            super().teardown()

    ConformanceMachine.__name__ = ConformanceMachine.__qualname__ = (
        f"LockstepMachine_bs{block_size}")
    return ConformanceMachine


def lockstep_database_key(implementations, block_size, *, workload=None, kv_replay=False,
                          events=False, capacity_pages=None, label: str = "") -> bytes:
    """What names one lockstep test's examples in the example database: equal on every
    machine for one test, different for different tests.

    Hypothesis keys a stateful test by a digest of its machine class, and ours are made at
    run time under one name per block size, so without this every conformance test at one
    block size would share a key: in a shared database they would replay, and delete as no
    longer failing, each other's examples.
    """
    return json.dumps({"implementations": list(implementations), "block_size": block_size,
                       "workload": workload, "kv_replay": bool(kv_replay),
                       "events": bool(events), "capacity_pages": capacity_pages,
                       "test": label}, sort_keys=True).encode()


def lockstep_test(machine, settings, key: bytes):
    """The Hypothesis test that runs ``machine`` under ``settings``, its examples kept under
    ``key`` (:func:`lockstep_database_key`) in the settings' database."""
    from hypothesis.stateful import get_state_machine_test

    test = get_state_machine_test(machine, settings=settings, _min_steps=0,
                                  _flaky_state={"selecting_rule": False})
    # The hook Hypothesis's own stateful module (the machine digest) and pytest plugin (the
    # node id of a parametrized test) use: the database key is a digest of the inner test.
    test.hypothesis.inner_test._hypothesis_internal_add_digest = key
    return test


@contextmanager
def _counting_replays(replayed: Counter):
    """Count, in ``replayed``, the examples Hypothesis's reuse phase replays from the
    database ("examples") and those that still fail ("failing"), from the statistics each
    run reports; whoever collected them before (``--hypothesis-show-statistics``) still does."""
    from hypothesis.statistics import collector

    previous = collector.value

    def note(statistics):
        cases = statistics.get("reuse-phase", {}).get("test-cases", [])
        replayed["examples"] += len(cases)
        replayed["failing"] += sum(case["status"] == "interesting" for case in cases)
        if previous is not None:
            previous(statistics)

    with collector.with_value(note):
        yield


def run_lockstep(implementations: list[str], block_size: int, *, workload: str | None = None,
                 kv_replay: bool = False, corpus=None, soak_budget_s: float | None = None,
                 seed=None, capacity_pages: int | None = None, label: str = "",
                 op_timeout: float | None = None, known=(), events: bool = False,
                 shrink_seconds: float | None = DEFAULT_SHRINK_SECONDS,
                 rerun: str | None = None, database=None,
                 replayed: Counter | None = None) -> dict:
    """Run the lockstep machine under the current Hypothesis profile; save a failure's trace.

    A failure is shrunk for at most ``shrink_seconds``; the trace saved is then the smallest
    failing example found by then, and the test fails saying so.

    Failing examples are saved to, and replayed first from, ``database`` (an ExampleDatabase)
    under :func:`lockstep_database_key`; with None, none is used, whatever the profile says
    (as ``@seed`` would have it). ``replayed``, if given, counts the examples replayed
    from the database (see :func:`_counting_replays`), also when the run fails.

    With ``soak_budget_s``, Hypothesis runs repeat in rounds (each with its own seed, at most
    the profile's ``max_examples``, sized from the time per example so far) until the budget
    is spent; the budget is checked between rounds, so a soak overruns it by at most about one
    example. Rules are never turned into no-ops: that would make generation inconsistent.
    ``rerun``: the command that reruns this search, printed with a failure (by default, the
    ``--hypothesis-seed`` option giving ``seed``). Returns ``{"rounds", "examples",
    "seconds", "known", "totals"}``.
    """
    from hypothesis import settings as Settings
    from hypothesis import HealthCheck, seed as hseed

    from bcr_verify.session import TOTALS

    budget = StepBudget(shrink_seconds=shrink_seconds)
    machine = _machine_class(implementations, block_size, workload, kv_replay, capacity_pages,
                             op_timeout, known, events, budget)
    key = lockstep_database_key(implementations, block_size, workload=workload,
                                kv_replay=kv_replay, events=events,
                                capacity_pages=capacity_pages, label=label)
    replayed = Counter() if replayed is None else replayed
    TOTALS.reset()
    start = time.monotonic()
    profile_max = Settings().max_examples
    rounds = 0
    try:
        while True:
            rounds += 1
            run_settings = Settings(deadline=None, suppress_health_check=list(HealthCheck),
                                    database=database)
            if soak_budget_s is not None:
                # Rounds sized from the time per example so far: the budget is checked between
                # rounds, each round at most the profile's max_examples (the first only 10).
                spent = time.monotonic() - start
                left = soak_budget_s - spent
                per_example = spent / machine.examples if machine.examples else None
                size = (min(profile_max, 10) if per_example is None else
                        max(1, min(profile_max, int(left / per_example))))
                run_settings = Settings(run_settings, max_examples=size)
            if seed is not None:
                # Seeding the machine, not its test: @seed on a test also turns its database
                # off, while a seeded machine's test keeps the settings it is given.
                hseed(seed + rounds - 1)(machine)
            test = lockstep_test(machine, run_settings, key)
            with _counting_replays(replayed):
                test()
            if soak_budget_s is None:
                break
            spent = time.monotonic() - start
            if spent >= soak_budget_s or soak_budget_s - spent < spent / max(machine.examples, 1):
                break
    except BaseException as exc:
        trace = machine.last_failure
        path = None
        if trace is not None and corpus is not None:
            rerun = rerun or f"--hypothesis-seed={seed}"
            trace.meta.update({"test": label, "seed": seed, "rerun": rerun,
                               "hypothesis_profile": Settings.get_current_profile_name(),
                               "round": rounds})
            path = trace.save(corpus)
            print(f"\nbcr-verify: failing trace saved to {path}\n"
                  f"bcr-verify: seed {seed} (rerun this search with: {rerun})\n"
                  f"reproduce with: bcr-verify replay {path}")
        if isinstance(exc, ShrinkCapReached) and trace is not None:
            f = trace.failure
            raise AssertionError(
                f"{f['kind']} in {f['impl']} [{f['check']}]: {f['detail']}\nshrinking stopped "
                f"at its cap of {shrink_seconds:g} s (--bcr-shrink-seconds): the trace "
                f"({len(trace.steps)} steps) is the smallest failing example found by then"
                + (f"; reproduce with: bcr-verify replay {path}" if path else "")) from None
        raise
    found = {}
    for check, hit in machine.known_found.items():
        path = hit["witness"].save(corpus) if corpus is not None else None
        found[check] = {"count": hit["count"], "trace": str(path) if path else None}
    return {"rounds": rounds, "examples": machine.examples,
            "seconds": round(time.monotonic() - start, 1), "known": found,
            "totals": TOTALS.as_dict(), "replayed": dict(replayed)}


def _replay_report(replayed: Counter, location: str | None) -> str | None:
    """The summary's line on what was replayed from the example database: always under a
    profile that only replays (a test with nothing saved verified nothing), and whenever
    ``--bcr-database`` is given; None otherwise."""
    from hypothesis import Phase
    from hypothesis import settings as Settings

    replay_only = Phase.generate not in Settings().phases
    if not replay_only and location is None:
        return None
    where = location or "Hypothesis's local database"
    count = replayed["examples"]
    if count == 0:
        return (f"replayed 0 saved examples from {where}: nothing is saved for this test"
                + ("; NOTHING VERIFIED (this profile does not search)" if replay_only else ""))
    return (f"replayed {count} saved example{'s' if count != 1 else ''} from {where}, "
            f"{replayed['failing']} still failing")


def lockstep_test_case(implementations: list[str], block_size: int = 16, **attrs) -> type:
    """The lockstep machine over ``implementations`` as a ``unittest.TestCase``, for HypoFuzz.

    ``hypothesis fuzz`` fuzzes only Hypothesis tests it can take apart (``@given`` functions
    and a state machine's ``TestCase``); the conformance suite's ``test_lockstep`` wraps its
    machine in soak rounds, so HypoFuzz cannot see into it. Expose this instead::

        TestMyCacheFuzz = lockstep_test_case(["reference", "my_project.cache:make_cache"], 16)

    ``attrs`` are :meth:`LockstepMachine.configure` settings. Under plain pytest it is an
    ordinary Hypothesis test that replays the example database first, so a failure HypoFuzz
    stored there fails it again; then the final example's trace is saved to the corpus
    directory (``--bcr-corpus``) with the command that replays it.
    """
    from bcr_verify.pytest_plugin import current_options

    name = "Lockstep_" + "_".join(re.sub(r"\W+", "_", i) for i in implementations)
    machine = LockstepMachine.configure(f"{name}_bs{block_size}", block_size=block_size,
                                        implementations=list(implementations), **attrs)
    base = machine.TestCase

    def runTest(self):
        try:
            base.runTest(self)
        except BaseException:
            trace = machine.last_failure
            if trace is not None:
                trace.meta["source"] = "hypothesis TestCase"
                path = trace.save(current_options().corpus)
                print(f"\nbcr-verify: failing trace saved to {path}\n"
                      f"reproduce with: bcr-verify replay {path}")
            raise

    runTest.is_hypothesis_test = True
    runTest._hypothesis_state_machine_class = machine  # how HypoFuzz finds the machine
    return type(machine.__name__ + "TestCase", (base,), {"runTest": runTest})


def seed_base(given, session_seed: int) -> int:
    """The session seed every lockstep test's seed is derived from: ``--hypothesis-seed`` if
    given; 0 under a derandomized profile (the ``ci`` gate: the same examples on every run);
    otherwise ``session_seed``, drawn once per pytest session (and handed to every xdist
    worker), printed with any failure."""
    from hypothesis import settings as Settings

    if given is not None:
        try:
            return int(given)
        except (TypeError, ValueError):
            return int.from_bytes(str(given).encode()[:8].ljust(8, b"\0"), "big")
    if Settings().derandomize:
        return 0
    return session_seed


def lockstep_seed(base: int, test_id: str) -> int:
    """The seed of one lockstep test: a hash of the session seed and the test's node id.

    Every test (every ``--bcr-shards`` item) searches from its own seed, so a soak spread over
    xdist workers searches different places, while the same test gets the same seed whichever
    worker runs it; rounds of a soak add 1, 2, ... to it.
    """
    digest = hashlib.sha256(f"{base}:{test_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _distinct_prompts(count: int, blocks: int, block_size: int, offset: int = 0):
    """``count`` prompts of ``blocks`` blocks: a unique first block, then blocks whose contents
    repeat across prompts and positions, so only the parent chain tells them apart."""
    shared = [[7] * block_size, [8] * block_size, list(range(block_size))]
    for i in range(count):
        n = offset + i
        first = [1_000 + n % 100_000, 200_000 + n // 100_000] + [3] * (block_size - 2) \
            if block_size >= 2 else [1_000 + n]
        body = first[:block_size]
        for j in range(1, blocks):
            body += shared[(i + j) % len(shared)]
        yield body


class PrefixCacheConformance:
    """Subclass with ``make_cache`` or ``implementation``; override the knobs as needed."""

    implementation: ClassVar[str | None] = None
    make_cache: ClassVar[Callable[[int], Any] | None] = None
    reference: ClassVar[str] = "reference"
    block_sizes: ClassVar[tuple[int, ...]] = (16,)
    workload: ClassVar[str | None] = None
    capacity_pages: ClassVar[int | None] = None

    hash_blocks: ClassVar[int] = 100_000
    churn_rounds: ClassVar[int] = 30
    churn_growth_bytes: ClassVar[int] = 16 * 1024
    """Half the rounds insert and evict 1,440 blocks: leaking one small object per block is
    ~40 KiB, while a dict that kept a larger table after churn is a one-off of a few KiB."""
    fanout: ClassVar[tuple[int, int]] = (8, 4096)
    max_fanout_ratio: ClassVar[float] = 8.0
    """A hashed child lookup stays within a few x between 8 and 4096 children (a wider table
    misses the CPU cache more; 4.4x was measured once on a loaded machine); a scan of the
    children is ~50-500x."""
    writer_threads: ClassVar[int] = 4

    block_hashes: ClassVar[Callable[[list[int], int], list[int]] | None] = None
    """Optional: the cache's block hash chain for ``tokens``, checked for collisions."""

    install_mutation_callback: ClassVar[Callable[[Any, Callable[[], None]], None] | None] = None
    """Optional: ``(cache, callback)`` makes the cache call ``callback`` during a mutation
    (an event listener, an eviction hook). Then reentrant mutation must be refused."""

    # ------------------------------------------------------------ plumbing

    @classmethod
    def implementation_spec(cls) -> str:
        if cls.implementation:
            return cls.implementation
        factory = cls.__dict__.get("make_cache") or cls.make_cache
        factory = getattr(factory, "__func__", factory)
        if factory is None:
            raise TypeError(f"{cls.__name__}: set make_cache = staticmethod(factory) or "
                            "implementation = 'pkg.module:factory'")
        module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
        if not module or "." in name or "<" in name:
            raise TypeError(f"{cls.__name__}.make_cache must be a module-level function, so "
                            f"traces can name it as module:attr (got {factory!r})")
        return f"{module}:{name}"

    @classmethod
    def build_cache(cls, block_size: int, capacity_pages: int | None = None):
        """The cache under test, its factory given a CacheSpec if it takes one."""
        from bcr_verify.adapters.base import CacheSpec
        from bcr_verify.adapters.registry import resolve, wants_spec
        capacity = capacity_pages or cls.capacity_pages or 64
        factory = cls.__dict__.get("make_cache") or cls.make_cache
        factory = getattr(factory, "__func__", factory)
        if factory is None:
            spec = cls.implementation_spec()
            if ":" not in spec:
                return resolve(spec).build(block_size, capacity)
            module, _, attr = spec.partition(":")
            import importlib
            factory = getattr(importlib.import_module(module), attr)
        return factory(CacheSpec(block_size, capacity) if wants_spec(factory) else block_size)

    def _bcr_cache(self, block_size: int, capacity_pages: int | None = None):
        """The BCR-API object under test, or None when it is a CacheAdapter (whose contract
        tests then drive it through :meth:`_lockstep`)."""
        from bcr_verify.adapters.base import CacheAdapter
        cache = self.build_cache(block_size, capacity_pages)
        return None if isinstance(cache, CacheAdapter) else cache

    def _lockstep(self, block_size: int, capacity_pages: int):
        """The CacheAdapter under test alone in a lockstep: every call it answers is judged
        by the model under its contract; invariants run when the test asks (``check()``)."""
        from bcr_verify.lockstep import Lockstep
        return Lockstep([self.build_cache(block_size, capacity_pages)], check_every=0,
                        op_timeout=None)

    # ------------------------------------------------------------ lockstep

    def test_lockstep(self, bcr_block_size, bcr_shard, request):
        from bcr_verify.pytest_plugin import current_options
        from bcr_verify.session import known_not_seen, known_not_seen_line, vacuity_warnings

        opts = current_options()
        impls = [self.reference, self.implementation_spec(), *opts.implementations]
        impls = list(dict.fromkeys(impls))
        budget = opts.soak_budget_s
        test_id = request.node.nodeid
        base = seed_base(opts.seed, opts.session_seed)
        known = [*opts.known, *(c for m in request.node.iter_markers("bcr_known") for c in m.args)]
        seed = lockstep_seed(base, test_id)
        # Summary lines travel as user properties: xdist forwards them to the controller,
        # whose pytest_runtest_logreport collects them for the terminal summary.
        report = request.node.user_properties
        replayed = Counter()
        try:
            result = run_lockstep(
                impls, bcr_block_size, workload=opts.workload or self.workload,
                kv_replay=bool(opts.kv_replay), corpus=opts.corpus, soak_budget_s=budget,
                seed=seed, capacity_pages=self.capacity_pages, label=test_id,
                op_timeout=opts.op_timeout, known=known, events=opts.events,
                shrink_seconds=opts.shrink_seconds, database=opts.database,
                replayed=replayed,
                rerun=" ".join([f"pytest '{test_id}' --hypothesis-seed={base}",
                                *([f"--hypothesis-profile {opts.profile}"]
                                  if opts.profile != "default" else []),
                                *([f"--bcr-shards {opts.shards}"] if opts.shards > 1 else [])]))
        except unittest.SkipTest:  # Hypothesis ran no example: a replay with nothing saved
            reason = _replay_report(replayed, opts.database_location)
            if reason is None:
                raise
            pytest.skip(reason)
        finally:
            line = _replay_report(replayed, opts.database_location)
            if line:
                report.append(("bcr_verify", f"{test_id}: {line}"))
        totals = result["totals"]
        lanes = {name: {k: s.get(k, 0) for k in ("hits", "evictions", "refused")}
                 for name, s in totals["implementations"].items()}
        report.append(("bcr_verify_totals", {"steps": totals["steps"],
                                             "seconds": result["seconds"], "lanes": lanes}))
        lines = [f"seed {seed}; {totals['steps']} steps; " + "; ".join(
            f"{name} {c['hits']} hits, {c['evictions']} evictions, {c['refused']} refused"
            for name, c in lanes.items())]
        for name, counts in (totals.get("events") or {}).get("lanes", {}).items():
            lines.append(f"events of {name}: {counts.get('blocks_stored', 0)} blocks stored, "
                         f"{counts.get('blocks_removed', 0)} removed, every one checked")
        lines += [f"WARNING (pass may be vacuous): {w}" for w in vacuity_warnings(totals, {})]
        lines += [f"known failure {check!r} hit {found['count']} times; witness {found['trace']}"
                  for check, found in result["known"].items()]
        lines += [known_not_seen_line(check) for check in known_not_seen(known, result["known"])]
        if budget is not None:
            lines.append(f"{result['rounds']} rounds, {result['examples']} examples in "
                         f"{result['seconds']} s (budget {budget:g} s)")
        report.extend(("bcr_verify", f"{test_id}: {line}") for line in lines)

    # The Hypothesis pytest plugin reports statistics (--hypothesis-show-statistics) and
    # failure details only for tests it recognises; run_state_machine_as_test inside counts.
    test_lockstep.is_hypothesis_test = True

    # ------------------------------------------------------------ contract checks

    def test_bounded_state_under_churn(self):
        bs = 4
        cache = self._bcr_cache(bs)
        next_value = iter(range(1, 10**9))

        def churn_adapter(round_):
            for tokens in _distinct_prompts(16, 6, bs, offset=round_ * 16):
                lockstep.finish(lockstep.begin(tokens))
            lockstep.reset()  # the cache's own flush, judged: empty, every page free
            lockstep.check()
            lockstep.forget_steps()

        def churn(round_):
            values = []
            for tokens in _distinct_prompts(16, 6, bs, offset=round_ * 16):
                vals = [next(next_value) for _ in range(len(tokens) // bs)]
                cache.insert(tokens, vals)
                values.append(vals[0])
            for v in values:
                cache.evict(v)
            cache.assert_invariants()
            if hasattr(cache, "__len__"):
                assert len(cache) == 0, f"{len(cache)} blocks left after evicting everything"

        if cache is None:
            lockstep = self._lockstep(bs, 16 * 7 + 8)
        step = churn if cache is not None else churn_adapter
        for r in range(5):  # warm up: interned ints, dict resizes, caches
            step(r)
        gc.collect()
        tracemalloc.start()
        try:
            for r in range(5, 5 + self.churn_rounds // 2):
                step(r)
            gc.collect()
            mid = tracemalloc.get_traced_memory()[0]
            for r in range(5 + self.churn_rounds // 2, 5 + self.churn_rounds):
                step(r)
            gc.collect()
            end = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert end - mid < self.churn_growth_bytes, (
            f"traced heap grew {end - mid} bytes over {self.churn_rounds // 2} insert/evict "
            "rounds that each leave the cache empty: state is leaking")

    def test_block_hash_collisions(self):
        bs = 4
        blocks_per_prompt = 10
        count = self.hash_blocks // blocks_per_prompt
        if self.block_hashes is not None:
            hashes = set()
            for tokens in _distinct_prompts(count, blocks_per_prompt, bs):
                hashes.update(type(self).block_hashes(tokens, bs))
            assert len(hashes) == count * blocks_per_prompt, (
                f"{count * blocks_per_prompt - len(hashes)} collisions among "
                f"{count * blocks_per_prompt} distinct blocks")
        prompts = list(_distinct_prompts(count, blocks_per_prompt, bs))
        cache = self._bcr_cache(bs, len(prompts) * (blocks_per_prompt + 1) + 8)
        if cache is None:  # each lookup is judged by the model: a collision is a divergence
            lockstep = self._lockstep(bs, len(prompts) * (blocks_per_prompt + 1) + 8)
            for tokens in prompts:
                lockstep.finish(lockstep.begin(tokens))
            for tokens in prompts:
                lockstep.match(tokens)
            lockstep.check()
            return
        value = 0
        for tokens in prompts:
            vals = list(range(value, value + blocks_per_prompt))
            value += blocks_per_prompt
            cache.insert(tokens, vals)
        wrong = 0
        for i, tokens in enumerate(prompts):
            length, vals = cache.match_prefix(tokens)
            want = list(range(i * blocks_per_prompt, (i + 1) * blocks_per_prompt))
            wrong += (length, list(vals)) != (len(tokens), want)
        cache.assert_invariants()
        assert wrong == 0, (f"{wrong} of {count} prompts ({value} distinct blocks) matched "
                            "someone else's blocks: block identity collides")

    def test_match_cost_fanout(self, record_property):
        bs = 4
        small, large = self.fanout

        def build(fanout):
            stem = [5] * bs * 4
            probe = stem + [10_000 + fanout // 2] * bs
            cache = self._bcr_cache(bs, 5 * fanout + 8)
            if cache is None:
                lockstep = self._lockstep(bs, 5 * fanout + 8)
                for i in range(fanout):
                    lockstep.finish(lockstep.begin(stem + [10_000 + i] * bs))
                return lockstep.lanes[0].adapter.match, probe
            value = 0
            for i in range(fanout):
                cache.insert(stem + [10_000 + i] * bs, list(range(value, value + 5)))
                value += 5
            return cache.match_prefix, probe

        def timed(match, probe):
            t0 = time.perf_counter()
            for _ in range(200):
                match(probe)
            return time.perf_counter() - t0

        # Both trees first, then alternating rounds: load on a shared machine hits both alike.
        narrow, wide = build(small), build(large)
        rounds = [(timed(*narrow), timed(*wide)) for _ in range(9)]
        ratio = min(w for _, w in rounds) / min(n for n, _ in rounds)
        record_property("match_cost_fanout_ratio", round(ratio, 2))
        assert ratio < self.max_fanout_ratio, (
            f"a match below {large} children costs {ratio:.1f}x one below {small}: it grows "
            f"with fan-out (linear would be {large / small:.0f}x)")

    def test_single_writer(self):
        bs = 4
        raw = self._bcr_cache(bs, self.writer_threads * 60 * 4 + 8)
        if raw is None:
            return self._single_writer_adapter(bs)
        cache = SingleWriter(raw)

        def writer(t):
            kept = []
            for i, tokens in enumerate(_distinct_prompts(60, 3, bs, offset=t * 1000)):
                vals = [(t, i, j) for j in range(3)]
                cache.insert(tokens, vals)
                length, got = cache.match_prefix(tokens)
                assert (length, list(got)) == (len(tokens), vals), (
                    f"thread {t} read back {got} for its own blocks {vals}")
                if i % 2:
                    cache.evict(vals[1])
                    kept.append((tokens, vals[:1]))
                else:
                    kept.append((tokens, vals))
            for tokens, vals in kept:
                length, got = cache.match_prefix(tokens)
                assert list(got) == vals, f"thread {t}: {got} != {vals}"

        self._run_writers(writer)
        cache.assert_invariants()
        if hasattr(cache, "__len__"):
            want = self.writer_threads * (30 * 3 + 30 * 1)
            assert len(cache) == want, f"{len(cache)} blocks cached, expected {want}"

    def _single_writer_adapter(self, bs: int) -> None:
        """Threads take turns through one lock (a cache bound to the thread that made it, or
        keeping per-thread state, fails here); each thread's lookups are judged by the model."""
        lockstep = SingleWriter(self._lockstep(bs, self.writer_threads * 60 * 4 + 8))

        def writer(t):
            prompts = list(_distinct_prompts(60, 3, bs, offset=t * 1000))
            for tokens in prompts:
                lockstep.finish(lockstep.begin(tokens))
                lockstep.match(tokens)
            for tokens in prompts:
                lockstep.match(tokens)

        self._run_writers(writer)
        lockstep.check()

    def _run_writers(self, writer) -> None:
        """``writer(t)`` on ``writer_threads`` threads at once; the first failure re-raised here."""
        errors: list[BaseException] = []

        def guarded(t):
            try:
                writer(t)
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=guarded, args=(t,)) for t in range(self.writer_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]

    def test_reentrant_mutation_refused(self):
        hook = type(self).__dict__.get("install_mutation_callback") or self.install_mutation_callback
        if hook is None:
            pytest.skip("the cache declares no callback into user code during a mutation "
                        "(install_mutation_callback), so it cannot be re-entered")
        hook = getattr(hook, "__func__", hook)
        bs = 4
        cache = self._bcr_cache(bs)
        if cache is None:
            pytest.skip("install_mutation_callback is declared for caches with BCR's API; a "
                        "CacheAdapter's mutations are its cache's own")
        outcome: list[object] = []
        entered = []

        def callback():
            if entered:
                return
            entered.append(True)
            try:
                cache.insert([9] * bs * 2, ["reentrant-a", "reentrant-b"])
                outcome.append("accepted")
            except Exception as exc:  # the refusal we want
                outcome.append(exc)

        hook(cache, callback)
        cache.insert([1] * bs * 2, ["outer-a", "outer-b"])
        assert outcome, "the declared callback was never called during a mutation"
        assert outcome[0] != "accepted", "a mutation from inside a mutation was accepted"
        length, vals = cache.match_prefix([9] * bs * 2)
        assert length == 0, f"the refused reentrant insert left {vals} cached"
        assert cache.match_prefix([1] * bs * 2) == (2 * bs, ["outer-a", "outer-b"])
        cache.assert_invariants()
