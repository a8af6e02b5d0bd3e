"""The plugin under pytest-xdist: a tiny project (the one of test_plugin.py) run with ``-n 2``
in a subprocess. Seeds differ per item and do not depend on the worker, traces of two workers
failing at once are both intact, and the controller prints the workers' summary."""

import re

from bcr_verify.pytest_plugin import total_line
from bcr_verify.testing import lockstep_seed
from bcr_verify.trace import Trace
from test_plugin import project, pytest_run  # noqa: F401 - project is a fixture

LOCKSTEP = ("-n", "2", "--bcr-shards", "2", "--hypothesis-profile", "dev", "-k", "lockstep")
IDS = ["test_mine.py::TestMine::test_lockstep[bs4-shard0]",
       "test_mine.py::TestMine::test_lockstep[bs4-shard1]"]


def summary(stdout: str) -> list[str]:
    section = stdout.split("bcr-verify lockstep coverage, soak, known failures", 1)[1]
    return [line for line in section.splitlines()[1:] if not line.startswith("=")]


def test_shards_spread_over_two_workers_with_distinct_seeds_and_one_merged_summary(project):
    out = pytest_run(project, *LOCKSTEP, "--hypothesis-seed", "7", "-v")
    assert out.returncode == 0, out.stdout[-3000:]
    workers = {re.search(r"\[(gw\d)\]", line).group(1)
               for line in out.stdout.splitlines() if "PASSED" in line and "[gw" in line}
    assert workers == {"gw0", "gw1"}, out.stdout[-3000:]
    lines = summary(out.stdout)
    seeds = {}
    for test_id in IDS:
        (line,) = [l for l in lines if l.startswith(f"{test_id}: seed ")]
        seeds[test_id] = int(line.split("seed ")[1].split(";")[0])
    # a function of the session seed and the node id: the same whichever worker ran it
    assert seeds == {t: lockstep_seed(7, t) for t in IDS}
    assert len(set(seeds.values())) == 2
    (total,) = [l for l in lines if l.startswith("total over 2 lockstep tests:")]
    steps = sum(int(re.search(r"; (\d+) steps;", l).group(1)) for l in lines if "steps;" in l)
    assert f": {steps} steps," in total and steps > 0, total


def test_two_workers_failing_at_once_leave_two_intact_traces(project):
    out = pytest_run(project, *LOCKSTEP, env={"BUGGY": "1"})
    assert out.returncode == 1 and "2 failed" in out.stdout, out.stdout[-3000:]
    found = project / "found"
    assert not list(found.glob(".tmp-*")), "a temporary file was left behind"
    traces = [Trace.load(path) for path in sorted(found.glob("*.json"))]
    assert sorted(t.meta["test"] for t in traces) == IDS
    assert len({t.meta["seed"] for t in traces}) == 2
    assert all(t.failure["check"] == "match" for t in traces)
    # each failure names its seed and the command that reruns its search, which does
    (rerun,) = {m.group(1) for m in re.finditer(
        rf"rerun this search with: pytest '{re.escape(IDS[1])}' --hypothesis-seed=(\d+) "
        rf"--hypothesis-profile dev --bcr-shards 2\)",
        out.stdout)}
    again = pytest_run(project, IDS[1], f"--hypothesis-seed={rerun}", "--hypothesis-profile",
                       "dev", "--bcr-shards", "2", env={"BUGGY": "1"})
    seed = next(t.meta["seed"] for t in traces if t.meta["test"] == IDS[1])
    assert again.returncode == 1 and f"bcr-verify: seed {seed} " in again.stdout, \
        again.stdout[-3000:]


def test_shard_count_must_be_positive(project):
    out = pytest_run(project, "--bcr-shards", "0")
    assert out.returncode == 4 and "--bcr-shards must be >= 1" in out.stderr, out.stderr


def test_total_line_sums_every_test():
    line = total_line([
        {"steps": 100, "seconds": 2.0, "lanes": {"reference": {"hits": 3, "evictions": 1,
                                                               "refused": 0}}},
        {"steps": 300, "seconds": 1.0, "lanes": {"reference": {"hits": 4, "evictions": 2,
                                                               "refused": 0}}}])
    assert line == ("total over 2 lockstep tests: 400 steps, 350 steps/s summed over tests; "
                    "reference 7 hits, 3 evictions")
