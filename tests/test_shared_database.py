"""Many machines, one example database: a failure one worker finds in a Redis database is
replayed by another (a real redis-server on loopback, two pytest worker processes, each in
its own checkout of a small project), and each lockstep test keeps its examples under its
own key."""

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_plugin import AUTOLOADED, PROJECT as PLUGIN_PROJECT

redis = pytest.importorskip("redis", reason="the redis client is in requirements/dev.txt")

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
NODEID = "test_mine.py::TestMine::test_lockstep[bs4]"

PROJECT = {
    "pyproject.toml": PLUGIN_PROJECT["pyproject.toml"],
    # One factory name before and after the fix, as in a real project: FIXED picks the code.
    "mycache.py": """
        import os
        from bcr_verify.models import ReferenceCache
        from broken_caches import OffByOneMatch

        def make_cache(block_size):
            return (ReferenceCache if os.environ.get("FIXED") else OffByOneMatch)(block_size)
    """,
    "test_mine.py": """
        from bcr_verify.testing import PrefixCacheConformance
        import mycache

        class TestMine(PrefixCacheConformance):
            make_cache = staticmethod(mycache.make_cache)
    """,
}


@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server on a free loopback port, nothing persisted, stopped afterwards."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (ci/setup.sh installs Debian's)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tmp_path / "redis"
    data.mkdir()
    log = open(data / "server.log", "w")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(data)],
                            stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(400):
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited: {(data / 'server.log').read_text()}")
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not answer on 127.0.0.1:%d" % port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def checkout(root: Path, name: str) -> Path:
    """One machine's copy of the project."""
    path = root / name
    path.mkdir()
    for file, text in PROJECT.items():
        (path / file).write_text(textwrap.dedent(text))
    return path


def worker(project: Path, *args, fixed=False):
    plugin = [] if AUTOLOADED else ["-p", "bcr_verify.pytest_plugin"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, TESTS, project)))}
    env.pop("FIXED", None)
    env.pop("CI", None)
    if fixed:
        env["FIXED"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin,
                           "-k", "lockstep", "-rs", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


def replayed(out) -> tuple[int, int]:
    """(examples replayed, still failing) from the summary line of the one lockstep test."""
    line = next(l for l in out.stdout.splitlines() if l.startswith(f"{NODEID}: replayed"))
    count = int(re.search(r"replayed (\d+) saved", line).group(1))
    failing = re.search(r"(\d+) still failing", line)
    return count, int(failing.group(1)) if failing else 0


def hypothesis_key(implementations, block_size=4, *, label=NODEID, **config) -> bytes:
    """The key Hypothesis files a lockstep test's examples under (core.py: a digest of the
    inner test, which :func:`~bcr_verify.testing.lockstep_test` gives our key)."""
    from hypothesis import settings
    from hypothesis.internal.reflection import function_digest

    from bcr_verify.testing import _machine_class, lockstep_database_key, lockstep_test

    machine = _machine_class(implementations, block_size, config.get("workload"),
                             config.get("kv_replay", False), events=config.get("events", False))
    key = lockstep_database_key(implementations, block_size, label=label, **config)
    return function_digest(lockstep_test(machine, settings(), key).hypothesis.inner_test)


def test_each_lockstep_test_has_its_own_key_equal_in_every_process():
    from hypothesis.internal.reflection import function_digest

    from bcr_verify.testing import _machine_class

    mine = ["reference", "mycache:make_cache"]
    # What Hypothesis keys a machine by alone: one name per block size, whatever it drives.
    assert (function_digest(_machine_class(mine, 4, None, False))
            == function_digest(_machine_class(["reference", "other:cache"], 4, None, False)))
    keys = {hypothesis_key(mine),
            hypothesis_key(["reference", "other:cache"]),
            hypothesis_key(mine, 8),
            hypothesis_key(mine, workload="rag"),
            hypothesis_key(mine, events=True),
            hypothesis_key(mine, kv_replay=True),
            hypothesis_key(mine, label="test_other.py::TestOther::test_lockstep[bs4]")}
    assert len(keys) == 7
    script = ("import test_shared_database as t; "
              "print(t.hypothesis_key(['reference', 'mycache:make_cache']).hex())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, TESTS))),
           "PYTHONHASHSEED": "random"}
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=120)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == hypothesis_key(mine).hex()


def test_a_failure_found_by_one_worker_is_replayed_by_another(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url)
    entry = b"hypothesis-example:" + hypothesis_key(["reference", "mycache:make_cache"])
    first, second = checkout(tmp_path, "machine-1"), checkout(tmp_path, "machine-2")
    replay = ("--hypothesis-profile", "replay", "--bcr-database", redis_url)

    # Replaying cannot find the bug by searching: with nothing saved, nothing runs, and the
    # test is reported skipped, not passed.
    out = worker(second, *replay)
    assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout[-3000:]
    assert replayed(out) == (0, 0) and "NOTHING VERIFIED" in out.stdout

    # Worker 1 searches, finds the planted bug and saves the shrunk example to Redis.
    out = worker(first, "--hypothesis-profile", "dev", "--bcr-database", redis_url)
    assert out.returncode == 1, out.stdout[-3000:]
    assert list((first / "found").glob("match-*.json")), out.stdout[-3000:]
    assert client.scard(entry) >= 1, sorted(client.keys())

    # Worker 2, in its own checkout, replays it from Redis and fails the same check.
    out = worker(second, *replay)
    assert out.returncode == 1, out.stdout[-3000:]
    assert "Divergence" in out.stdout and list((second / "found").glob("match-*.json"))
    count, failing = replayed(out)
    assert count >= 1 and failing >= 1, out.stdout[-2000:]
    assert client.scard(entry) >= 1

    # Once the bug is fixed the replay passes, and Hypothesis deletes the example that no
    # longer fails, for every machine.
    out = worker(second, *replay, fixed=True)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-3000:]
    assert replayed(out)[0] >= 1 and replayed(out)[1] == 0
    assert client.scard(entry) == 0 and not client.exists(entry)


def test_an_unreachable_redis_is_a_usage_error_saying_what_to_do(tmp_path):
    project = checkout(tmp_path, "machine")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    out = worker(project, "--bcr-database", f"redis://127.0.0.1:{port}/0")
    assert out.returncode == 4, out.stdout[-2000:] + out.stderr[-2000:]
    assert "--bcr-database" in out.stderr and "redis-server" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_database_locations_are_usage_errors(tmp_path):
    project = checkout(tmp_path, "machine")
    out = worker(project, "--bcr-database", "http://example.invalid/0")
    assert out.returncode == 4 and "unknown scheme 'http'" in out.stderr, out.stderr[-2000:]
    out = worker(project, "--hypothesis-profile", "replay")
    assert out.returncode == 4 and "--bcr-database" in out.stderr, out.stderr[-2000:]


def test_replay_profile_only_replays():
    from hypothesis import Phase, settings

    import bcr_verify.pytest_plugin  # noqa: F401  (registers the profiles)
    replay = settings.get_profile("replay")
    assert set(replay.phases) == {Phase.explicit, Phase.reuse}
    assert not replay.derandomize  # derandomize=True would mean no database at all
    steps = max(settings.get_profile(p).stateful_step_count for p in ("dev", "ci", "soak"))
    assert replay.stateful_step_count >= steps  # a saved example is never cut short
