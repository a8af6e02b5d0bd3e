"""The trace corpus: traces survive a crash or interrupt, replay without Hypothesis, and the
repo's own corpus/traces/ replays as regression tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bcr_verify.models.reference import ReferenceCache
from bcr_verify.testing import run_lockstep
from bcr_verify.trace import Trace, replay

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "corpus" / "traces").glob("*.json"))


class DivergesThenInterrupted(ReferenceCache):
    """Answers a wrong page on 2-block matches; after the first wrong answer, the next
    construction (Hypothesis shrinking) is interrupted as by Ctrl-C."""

    failed = False

    def __init__(self, block_size=16):
        if DivergesThenInterrupted.failed:
            raise KeyboardInterrupt
        super().__init__(block_size)

    def match_prefix(self, token_ids):
        length, values = super().match_prefix(token_ids)
        if len(values) >= 2:
            DivergesThenInterrupted.failed = True
            values = values[:-1] + [values[-1] + 1]
        return length, values


def interrupted(block_size):
    return DivergesThenInterrupted(block_size)


def test_trace_survives_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_lockstep(["reference", f"{__name__}:interrupted"], 4, corpus=tmp_path, seed=3)
    (path,) = tmp_path.glob("*.json")
    trace = Trace.load(path)
    assert trace.failure["check"] == "match" and trace.steps
    assert not list(tmp_path.glob(".tmp-*")), "a partial write was left behind"
    data = json.loads(path.read_text())
    for key in ("implementations", "block_size", "steps", "failure", "meta"):
        assert key in data
    assert data["meta"]["seed"] == 3


def test_cli_replay_side_by_side(tmp_path):
    trace = Trace(implementations=["reference", "broken_caches:off_by_one_match"], block_size=2,
                  capacity_pages=16, steps=[{"op": "begin", "args": {"tokens": [1, 2, 3, 4]}},
                                            {"op": "finish", "args": {"rid": 0}},
                                            {"op": "match", "args": {"tokens": [1, 2, 3, 4]}}])
    path = trace.save(tmp_path)
    env_path = str(ROOT / "tests")
    run = lambda *a: subprocess.run([sys.executable, "-m", "bcr_verify.cli", "replay", str(path), *a],
                                    capture_output=True, text=True, cwd=ROOT,
                                    env={"PYTHONPATH": f"{ROOT}:{env_path}", "PATH": "/usr/bin"})
    out = run()
    assert out.returncode == 1, out.stderr
    header = next(l for l in out.stdout.splitlines() if l.startswith("step"))
    assert "reference" in header and "broken_caches:off_by_one_match" in header
    assert "FAIL match: 4 tok [..1,3]" in out.stdout  # per implementation, side by side
    out = run("--impl", "reference", "--impl", "bcr_verify.models.reference:ReferenceCache")
    assert out.returncode == 0 and "PASS" in out.stdout


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_repo_corpus_replays_deterministically(path):
    """Each trace this repo found replays the same way twice (deterministic, no Hypothesis)."""
    trace = Trace.load(path)
    try:
        first, _ = replay(trace)
        second, _ = replay(trace)
    except Exception as exc:  # an implementation that cannot be built here
        pytest.skip(f"{path.name}: cannot replay here: {exc}")
    # SGLang numbers tree nodes from a process-wide counter, so details may name other ids.
    verdict = lambda f: f and (f.kind, f.impl, f.check, f.step)
    assert verdict(first) == verdict(second)
    if trace.failure and first is not None:
        assert first.check == trace.failure["check"]


def test_repo_corpus_directory_exists():
    assert (ROOT / "corpus" / "traces").is_dir(), "corpus/traces/ holds this repo's found traces"
