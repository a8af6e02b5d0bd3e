"""bcr_verify's pytest plugin (entry point ``pytest11: bcr_verify``), loaded automatically.

* Hypothesis settings profiles, registered when this module is imported (Hypothesis applies
  ``--hypothesis-profile`` in its own ``pytest_configure``, after plugin modules are imported):

  ``dev``   quick: 20 examples of at most 20 steps.
  ``ci``    replaces Hypothesis's built-in ``ci`` profile (which it loads by itself when the
            ``CI`` environment variable is set) with the same intent: derandomized, no example
            database, no deadline, ``print_blob``; 100 examples of at most 50 steps.
  ``soak``  long examples (at most 200 steps); lockstep tests repeat Hypothesis runs (rounds
            of at most 200 examples, sized from the time per example) until the soak budget
            (``--bcr-soak-minutes``, default 10) is spent; see :func:`bcr_verify.testing.run_lockstep`.
  ``replay``  no search: only the explicit and reuse phases, so each lockstep test replays the
            examples saved in the example database (``--bcr-database``) and nothing else;
            what CI runs against a campaign's shared database. The terminal summary says how
            many examples each test replayed, and when that is none.
  ``crosshair``  Hypothesis's CrossHair backend; registered only when hypothesis-crosshair is
            importable, otherwise asking for it is a usage error saying what to install.

  No test here fixes ``max_examples``: the profile rules.

* Options (group "bcr-verify"), each with an ini-file key: ``--bcr-impl`` / ``bcr_impls``,
  ``--bcr-block-size`` / ``bcr_block_sizes``, ``--bcr-workload`` / ``bcr_workload``,
  ``--bcr-kv-replay`` / ``bcr_kv_replay``, ``--bcr-events`` / ``bcr_events`` (check every
  KV-cache event, see :mod:`bcr_verify.events`), ``--bcr-corpus`` / ``bcr_corpus``,
  ``--bcr-soak-minutes`` / ``bcr_soak_minutes``, ``--bcr-op-timeout`` / ``bcr_op_timeout``
  (seconds one implementation call may take before it is a hang finding; default 10),
  ``--bcr-shrink-seconds`` / ``bcr_shrink_seconds`` (how long a failure is shrunk; default 120);
  ``--bcr-shards`` / ``bcr_shards`` (each lockstep test as N items with their own seeds, for
  ``pytest -n``); ``--bcr-database`` / ``bcr_database`` (the lockstep tests' Hypothesis example database, a
  ``redis://HOST:PORT/DB`` URL or a directory, see :mod:`bcr_verify.database`; it replaces
  the profile's); ``--bcr-replay-corpus`` also collects the corpus directory's traces.

* pytest-xdist: every lockstep test's seed is derived from one session seed (drawn by the
  controller and handed to the workers) and its node id; workers report their summary lines
  as user properties, and the controller prints them, with a total, once.

* Fixtures: ``bcr_options``, ``bcr_tokenizer``, ``bcr_workload``, ``bcr_prompts``,
  ``bcr_adapter_factory``, ``bcr_corpus_dir``.

* Trace files (``*.json`` in the ``bcr-verify-trace/1`` format) under the corpus directory are
  collected as regression tests and replayed through :func:`bcr_verify.trace.replay`, without
  the Hypothesis engine.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import ExampleDatabase

from bcr_verify.database import UnusableDatabase, open_database, public_location
from bcr_verify.guard import DEFAULT_OP_TIMEOUT
from bcr_verify.lockstep import DEFAULT_SHRINK_SECONDS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SOAK_DEFAULT_MINUTES = 10.0
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
_NO_EXPLAIN = [p for p in Phase if p is not Phase.explain]  # explain costs ~10 s per failure

settings.register_profile("dev", max_examples=20, stateful_step_count=20, deadline=None,
                          phases=_NO_EXPLAIN, suppress_health_check=_SLOW)
settings.register_profile("ci", max_examples=100, stateful_step_count=50, deadline=None,
                          derandomize=True, database=None, print_blob=True,
                          phases=_NO_EXPLAIN, suppress_health_check=_SLOW)
settings.register_profile("soak", max_examples=200, stateful_step_count=200, deadline=None,
                          print_blob=True, suppress_health_check=_SLOW)
# No shrink phase: a replayed example that still fails was saved shrunk. Not derandomized
# (that implies no database), and a step count no other profile exceeds: a saved example
# cut short by a smaller one would no longer fail, and Hypothesis would delete it.
settings.register_profile("replay", phases=[Phase.explicit, Phase.reuse],
                          stateful_step_count=1000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW,
                          derandomize=False)  # with CI set, profiles inherit Hypothesis's ci


def crosshair_available() -> bool:
    try:
        import hypothesis_crosshair_provider  # noqa: F401
    except ImportError:
        return False
    return True


if crosshair_available():  # registering backend="crosshair" without it breaks every run
    settings.register_profile("crosshair", backend="crosshair", max_examples=50,
                              stateful_step_count=20, deadline=None, database=None,
                              suppress_health_check=list(HealthCheck))


@dataclass
class BcrOptions:
    """The plugin's options after command line > ini file > defaults."""

    implementations: list[str] = field(default_factory=list)
    block_sizes: list[int] = field(default_factory=list)
    workload: str | None = None
    kv_replay: bool | None = None
    events: bool = False
    corpus: Path = Path("corpus/traces")
    soak_minutes: float | None = None
    op_timeout: float = DEFAULT_OP_TIMEOUT
    shrink_seconds: float = DEFAULT_SHRINK_SECONDS
    known: list[str] = field(default_factory=list)
    """Checks known to fail (``--bcr-known``, ini ``bcr_known``, marker ``bcr_known``)."""
    shards: int = 1
    """Items per lockstep test (``--bcr-shards``), each searching from its own seed."""
    profile: str = "default"
    seed: object = None
    session_seed: int = 0
    """Drawn once per session (by the xdist controller for all its workers); lockstep
    seeds derive from it unless ``--hypothesis-seed`` or a derandomized profile decides."""
    database: ExampleDatabase | None = None
    """The lockstep tests' example database (``--bcr-database``); None: the profile's."""
    database_location: str | None = None
    soak_reports: list[str] = field(default_factory=list)
    """Lines for the terminal summary: each lockstep test's coverage (hits, evictions, and
    why a pass may be vacuous), soak rounds, known failures."""
    lockstep_totals: list[dict] = field(default_factory=list)
    """Each finished lockstep test's steps, seconds and per-lane counts, for the total."""

    @property
    def soak_budget_s(self) -> float | None:
        """Seconds a soak may run, or None when no soak is asked for (one ordinary run)."""
        if self.soak_minutes is not None:
            return 60.0 * self.soak_minutes
        if self.profile == "soak":
            return 60.0 * SOAK_DEFAULT_MINUTES
        return None


_CURRENT: BcrOptions | None = None


def current_options() -> BcrOptions:
    """The running session's options (defaults when the plugin is not active)."""
    return _CURRENT or BcrOptions()


def pytest_addoption(parser):
    group = parser.getgroup("bcr-verify", "bcr_verify prefix-cache verification")
    group.addoption("--bcr-impl", action="append", dest="bcr_impls", metavar="NAME",
                    help="extra implementation to run in lockstep: a name from `bcr-verify "
                         "impls` or module:attr (repeatable; ini: bcr_impls)")
    group.addoption("--bcr-block-size", action="append", dest="bcr_block_sizes", type=int,
                    metavar="N", help="block size(s) to test (repeatable; ini: bcr_block_sizes)")
    group.addoption("--bcr-workload", dest="bcr_workload", metavar="NAME",
                    help="prompt workload family (ini: bcr_workload; default: the suite's own)")
    group.addoption("--bcr-kv-replay", dest="bcr_kv_replay", action="store_true", default=None,
                    help="replay the KV behind every match through a tiny model (ini: "
                         "bcr_kv_replay)")
    group.addoption("--bcr-no-kv-replay", dest="bcr_kv_replay", action="store_false",
                    help="no KV replay, whatever the ini file says")
    group.addoption("--bcr-events", dest="bcr_events", action="store_true", default=None,
                    help="check every KV-cache event of the implementations that publish "
                         "them, against the model and through router indexes (ini: "
                         "bcr_events)")
    group.addoption("--bcr-corpus", dest="bcr_corpus", metavar="DIR",
                    help="where failing traces are written and collected from (ini: bcr_corpus;"
                         " default corpus/traces under the rootdir)")
    group.addoption("--bcr-replay-corpus", dest="bcr_replay_corpus", action="store_true",
                    help="also collect and replay every trace in the corpus directory")
    group.addoption("--bcr-soak-minutes", dest="bcr_soak_minutes", type=float, metavar="M",
                    help="time budget of a soak: lockstep tests repeat rounds until it is spent"
                         f" (ini: bcr_soak_minutes; default {SOAK_DEFAULT_MINUTES:g} with "
                         "--hypothesis-profile soak, otherwise no soak)")
    parser.addini("bcr_impls", "extra implementations to run in lockstep", type="linelist",
                  default=[])
    parser.addini("bcr_block_sizes", "block sizes to test", type="args", default=[])
    parser.addini("bcr_workload", "prompt workload family", default="")
    parser.addini("bcr_kv_replay", "KV replay on or off", type="bool", default=False)
    parser.addini("bcr_events", "KV-cache event checking on or off", type="bool",
                  default=False)
    parser.addini("bcr_corpus", "trace corpus directory (relative to the rootdir)", default="")
    group.addoption("--bcr-known", action="append", dest="bcr_known", metavar="CHECK",
                    help="a check known to fail: counted with one witness trace, the search "
                         "goes on (repeatable; ini: bcr_known; marker: bcr_known(CHECK, ...))")
    group.addoption("--bcr-op-timeout", dest="bcr_op_timeout", type=float, metavar="S",
                    help="seconds one call into an implementation may take before it is "
                         f"reported hung (ini: bcr_op_timeout; default {DEFAULT_OP_TIMEOUT:g})")
    group.addoption("--bcr-shrink-seconds", dest="bcr_shrink_seconds", type=float, metavar="S",
                    help="shrink a lockstep failure for at most this long; then the smallest "
                         "failing example so far is saved and reported (ini: "
                         f"bcr_shrink_seconds; default {DEFAULT_SHRINK_SECONDS:g})")
    parser.addini("bcr_shrink_seconds", "seconds a lockstep failure may be shrunk", default="")
    group.addoption("--bcr-shards", dest="bcr_shards", type=int, metavar="N",
                    help="run each lockstep test as N items with distinct seeds, so that "
                         "pytest -n spreads one test over N workers (ini: bcr_shards; "
                         "default 1)")
    group.addoption("--bcr-database", dest="bcr_database", metavar="URL",
                    help="the lockstep tests' Hypothesis example database: redis://HOST:PORT/DB"
                         " (shared by every machine of a campaign) or a directory; replaces "
                         "the profile's (ini: bcr_database)")
    parser.addini("bcr_database", "example database: redis://HOST:PORT/DB or a directory "
                  "(relative to the rootdir)", default="")
    parser.addini("bcr_soak_minutes", "soak time budget in minutes", default="")
    parser.addini("bcr_shards", "items (distinct seeds) per lockstep test", default="")
    parser.addini("bcr_op_timeout", "seconds one implementation call may take", default="")
    parser.addini("bcr_known", "checks known to fail", type="linelist", default=[])


def _options(config) -> BcrOptions:
    get = config.getoption
    sizes = get("bcr_block_sizes") or [int(x) for x in config.getini("bcr_block_sizes")]
    bad = [s for s in sizes if s < 1]
    if bad:
        raise pytest.UsageError(f"--bcr-block-size must be >= 1, got {bad[0]}")
    corpus = get("bcr_corpus") or config.getini("bcr_corpus")
    corpus = Path(corpus) if corpus else Path(config.rootpath) / "corpus" / "traces"
    if not corpus.is_absolute():
        corpus = (Path(config.rootpath) / corpus if not get("bcr_corpus")
                  else Path(config.invocation_params.dir) / corpus)
    minutes = _positive_number(config, "bcr_soak_minutes", "--bcr-soak-minutes")
    timeout = _positive_number(config, "bcr_op_timeout", "--bcr-op-timeout")
    shrink = _positive_number(config, "bcr_shrink_seconds", "--bcr-shrink-seconds")
    kv = get("bcr_kv_replay")
    shards = get("bcr_shards")
    if shards is None:
        try:
            shards = int(config.getini("bcr_shards") or 1)
        except ValueError:
            raise pytest.UsageError("ini bcr_shards must be a whole number") from None
    if shards < 1:
        raise pytest.UsageError(f"--bcr-shards must be >= 1, got {shards}")
    database, location = _database(config)
    return BcrOptions(
        implementations=list(get("bcr_impls") or config.getini("bcr_impls")),
        block_sizes=sizes, workload=get("bcr_workload") or config.getini("bcr_workload") or None,
        kv_replay=kv if kv is not None else (config.getini("bcr_kv_replay") or None),
        events=bool(get("bcr_events") or config.getini("bcr_events")),
        corpus=corpus.resolve(), soak_minutes=minutes,
        op_timeout=DEFAULT_OP_TIMEOUT if timeout is None else timeout,
        shrink_seconds=DEFAULT_SHRINK_SECONDS if shrink is None else shrink,
        known=list(get("bcr_known") or config.getini("bcr_known")), shards=shards,
        profile=get("hypothesis_profile", None) or "default",
        seed=get("hypothesis_seed", None), database=database, database_location=location)


def _database(config) -> tuple[ExampleDatabase | None, str | None]:
    """``--bcr-database`` (or ini ``bcr_database``, a directory relative to the rootdir) opened,
    and where it is, fit to print; a location that cannot serve is a usage error."""
    given = config.getoption("bcr_database")
    location = given if given is not None else config.getini("bcr_database")
    if given is None and not location:
        return None, None
    option = "--bcr-database" if given is not None else "ini bcr_database"
    if config.getoption("hypothesis_seed", None) is not None:
        raise pytest.UsageError(f"{option} has no effect with --hypothesis-seed: Hypothesis "
                                "uses no example database when a seed is forced; drop one")
    if "://" not in location and not Path(location).is_absolute():
        base = config.invocation_params.dir if given is not None else config.rootpath
        location = str(Path(base) / location)
    try:
        return open_database(location, option), public_location(location)
    except UnusableDatabase as exc:
        raise pytest.UsageError(str(exc)) from None


def _positive_number(config, name: str, option: str) -> float | None:
    """The option ``name`` (or its ini key of the same name): None, or a finite number > 0."""
    value = config.getoption(name)
    if value is None and config.getini(name):
        try:
            value = float(config.getini(name))
        except ValueError:
            raise pytest.UsageError(f"ini {name} must be a number") from None
    if value is not None and not (math.isfinite(value) and value > 0):
        raise pytest.UsageError(f"{option} must be a finite number > 0, got {value}")
    return value


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    global _CURRENT
    profile = config.getoption("hypothesis_profile", None)
    if profile == "crosshair" and "crosshair" not in settings._profiles:
        raise pytest.UsageError(
            "--hypothesis-profile crosshair needs the hypothesis-crosshair backend, which is "
            "not installed here: pip install hypothesis-crosshair (it pulls crosshair-tool)")
    _CURRENT = _options(config)
    worker = getattr(config, "workerinput", None)  # set by pytest-xdist in its workers
    _CURRENT.session_seed = (worker["bcr_session_seed"] if worker
                             else int.from_bytes(os.urandom(8), "big"))
    if profile == "replay" and _CURRENT.database is None:
        raise pytest.UsageError(
            "--hypothesis-profile replay replays the examples saved in the example database "
            "given by --bcr-database (or ini bcr_database), and none is given: add "
            "--bcr-database redis://HOST:6379/0 (or a directory)")
    config.addinivalue_line("markers", "bcr_trace: a replayed bcr_verify trace file")
    config.addinivalue_line("markers", "bcr_known(*checks): checks known to fail for this "
                            "test's implementation: counted with a witness, not findings")
    if config.getoption("bcr_replay_corpus") and _CURRENT.corpus.is_dir():
        config.args.append(str(_CURRENT.corpus))


def pytest_unconfigure(config):
    global _CURRENT
    _CURRENT = None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, in the controller: every worker gets the same session seed."""
    node.workerinput["bcr_session_seed"] = current_options().session_seed


def pytest_report_header(config):
    return (f"bcr-verify: session seed {current_options().session_seed} (lockstep seeds derive "
            "from it and the node id, unless --hypothesis-seed or a derandomized profile)")


def pytest_generate_tests(metafunc):
    """Lockstep tests of a conformance class run once per block size, and per shard."""
    opts = current_options()
    if "bcr_block_size" in metafunc.fixturenames:
        cls = metafunc.cls
        sizes = (opts.block_sizes or list(getattr(cls, "block_sizes", None) or []) or [16])
        metafunc.parametrize("bcr_block_size", sizes, ids=[f"bs{s}" for s in sizes])
    if "bcr_shard" in metafunc.fixturenames and opts.shards > 1:
        metafunc.parametrize("bcr_shard", range(opts.shards), indirect=True,
                             ids=[f"shard{i}" for i in range(opts.shards)])


def pytest_runtest_logreport(report):
    """Collect a lockstep test's summary from its report: under pytest-xdist that report
    comes from a worker, whose own terminal summary nobody sees."""
    if report.when != "call":
        return
    opts = current_options()
    for name, value in report.user_properties:
        if name == "bcr_verify":
            opts.soak_reports.append(value)
        elif name == "bcr_verify_totals":
            opts.lockstep_totals.append(value)


def pytest_terminal_summary(terminalreporter):
    opts = current_options()
    if not opts.soak_reports:
        return
    terminalreporter.section("bcr-verify lockstep coverage, soak, known failures")
    for line in sorted(opts.soak_reports, key=lambda line: line.split(": ", 1)[0]):
        terminalreporter.write_line(line)
    if opts.lockstep_totals:
        terminalreporter.write_line(total_line(opts.lockstep_totals))


def total_line(totals: list[dict]) -> str:
    """One line over every lockstep test: steps, each test's steps per second summed (what
    concurrent xdist workers achieved together), and each lane's hits and evictions."""
    steps = sum(t["steps"] for t in totals)
    rate = sum(t["steps"] / t["seconds"] for t in totals if t["seconds"] > 0)
    lanes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in totals:
        for name, counts in t["lanes"].items():
            for key, value in counts.items():
                lanes[name][key] += value
    per_lane = "; ".join(f"{name} {c['hits']} hits, {c['evictions']} evictions"
                         for name, c in lanes.items())
    return (f"total over {len(totals)} lockstep tests: {steps} steps, {rate:.0f} steps/s "
            f"summed over tests; {per_lane}")


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def bcr_options(pytestconfig) -> BcrOptions:
    return current_options()


@pytest.fixture(scope="session")
def bcr_corpus_dir(bcr_options) -> Path:
    return bcr_options.corpus


@pytest.fixture(scope="session")  # function scope would trip Hypothesis's health check
def bcr_shard(request) -> int:
    """This lockstep item's shard, 0 to ``--bcr-shards`` - 1: its node id, hence its seed,
    differs from its siblings'."""
    return getattr(request, "param", 0)


@pytest.fixture(scope="session")
def bcr_tokenizer():
    """The real Qwen2 tokenizer that workloads are built with."""
    from bcr_verify.strategies import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="session")
def bcr_workload(bcr_options, bcr_tokenizer) -> list[list[int]]:
    """The prompt pool of ``--bcr-workload`` (default ``mixed``), as token id lists."""
    from bcr_verify.strategies import build_workload
    return [list(p) for p in build_workload(bcr_options.workload or "mixed", bcr_tokenizer)]


@pytest.fixture(scope="session")
def bcr_prompts(bcr_options):
    """A Hypothesis strategy of prompts from the workload, at the first block size."""
    from bcr_verify.session import prompt_source
    size = (bcr_options.block_sizes or [16])[0]
    return prompt_source(bcr_options.workload or "mixed", size).strategy


@pytest.fixture(scope="session")
def bcr_adapter_factory():
    """``factory(name_or_module_attr, block_size, capacity_pages) -> CacheAdapter``."""
    from bcr_verify.adapters.registry import resolve

    def build(name: str, block_size: int = 16, capacity_pages: int = 256):
        return resolve(name).build(block_size, capacity_pages)
    return build


# ------------------------------------------------------------------ trace corpus replay

def _is_trace(path: Path) -> bool:
    if path.suffix != ".json" or path.name.startswith("."):
        return False
    try:
        with open(path) as f:
            head = f.read(4096)
    except OSError:
        return False
    return '"bcr-verify-trace/' in head


def pytest_collect_file(file_path, parent):
    opts = current_options()
    try:
        in_corpus = file_path.resolve().is_relative_to(opts.corpus)
    except OSError:
        in_corpus = False
    if in_corpus and _is_trace(file_path):
        return TraceFile.from_parent(parent, path=file_path)
    return None


class TraceFile(pytest.File):
    def collect(self):
        yield TraceItem.from_parent(self, name="replay")


class TraceReplayFailed(Exception):
    pass


class TraceItem(pytest.Item):
    """One saved trace, replayed deterministically: fails while the divergence reproduces."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_marker("bcr_trace")

    def runtest(self):
        from bcr_verify.cli import side_by_side
        from bcr_verify.errors import AdapterUnavailable
        from bcr_verify.trace import Trace, replay

        trace = Trace.load(self.path)
        try:
            failure, lockstep = replay(trace)
        except AdapterUnavailable as exc:
            pytest.skip(f"trace {self.path.name}: an implementation cannot be built here: {exc}")
        if failure is not None:
            text, _ = side_by_side(trace)
            raise TraceReplayFailed(f"{failure}\n\n{text}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, TraceReplayFailed):
            return f"trace still fails when replayed:\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"replay {self.path.name}"
