"""GPU stage: SGLang's radix cache on vs off must give the same logprobs. Skips without CUDA;
the judging logic and the local model directory are tested everywhere."""

from __future__ import annotations

import json

import pytest

from bcr_verify import gpu_replay
from bcr_verify.errors import Divergence
from bcr_verify.gpu_replay import Prompt, Served, build_prompts, compare


def test_sglang_engine_radix_cache_matches_uncached_logprobs():
    if not gpu_replay.cuda_available():
        pytest.skip(gpu_replay.SKIP_MESSAGE)
    pytest.importorskip("sglang")
    for deterministic in (True, False):
        report = gpu_replay.run_gpu_replay(deterministic=deterministic)
        assert report["passed"] and report["cache_hits"] > 0 and report["cached_tokens"] > 0
        if deterministic:
            assert report["max_abs_diff"] == 0.0


def test_main_without_cuda_skips_with_a_message(capsys, monkeypatch):
    monkeypatch.setattr(gpu_replay, "cuda_available", lambda: False)
    assert gpu_replay.main([]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] and "cached_tokens > 0" in out["reason"]


def test_model_dir_is_a_loadable_tiny_qwen2(tmp_path):
    path = gpu_replay.make_model_dir(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["vocab_size"] == 151_936
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert any(path.glob("*.safetensors"))
    if gpu_replay.tokenizer_assets() is not None:
        from tokenizers import Tokenizer
        assert Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size() > 150_000
    kwargs = gpu_replay.engine_kwargs(path, radix=True, deterministic=True, weights="seeded")
    assert kwargs["enable_deterministic_inference"] and not kwargs["disable_radix_cache"]
    assert kwargs["attention_backend"] == "triton"


def test_prompts_share_prefixes_in_groups():
    prompts = build_prompts(groups=2, per_group=3, prefix_len=8, suffix_len=4)
    assert [p.first_in_group for p in prompts] == [True, False, False] * 2
    assert prompts[0].ids[:8] == prompts[2].ids[:8] != prompts[3].ids[:8]


def _runs(cached_tokens=(0, 5), a=(-1.0, -2.0), b=(-1.0, -2.0), out_a=(7,), out_b=(7,)):
    prompts = [Prompt([1] * 8, 5, 0, True), Prompt([1] * 8, 5, 0, False)]
    cached = [Served(c, list(a), list(out_a), [-0.5] * len(out_a)) for c in cached_tokens]
    uncached = [Served(0, list(b), list(out_b), [-0.5] * len(out_b)) for _ in cached_tokens]
    return prompts, cached, uncached


def test_compare_passes_identical_runs_and_reports_what_it_compared():
    stats = compare(*_runs(), exact=True)
    assert stats == {"prompts": 2, "cache_hits": 1, "cached_tokens": 5,
                     "logprobs_compared": 6, "max_abs_diff": 0.0}


def test_compare_exact_mode_catches_any_difference():
    with pytest.raises(Divergence, match="prompt position 6"):
        compare(*_runs(b=(-1.0, -2.0 + 1e-6)), exact=True)
    assert compare(*_runs(b=(-1.0, -2.05)), exact=False, tolerance=0.1)["max_abs_diff"] > 0.04
    with pytest.raises(Divergence, match="tolerance"):
        compare(*_runs(b=(-1.0, -2.5)), exact=False, tolerance=0.1)
    with pytest.raises(Divergence, match="greedy output"):
        compare(*_runs(out_b=(8,)), exact=True)


def test_compare_refuses_a_vacuous_pass():
    with pytest.raises(Divergence) as info:
        compare(*_runs(cached_tokens=(0, 0)), exact=True)
    assert info.value.check == "gpu replay vacuous"
