"""examples/dynamo_cache, a downstream project around NVIDIA Dynamo's Rust KV-router index,
installed with bcr_verify into a fresh virtual environment and tested as a user would: the
plugin auto-loads, the ci and soak profiles pass, statistics show the machine's rules, a planted
bug fails with a JSON trace in the corpus, and that trace fails on the buggy cache and passes on
the fixed one. Needs network access to PyPI (ai-dynamo-runtime==1.6.1, hypothesis, ...)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dynamo_cache"


def sh(cmd, cwd, env, timeout=600, check=True):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {out.returncode}:\n"
                    f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("dynamo")
    src = base / "bcr_verify_src"  # build from a copy: the repo stays free of build output
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bcr_verify", src / "bcr_verify",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "corpus" / "prompts", src / "corpus" / "prompts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    project = base / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", "traces",
                                                                     "*.egg-info", "build"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_ADDOPTS", "DYNAMO_EXAMPLE_BUG",
                        "PYTEST_DISABLE_PLUGIN_AUTOLOAD")}
    env["HF_HUB_OFFLINE"] = "1"
    python3 = shutil.which("python3") or sys.executable
    sh([python3, "-m", "venv", str(base / "venv")], base, env)
    venv = base / "venv" / "bin"
    pip = [str(venv / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    sh([*pip, str(src), "ai-dynamo-runtime==1.6.1"], base, env, timeout=900)
    sh([*pip, "--no-deps", str(project)], base, env)
    env["PATH"] = f"{venv}{os.pathsep}{env.get('PATH', '')}"
    return project, venv, env


def pytest_in(installed, *args, bug=False, check=True):
    project, venv, env = installed
    env = {**env, **({"DYNAMO_EXAMPLE_BUG": "skip-leaf-remove"} if bug else {})}
    return sh([str(venv / "python"), "-m", "pytest", "-p", "no:cacheprovider", *args], project,
              env, check=check)


def test_plugin_autoloads_and_impls_lists_the_entry_point(installed):
    project, venv, env = installed
    out = sh([str(venv / "bcr-verify"), "impls"], project, env)
    line = next(l for l in out.stdout.splitlines() if l.startswith("dynamo-radix"))
    assert "available" in line and "unavailable" not in line, out.stdout
    out = pytest_in(installed, "--help")
    assert "--bcr-soak-minutes" in out.stdout and "--bcr-impl" in out.stdout


def test_ci_profile_green(installed):
    out = pytest_in(installed, "--hypothesis-profile", "ci", "-rs")
    assert "7 passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]


def test_soak_profile_green_and_budgeted(installed):
    out = pytest_in(installed, "--hypothesis-profile", "soak", "--bcr-soak-minutes", "0.1",
                    "-k", "lockstep")
    assert "2 passed" in out.stdout and "bcr-verify lockstep coverage, soak" in out.stdout, out.stdout[-3000:]


def test_statistics_show_the_lockstep_rules(installed):
    out = pytest_in(installed, "--hypothesis-profile", "dev", "--hypothesis-show-statistics",
                    "-k", "lockstep")
    for rule in ("rule: serve", "rule: begin", "rule: finish", "rule: evict"):
        assert rule in out.stdout, out.stdout[-3000:]


def test_planted_bug_trace_fails_on_buggy_passes_on_fixed(installed):
    project, venv, env = installed
    out = pytest_in(installed, "--hypothesis-profile", "ci", "-k", "lockstep and bs4", bug=True,
                    check=False)
    assert out.returncode == 1, out.stdout[-3000:]
    traces = sorted((project / "traces").glob("*.json"))
    assert traces, "no trace written to the corpus"
    assert "index and side table disagree" in traces[0].read_text()
    replay = [str(venv / "bcr-verify"), "replay", str(traces[0])]
    buggy = sh(replay, project, {**env, "DYNAMO_EXAMPLE_BUG": "skip-leaf-remove"}, check=False)
    assert buggy.returncode == 1 and "FAIL assert_invariants" in buggy.stdout, buggy.stdout
    fixed = sh(replay, project, env, check=False)
    assert fixed.returncode == 0 and "PASS" in fixed.stdout, fixed.stdout
    out = pytest_in(installed, "--bcr-replay-corpus", "-k", "replay", bug=True, check=False)
    assert out.returncode == 1 and "trace still fails" in out.stdout
    out = pytest_in(installed, "--bcr-replay-corpus", "-k", "replay")
    assert "passed" in out.stdout
