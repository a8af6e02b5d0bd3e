"""The pytest plugin as a user meets it: a tiny project, pytest in a subprocess (auto-loaded
through the pytest11 entry point when bcr_verify is installed, `-p bcr_verify.pytest_plugin`
otherwise)."""

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AUTOLOADED = any(ep.value == "bcr_verify.pytest_plugin"
                 for ep in entry_points(group="pytest11"))

PROJECT = {
    "pyproject.toml": """
        [tool.pytest.ini_options]
        bcr_corpus = "found"
        bcr_block_sizes = "4"
    """,
    "mycache.py": """
        from bcr_verify.models.reference import ReferenceCache

        class Buggy(ReferenceCache):
            def match_prefix(self, token_ids):
                length, values = super().match_prefix(token_ids)
                if len(values) >= 2:
                    values = values[:-1] + [values[-1] + 1]
                return length, values

        def make_good(block_size):
            return ReferenceCache(block_size)

        def make_buggy(block_size):
            return Buggy(block_size)
    """,
    "test_mine.py": """
        import os
        from bcr_verify.testing import PrefixCacheConformance
        import mycache

        class TestMine(PrefixCacheConformance):
            make_cache = staticmethod(mycache.make_buggy if os.environ.get("BUGGY")
                                      else mycache.make_good)
    """,
}


@pytest.fixture
def project(tmp_path):
    for name, text in PROJECT.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def pytest_run(project, *args, env=None, timeout=300):
    plugin = [] if AUTOLOADED else ["-p", "bcr_verify.pytest_plugin"]
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{project}", **(env or {})}
    full_env.pop("BUGGY", None) if not (env or {}).get("BUGGY") else None
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin,
                           *args], cwd=project, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def test_profiles_registered_at_import():
    from hypothesis import settings
    import bcr_verify.pytest_plugin  # noqa: F401
    for name in ("dev", "ci", "soak"):
        assert settings.get_profile(name).deadline is None
    assert settings.get_profile("ci").derandomize
    assert settings.get_profile("soak").stateful_step_count > settings.get_profile("ci").stateful_step_count


def test_crosshair_profile_without_backend_is_a_clear_usage_error(project):
    from bcr_verify.pytest_plugin import crosshair_available
    if crosshair_available():
        pytest.skip("hypothesis-crosshair is installed here, so the profile exists")
    out = pytest_run(project, "--hypothesis-profile", "crosshair")
    assert out.returncode == 4, out.stdout + out.stderr
    assert "pip install hypothesis-crosshair" in out.stderr


def test_dev_profile_statistics_show_the_machine_rules(project):
    out = pytest_run(project, "--hypothesis-profile", "dev", "--hypothesis-show-statistics",
                     "-k", "lockstep")
    assert out.returncode == 0, out.stdout[-3000:]
    assert "test_lockstep[bs4]" in out.stdout  # ini bcr_block_sizes honoured
    for rule in ("rule: serve", "rule: begin", "rule: match"):
        assert rule in out.stdout
    assert "max_examples=20" in out.stdout  # the profile rules, nothing hard-coded


def test_block_size_option_overrides_ini(project):
    out = pytest_run(project, "--hypothesis-profile", "dev", "--bcr-block-size", "2",
                     "--bcr-block-size", "8", "-k", "lockstep", "-q")
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout[-2000:]


def test_soak_is_time_budgeted(project):
    out = pytest_run(project, "--hypothesis-profile", "soak", "--bcr-soak-minutes", "0.1",
                     "-k", "lockstep")
    assert out.returncode == 0, out.stdout[-3000:]
    line = next(l for l in out.stdout.splitlines() if "rounds," in l)
    seconds = float(line.split(" examples in ")[1].split(" s")[0])
    assert 3 <= seconds < 60, line  # stops when less than one example's time is left


def test_planted_bug_trace_written_and_replayed(project):
    out = pytest_run(project, "--hypothesis-profile", "dev", "-k", "lockstep",
                     env={"BUGGY": "1"})
    assert out.returncode == 1, out.stdout[-3000:]
    traces = list((project / "found").glob("*.json"))
    assert len(traces) == 1 and "failing trace saved to" in out.stdout
    # collected from the corpus as a regression test: fails on the buggy cache ...
    out = pytest_run(project, "--bcr-replay-corpus", "-k", "replay", env={"BUGGY": "1"})
    assert out.returncode == 1 and "trace still fails" in out.stdout, out.stdout[-2000:]
    # ... and the same trace replayed on the fixed cache passes (the trace names the factory,
    # so "fixing" here means pointing the same name at the fixed code)
    (project / "mycache.py").write_text((project / "mycache.py").read_text().replace(
        "def make_buggy(block_size):\n    return Buggy(", "def make_buggy(block_size):\n    return ReferenceCache("))
    out = pytest_run(project, "--bcr-replay-corpus", "-k", "replay")
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-2000:]


def test_ci_profile_is_reproducible(project):
    """The PR gate runs the same examples every time: three runs, one set of statistics."""
    runs = [pytest_run(project, "--hypothesis-profile", "ci", "-k", "lockstep",
                       "--hypothesis-show-statistics", env={"CI": "true"}) for _ in range(3)]
    for out in runs:
        assert out.returncode == 0, out.stdout[-2000:]
    stats = [[line for line in out.stdout.splitlines() if "rule:" in line] for out in runs]
    assert stats[0] and stats[0] == stats[1] == stats[2]


def test_an_implementation_that_raises_fails_the_test_with_a_saved_trace(project):
    # a later make_buggy replaces the fixture's one
    (project / "mycache.py").write_text(textwrap.dedent(PROJECT["mycache.py"]) + textwrap.dedent("""
        class Raises(ReferenceCache):
            def insert(self, token_ids, block_values):
                if len(token_ids) > 40:
                    raise KeyError("node vanished")
                return super().insert(token_ids, block_values)

        def make_buggy(block_size):
            return Raises(block_size)
    """))
    out = pytest_run(project, "--hypothesis-profile", "dev", "-k", "lockstep",
                     env={"BUGGY": "1"})
    assert out.returncode == 1, out.stdout[-3000:]
    assert "implementation raised" in out.stdout and "KeyError" in out.stdout
    assert "--hypothesis-seed=" in out.stdout
    (trace,) = (project / "found").glob("KeyError-*.json")
    out = pytest_run(project, "--bcr-replay-corpus", "-k", "replay", env={"BUGGY": "1"})
    assert out.returncode == 1 and "implementation raised" in out.stdout, out.stdout[-2000:]


def test_a_hanging_implementation_is_a_hang_finding(project):
    (project / "mycache.py").write_text(textwrap.dedent(PROJECT["mycache.py"]) + textwrap.dedent("""
        class Hangs(ReferenceCache):
            def match_prefix(self, token_ids):
                if len(token_ids) > 40:
                    while True:
                        pass
                return super().match_prefix(token_ids)

        def make_buggy(block_size):
            return Hangs(block_size)
    """))
    out = pytest_run(project, "--hypothesis-profile", "dev", "-k", "lockstep",
                     "--bcr-op-timeout", "1", env={"BUGGY": "1"})
    assert out.returncode == 1, out.stdout[-3000:]
    assert "implementation hung" in out.stdout and "within 1 s" in out.stdout
    assert list((project / "found").glob("timeout-*.json"))


def test_known_marker_counts_the_known_bug_and_passes(project):
    (project / "test_known.py").write_text(textwrap.dedent("""
        import pytest
        from bcr_verify.testing import PrefixCacheConformance
        import mycache

        @pytest.mark.bcr_known("match", "no such check")
        class TestKnown(PrefixCacheConformance):
            make_cache = staticmethod(mycache.make_buggy)
    """))
    out = pytest_run(project, "--hypothesis-profile", "dev", "-k", "TestKnown and lockstep",
                     "-rA")
    assert out.returncode == 0, out.stdout[-3000:]
    assert "known failure 'match' hit" in out.stdout
    assert "KNOWN, NOT SEEN: 'no such check'" in out.stdout
    assert list((project / "found").glob("match-*.json"))


def test_events_option_checks_a_real_caches_events(project):
    """--bcr-events: SGLang's RadixCache runs beside the project's cache with its KV events
    checked; the coverage summary says so, and the project's cache is reported silent."""
    out = pytest_run(project, "--hypothesis-profile", "dev", "--bcr-events",
                     "--bcr-impl", "sglang-radix", "-k", "lockstep", "-rA", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "bcr-verify lockstep coverage" in out.stdout
    line = next(l for l in out.stdout.splitlines() if "events of sglang-radix" in l)
    stored = int(line.split(": ")[-1].split(" blocks stored")[0])
    assert stored > 0, line


def test_shrinking_stops_at_its_cap_with_the_best_trace_saved(project):
    (project / "mycache.py").write_text(textwrap.dedent(PROJECT["mycache.py"]) + textwrap.dedent("""
        import time

        class SlowBuggy(Buggy):
            def insert(self, token_ids, block_values):
                time.sleep(0.05)  # every example Hypothesis tries while shrinking is slow
                return super().insert(token_ids, block_values)

        def make_buggy(block_size):
            return SlowBuggy(block_size)
    """))
    out = pytest_run(project, "--hypothesis-profile", "dev", "-k", "lockstep",
                     "--bcr-shrink-seconds", "2", env={"BUGGY": "1"})
    assert out.returncode == 1, out.stdout[-3000:]
    assert "shrinking stopped at its cap of 2 s" in out.stdout, out.stdout[-3000:]
    (trace,) = (project / "found").glob("match-*.json")
    out = pytest_run(project, "--bcr-replay-corpus", "-k", "replay", env={"BUGGY": "1"})
    assert out.returncode == 1 and "divergence" in out.stdout, out.stdout[-2000:]
