"""SGLang's API generations: names, the translations read off the installed release, and the
CPU stand-ins for CUDA-only packages (used only when an import fails for want of one)."""

import sys
import textwrap

import pytest

from bcr_verify.adapters import standins
from bcr_verify.adapters.sglang_api import generation, load, release_tuple


@pytest.mark.parametrize("version, name", [
    ("0.4.3", "A"), ("0.4.3.post3", "B"), ("0.4.4", "C"), ("0.4.9", "D"), ("0.5.2", "E"),
    ("0.5.5", "F"), ("0.5.6.post2", "G"), ("0.5.7", "G"), ("0.5.8", "H"), ("0.5.9", "I"),
    ("0.5.13", "I"), ("0.5.18", "J"), ("0.5.19", "J"), ("0.5.23", "K"),
])
def test_generation_of_a_release(version, name):
    assert generation(version).startswith(name + " ")


def test_post_releases_sort_after_their_release():
    assert release_tuple("0.4.3") < release_tuple("0.4.3.post3") < release_tuple("0.4.4")
    assert generation("0.4.2").startswith("older than")


def test_installed_release_translations():
    t = load().t
    assert t.release == "0.5.23" and t.generation.startswith("K")
    assert (t.cache_ctor, t.key, t.match_call, t.insert_call, t.evict_call, t.child_key) == (
        "params", "radixkey-array", "params", "params", "params", "key.child_key")
    assert t.evictable_leaves and t.pages and t.insert_copies
    assert t.stand_ins == [] and t.not_checked() == []


def test_stand_in_only_for_a_missing_cuda_package(tmp_path, monkeypatch):
    (tmp_path / "needs_deep_gemm.py").write_text(textwrap.dedent("""
        from deep_gemm import _custom_ops as ops
        from deep_gemm.scalar_type import scalar_types
        WIDTH = scalar_types.uint4b8

        @ops.register
        def kept():
            return 42
    """))
    (tmp_path / "needs_other.py").write_text("import surely_not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = list(sys.meta_path)
    try:
        module, used = standins.import_with_standins("needs_deep_gemm")
        assert module.kept() == 42  # a stand-in used as a decorator leaves the function
        assert used == [{"package": "deep_gemm",
                         "names": ["deep_gemm._custom_ops", "deep_gemm.scalar_type.scalar_types"]}]
        with pytest.raises(ModuleNotFoundError):
            standins.import_with_standins("needs_other")
    finally:
        sys.meta_path[:] = before
        for name in [n for n in sys.modules if n.split(".")[0] in ("deep_gemm", "needs_deep_gemm")]:
            del sys.modules[name]
