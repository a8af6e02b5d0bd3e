"""SGLang across its releases: every release with a recipe is driven in its own venv, on its
own API generation and real allocator, and the matrix / bisect commands work over them.

The venvs are built once under .venvs/ (about a minute and a half each) and reused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bcr_verify.errors import UsageError
from bcr_verify.matrix import bisect, table
from bcr_verify.releases import ensure, known_releases, select

ROOT = Path(__file__).resolve().parent.parent
PAGES_FROM = (0, 4, 8, 0)
"""Paging came in 0.4.4, but its paged allocator allocates only through Triton on a GPU
until 0.4.8: block size 4 runs on a CPU from 0.4.8 on."""
UNIFIED_FROM = (0, 5, 12, 0)
"""UnifiedRadixCache came in 0.5.11 and is driven from 0.5.12 (bcr_verify.adapters.sglang)."""
SPLIT_VIEWS_FIXED = (0, 5, 8, 0)
"""sgl-project/sglang#17191: before 0.5.8 a split leaves both halves viewing one storage."""
REGRESSION = ROOT / "corpus" / "traces" / "releases" / "sglang-split-views-fixed-in-0.5.8.json"


def test_release_specs():
    known = known_releases()
    assert select("0.4.3,0.5.5") == ["0.4.3", "0.5.5"]
    assert select("all") == known
    assert all(r in known for r in select("0.4.3..0.5.5"))
    with pytest.raises(UsageError, match="no recipe for sglang '9.9.9'"):
        select("9.9.9")


def test_a_row_says_what_its_pass_may_not_mean():
    row = {"release": "0.5.8", "block_size": 1, "verdict": "pass", "steps": 100, "hits": 0,
           "evictions": 0, "known_not_seen": ["value owns storage"],
           "vacuous_warnings": ["sglang-radix: zero cache hits, so matching was never exercised"]}
    line = table([row]).splitlines()[-1]
    assert "known, not seen: value owns storage" in line
    assert "may be vacuous: sglang-radix: zero cache hits" in line


def test_bisect_names_the_first_release_whose_verdict_changes():
    releases = ["a", "b", "c", "d", "e", "f"]
    asked = []

    def verdict(release):
        asked.append(release)
        return "fail" if release in ("a", "b", "c") else "pass"
    first, tried = bisect("t.json", releases, verdict)
    assert first == "d" and tried["c"] == "fail" and tried["d"] == "pass"
    assert len(asked) < len(releases)
    assert bisect("t.json", ["a", "b"], lambda r: "pass")[0] is None


@pytest.fixture(scope="module", params=known_releases())
def release(request):
    return request.param, ensure(request.param)


def bcr_verify_in(python, *args, cwd=ROOT):
    return subprocess.run([str(python), "-m", "bcr_verify.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=900)


def test_each_release_is_driven_on_its_own_generation(release, tmp_path):
    from bcr_verify.adapters.sglang_api import generation, release_tuple

    name, python = release
    out = bcr_verify_in(python, "impls", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    row = rows["sglang-radix"]
    assert row["available"], row["reason"]
    assert row["notes"]["release"] == name
    assert row["notes"]["generation"] == generation(name)
    # the unified cache where the release has it: in Python from 0.5.12, Rust core from 0.5.19
    assert rows["sglang-unified-py"]["available"] == (release_tuple(name) >= UNIFIED_FROM)
    assert rows["sglang-unified-rust"]["available"] == (release_tuple(name) >= (0, 5, 19, 0))
    impls = ["--impl", "reference", "--impl", "sglang-radix"] + (
        ["--impl", "sglang-unified-py"] if release_tuple(name) >= UNIFIED_FROM else [])
    sizes = [1, 4] if release_tuple(name) >= PAGES_FROM else [1]
    split_views = release_tuple(name) < SPLIT_VIEWS_FIXED
    for size in sizes:
        report = tmp_path / f"bs{size}.json"
        out = bcr_verify_in(python, "run", *impls,
                            "--block-size", str(size), "--max-steps", "600", "--quiet",
                            "--json", str(report), "--trace-dir", str(tmp_path),
                            "--known", "value owns storage")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        data = json.loads(report.read_text())
        radix = data["implementations"]["sglang-radix"]
        assert data["verdict"] == "pass" and radix["hits"] > 0 and radix["evictions"] > 0
        assert radix["notes"]["release"] == name
        assert bool(data["known"]) == split_views  # the known bug is there, and only there
        assert data["known_not_seen"] == ([] if split_views else ["value owns storage"])


def test_split_views_regression_trace_fails_before_0_5_8_and_passes_after():
    for name, python in ((r, ensure(r)) for r in known_releases()):
        from bcr_verify.adapters.sglang_api import release_tuple
        out = bcr_verify_in(python, "replay", str(REGRESSION))
        if release_tuple(name) < SPLIT_VIEWS_FIXED:
            assert out.returncode == 1 and "[value owns storage]" in out.stdout, (name, out.stdout)
        else:
            assert out.returncode == 0 and "replayed cleanly" in out.stdout, (name, out.stdout)


def test_matrix_table_json_and_plot(tmp_path):
    releases = ",".join(known_releases()[:2])
    out = subprocess.run([sys.executable, "-m", "bcr_verify.cli", "matrix", "--releases",
                          releases, "--block-size", "1", "--max-steps", "100",
                          "--known", "value owns storage", "--json",
                          str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png"),
                          "--trace-dir", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["release"] for r in rows] == releases.split(",")
    assert all(r["verdict"] == "pass" and r["generation"] for r in rows)
    assert "| release | generation |" in out.stdout
    assert (tmp_path / "m.png").stat().st_size > 1000


EVENT_REGRESSIONS = {
    # trace -> (release it first passes on, check it fails with before that)
    "sglang-events-root-parent-fixed-in-0.5.0rc1.json": ((0, 5, 0, 1), {}),
    "sglang-events-child-parent-fixed-in-0.5.6.json": ((0, 5, 6, 0), {}),
    "sglang-events-content-hash-fixed-in-0.5.6.json": ((0, 5, 6, 0), {}),
    "sglang-events-split-removal-fixed-in-0.5.7.json": (SPLIT_VIEWS_FIXED, {
        (0, 5, 7, 0): "value owns storage"}),  # 0.5.7's own split bug fires first
}
EVENTS_FROM = (0, 4, 8, 0)
"""SGLang's RadixCache publishes KV events from 0.4.8."""
UNIFIED_EVENTS = REGRESSION.parent / "sglang-events-unified-silent-fixed-in-0.5.13.json"
UNIFIED_EVENTS_FIXED = (0, 5, 13, 0)
"""sgl-project/sglang#26387: before 0.5.13 UnifiedRadixCache publishes no KV events at all."""


def test_event_regressions_fail_until_their_fix_and_pass_after():
    """Each KV-event bug found on a real release replays as it should on every release with
    events: the rule that names it (or, in 0.4.9, its root-parent bug, which every store
    under the root shows first) before the fix, a clean replay after."""
    from bcr_verify.adapters.sglang_api import release_tuple
    paths = [REGRESSION.parent / trace for trace in EVENT_REGRESSIONS]
    for name, python in ((r, ensure(r)) for r in known_releases()
                         if release_tuple(r) >= EVENTS_FROM):
        version = release_tuple(name)
        out = bcr_verify_in(python, "replay", *map(str, paths))
        verdicts = {}
        for section in out.stdout.split("== ")[1:]:
            path, _, body = section.partition("\n")
            verdicts[Path(path).name] = next(
                (l for l in body.splitlines() if l.startswith(("PASS", "FAILS", "FAIL"))), body)
        for trace, (fixed, instead) in EVENT_REGRESSIONS.items():
            recorded = json.loads((REGRESSION.parent / trace).read_text())["failure"]["check"]
            want = instead.get(version[:3] + (0,)) if version < fixed else None
            if version < fixed and want is None:
                want = recorded if version >= (0, 5, 0, 1) else "events: lost parent link"
            got = verdicts.get(trace, out.stdout[-1500:] + out.stderr[-1500:])
            if want is None:
                assert got.startswith("PASS"), (name, trace, got)
            else:
                assert got.startswith("FAIL") and f"[{want}]" in got, (name, trace, want, got)


def test_unified_cache_publishes_events_from_0_5_13():
    """UnifiedRadixCache took ``enable_kv_cache_events`` and published nothing until 0.5.13:
    its regression trace fails on every release before the fix that drives the cache, with
    the first event missing, and replays cleanly from the fix on."""
    from bcr_verify.adapters.sglang_api import release_tuple
    for name, python in ((r, ensure(r)) for r in known_releases()
                         if release_tuple(r) >= UNIFIED_FROM):
        out = bcr_verify_in(python, "replay", str(UNIFIED_EVENTS))
        if release_tuple(name) < UNIFIED_EVENTS_FIXED:
            assert out.returncode == 1 and "[events: missing store]" in out.stdout, (
                name, out.stdout[-1500:])
        else:
            assert out.returncode == 0 and "replayed cleanly" in out.stdout, (
                name, out.stdout[-1500:] + out.stderr[-1500:])
