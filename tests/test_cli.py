"""The command line as a user meets it: exit codes, reports, traces, usage errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.run([sys.executable, "-m", "bcr_verify.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_impls_lists_every_adapter_with_availability_and_reason():
    out = cli("impls", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    for name in ("reference", "sglang-radix", "sglang-unified-py", "sglang-unified-rust"):
        assert rows[name]["available"], rows[name]
    assert not rows["bcr"]["available"] and "bcr_cache" in rows["bcr"]["reason"]


def test_version_names_what_a_bug_report_needs_without_importing_any_implementation():
    probe = ("import sys\nfrom bcr_verify.cli import main\ntry:\n    main(['--version'])\n"
             "finally:\n    print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'torch', 'sglang', 'vllm', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    version, imported = out.stdout.splitlines()
    from importlib.metadata import version as dist_version

    import hypothesis
    from bcr_verify.models import COMPILED

    assert version.startswith(f"bcr-verify {dist_version('bcr-verify')} (Python ")
    assert f"Hypothesis {hypothesis.__version__}" in version
    assert ("compiled (mypyc)" if COMPILED else "Python source") in version
    assert imported == "[]"


def test_run_catches_a_broken_module_attr_cache_and_prints_a_replayable_trace(tmp_path):
    out = cli("run", "--impl", "reference", "--impl", "broken_caches:off_by_one_match",
              "--block-size", "1", "--quiet", "--trace-dir", str(tmp_path / "traces"),
              "--json", str(tmp_path / "report.json"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "divergence in broken_caches:off_by_one_match" in out.stdout
    assert "<-- match" in out.stdout
    reproduce = [line for line in out.stdout.splitlines() if line.startswith("reproduce with:")]
    assert reproduce, out.stdout
    trace = reproduce[0].split("replay ", 1)[1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["failure"]["check"] == "match"
    again = cli("replay", trace)
    assert again.returncode == 1 and "FAILS" in again.stdout
    fixed = cli("replay", trace, "--impl", "reference", "--impl", "sglang-radix")
    assert fixed.returncode == 0 and "replayed cleanly" in fixed.stdout


def test_run_json_counts_hits_and_evictions(tmp_path):
    out = cli("run", "--impl", "reference", "--impl", "sglang-unified-rust", "--max-steps",
              "200", "--quiet", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] >= 200
    for stats in report["implementations"].values():
        assert stats["hits"] > 0 and stats["evictions"] > 0
    assert "PASS" in out.stdout


@pytest.mark.parametrize("args, words", [
    (["run", "--block-size", "0"], "--block-size must be >= 1"),
    (["run", "--max-steps", "x"], "--max-steps must be an integer"),
    (["run", "--impl", "nope"], "impl 'nope' is unknown"),
    (["run", "--impl", "bcr"], "impl 'bcr' is unavailable"),
    (["run", "--workload", "nope", "--impl", "reference"], "workload"),
    (["replay", "missing.json"], "no such file"),
])
def test_bad_input_is_a_usage_error_naming_the_argument(args, words):
    out = cli(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert words in out.stderr


def test_tokenizer_reports_the_bpe_prefix_effect():
    out = cli("tokenizer", "--samples", "200")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["sha256"].startswith("f7c9b2db")
    assert report["bpe_prefix_stability"]["random_cuts"]["prefix_share"] < 0.9
    assert report["bpe_prefix_stability"]["special_token_cuts"]["prefix_share"] == 1.0


def test_known_check_is_counted_with_a_witness_and_the_search_goes_on(tmp_path):
    out = cli("run", "--impl", "reference", "--impl", "broken_caches:off_by_one_match",
              "--block-size", "1", "--max-steps", "300", "--quiet", "--known", "match",
              "--known", "no such check", "--trace-dir", str(tmp_path),
              "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "pass" and report["steps"] == 300
    known = report["known"]["match"]
    assert known["count"] >= 1 and "KNOWN: match" in out.stdout
    assert report["known_not_seen"] == ["no such check"]  # a misspelt --known is said out loud
    assert "KNOWN, NOT SEEN: 'no such check' never failed in this run" in out.stdout
    again = cli("replay", known["trace"])
    assert again.returncode == 1 and "[match]" in again.stdout


def test_run_reports_the_tree_shape_it_reached(tmp_path):
    out = cli("run", "--impl", "reference", "--impl", "sglang-radix", "--max-steps", "200",
              "--quiet", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    shape = json.loads((tmp_path / "r.json").read_text())["tree_shape"]
    assert shape["reference"]["depth_blocks"] > 1 and shape["sglang-radix"]["depth_nodes"] >= 1
    assert "deepest tree:" in out.stdout


def test_lru_relaxations_are_counted_with_witnesses_and_strict_lru_refuses_them(tmp_path):
    out = cli("run", "--impl", "reference", "--impl", "sglang-radix", "--max-steps", "600",
              "--quiet", "--trace-dir", str(tmp_path), "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    relaxations = json.loads((tmp_path / "r.json").read_text())["lru_relaxations"]
    assert "whole-node over-eviction" in relaxations and "deviation from strict LRU" in out.stdout
    from bcr_verify.trace import Trace
    witness = Trace.from_json(relaxations["whole-node over-eviction"]["witness"]).save(tmp_path)
    assert "reference" not in relaxations["whole-node over-eviction"]["count"]
    again = cli("replay", str(witness))
    assert again.returncode == 1 and "[strict LRU]" in again.stdout
    strict = cli("run", "--impl", "reference", "--impl", "sglang-radix", "--max-steps", "600",
                 "--quiet", "--strict-lru", "--trace-dir", str(tmp_path / "strict"))
    assert strict.returncode == 1 and "strict LRU" in strict.stdout
