"""HypoFuzz (``hypothesis fuzz``) on a lockstep machine exposed by ``lockstep_test_case``: it
finds a planted bug, keeps it in the example database, and plain pytest replays it from there
(no generation at all) and saves its trace."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bcr_verify.trace import Trace

pytest.importorskip("hypofuzz", reason="HypoFuzz is not installed: pip install hypofuzz==25.11.1")

ROOT = Path(__file__).resolve().parent.parent
HYPOTHESIS = Path(sys.executable).with_name("hypothesis")

FILES = {
    "pyproject.toml": """
        [tool.pytest.ini_options]
        bcr_corpus = "found"
    """,
    "conftest.py": """
        from hypothesis import Phase, settings
        # Replays the example database and generates nothing: a failure here is one found before.
        settings.register_profile("db_only", phases=[Phase.reuse], deadline=None)
    """,
    "fuzz_target.py": """
        from bcr_verify.testing import lockstep_test_case
        TestBrokenFuzz = lockstep_test_case(["reference", "broken_caches:off_by_one_match"], 4)
    """,
}


def test_hypofuzz_finds_a_planted_bug_that_pytest_then_replays(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                        str(tmp_path)])}
    # A campaign is not a CI job: with CI set, Hypothesis's ci profile (derandomized) is every
    # test's default, and HypoFuzz, which needs random search, then finds nothing to fuzz.
    env.pop("CI", None)
    fuzz = subprocess.Popen([str(HYPOTHESIS), "fuzz", "-n", "2", "--no-dashboard", "--",
                             "fuzz_target.py", "-p", "no:cacheprovider"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:  # HypoFuzz stops by itself once every target has failed
        output, _ = fuzz.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(fuzz.pid, signal.SIGKILL)
        output, _ = fuzz.communicate()
        pytest.fail(f"HypoFuzz found nothing in 150 s:\n{output[-3000:]}")
    assert "Found a failing input for every test!" in output, output[-3000:]

    replay = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                             "--hypothesis-profile", "db_only", "fuzz_target.py"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 1 and "Divergence" in replay.stdout, replay.stdout[-3000:]
    (trace,) = (tmp_path / "found").glob("match-*.json")
    assert f"bcr-verify replay {trace}" in replay.stdout
    assert Trace.load(trace).failure["impl"] == "broken_caches:off_by_one_match"
