"""The mutant scorecard: every mutant builds, representative ones are caught, and the correct
BCR-like cache they are variants of passes (no false alarms from the extra checks)."""

import pytest

from bcr_verify.adapters.registry import resolve
from bcr_verify.mutants import MUTANTS, score
from bcr_verify.runner import RunConfig, run
from bcr_verify.soak import SoakConfig, soak


def test_at_least_twelve_distinct_mutants():
    assert len(MUTANTS) >= 12
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    assert len({m.impl for m in MUTANTS}) == len(MUTANTS)
    for m in MUTANTS:
        assert resolve(m.impl).availability() is None, m.name


def test_correct_blockhash_cache_passes():
    result = run(RunConfig(implementations=["bcr_verify.mutants.blockhash:correct"],
                           block_size=1, workload="disjoint", max_steps=400))
    assert result.ok, result.failure and result.failure.render()
    r = soak(SoakConfig(implementations=["bcr_verify.mutants.blockhash:correct", "reference"],
                        block_size=1, workload="disjoint", minutes=None, max_ops=3000,
                        check_every=8)).report
    assert r["ok"], r["failure"]


@pytest.mark.parametrize("name", ["v1-no-writer-guard", "page-units", "lock-parent",
                                  "vllm-hit-unreferenced", "vllm-content-hash",
                                  "vllm-reuse-order", "vllm-refcount-off-by-one"])
def test_representative_mutants_are_caught(name, tmp_path):
    mutant = next(m for m in MUTANTS if m.name == name)
    # ddmin may need its time when a loaded machine cut Hypothesis's own shrink short: it
    # stops as soon as nothing shorter fails, so a generous cap costs nothing otherwise
    row = score(mutant, seconds=60, trace_dir=str(tmp_path), ddmin_seconds=60)
    assert row["caught"], row
    assert row["shrunk_steps"] <= 8
    assert row["trace"]
