"""Events runs pin their process to one CPU, so Dynamo's tree thread shares the caller's core
(bcr_verify/affinity.py); the pin is said, reported, optional and spread over a campaign."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bcr_verify import affinity

ROOT = Path(__file__).parent.parent
LANES = ["--impl", "reference", "--impl", "sglang-radix"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "bcr_verify.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def test_only_an_events_run_feeding_dynamo_without_kv_replay_or_no_pin_is_pinned(monkeypatch):
    from bcr_verify import session

    def wanted(**kw):
        return affinity.wanted(argparse.Namespace(**{"events": True, "no_pin": False, **kw}))

    monkeypatch.setattr(session, "dynamo_available", lambda: True)
    assert wanted()
    assert not wanted(events=False)
    assert not wanted(no_pin=True)
    assert not wanted(kv_replay=True)
    monkeypatch.setattr(session, "dynamo_available", lambda: False)
    assert not wanted()


def test_dynamos_tree_thread_started_after_the_pin_runs_on_the_pinned_cpu():
    pytest.importorskip("dynamo._core", reason="ai-dynamo-runtime is part of make setup")
    probe = """
import json, os
from bcr_verify import affinity
before = set(os.listdir("/proc/self/task"))
cpu = affinity.pin()
from dynamo._core import RadixTree
tree = RadixTree()
tree.find_matches([1, 2, 3])
new = set(os.listdir("/proc/self/task")) - before
print(json.dumps({"cpu": cpu, "threads": len(new),
                  "on": sorted({c for tid in new for c in os.sched_getaffinity(int(tid))})}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["threads"] >= 1  # the tree's own, started after the pin
    assert seen["on"] == [seen["cpu"]]


@pytest.mark.parametrize("pin", [True, False])
def test_an_events_soak_says_it_pinned_and_its_report_names_the_cpu(tmp_path, pin):
    report = tmp_path / "soak.json"
    out = cli("soak", "--ops", "40", *LANES, "--events", "--quiet", "--json", str(report),
              "--trace-dir", str(tmp_path), *([] if pin else ["--no-pin"]))
    assert out.returncode == 0, out.stdout + out.stderr
    cpus = json.loads(report.read_text())["provenance"]["cpus"]
    said = [line for line in out.stdout.splitlines() if line.startswith("pinned to CPU")]
    if pin:
        assert len(cpus) == 1 and cpus[0] in affinity.allowed()
        assert said == [said[0]] and said[0].startswith(f"pinned to CPU {cpus[0]}: Dynamo")
    else:
        assert cpus == affinity.allowed() and not said


@pytest.mark.skipif(len(affinity.allowed()) < 2, reason="needs two CPUs to spread workers")
def test_an_events_campaign_gives_each_worker_a_cpu_of_its_own(tmp_path):
    report = tmp_path / "campaign.json"
    out = cli("soak", "--workers", "2", "--ops", "40", *LANES, "--events", "--quiet",
              "--json", str(report), "--trace-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    merged = json.loads(report.read_text())
    cpus = [row["cpu"] for row in merged["workers"]]
    assert cpus == affinity.allowed()[:2]
    assert merged["provenance"]["cpus"] == sorted(cpus)
    for cpu in cpus:
        assert f", CPU {cpu}): inconclusive" in out.stdout  # too short to judge growth


def test_an_events_run_under_hypothesis_is_pinned_too(tmp_path):
    report = tmp_path / "run.json"
    out = cli("run", "--max-steps", "30", *LANES, "--events", "--quiet", "--json", str(report),
              "--trace-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    cpus = json.loads(report.read_text())["provenance"]["cpus"]
    assert len(cpus) == 1
    assert out.stdout.startswith(f"pinned to CPU {cpus[0]}: Dynamo")
