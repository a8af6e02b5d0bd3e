"""KV replay: check that the slots a cache returns really hold the prefix's K/V.

Structural invariants cannot see a cache that returns the wrong slots (stale after eviction
and reuse, aliased, off by one) while its tree looks perfect. This stage keeps, per lane, a
paged KV pool whose slot indices are exactly the page ids the cache stores
(``slot = page * block_size + offset``) and fills it the way an engine would: when a request
begins, the K/V of its fresh pages is written into their slots. On a prefix hit the K/V behind
the returned pages is gathered, the rest of the prompt is run on top of it through a tiny but
real causal LM (Qwen2 architecture, the real 151,936-token vocabulary, seeded random weights,
no download), and the result is compared with a full recompute:

* the suffix's final hidden states, max absolute difference (a wrong slot shifts them);
* the gathered K/V against the recomputed prefix K/V, position by position (a permutation of
  the prefix's slots is invisible to attention, which treats cached entries as a set).

Both differences are reported, not just pass/fail; see ``docs/kv-replay.md`` for the measured
numbers behind the default tolerances and the cost per check.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from bcr_verify.errors import Divergence
from bcr_verify.lockstep import Observer, short as _short

VOCAB_SIZE = 151_936
"""Qwen2's vocabulary (the real tokenizer's size), so real token ids replay unchanged."""

# Default tolerances (max abs difference), float32 weights with init std 0.2. Measured here:
# correct reuse differs by <= ~4e-7 (often exactly 0), the mildest corruption measured (one
# token's K/V taken from another prompt) by >= ~1e-2 in K/V and ~1e-3..1e-1 in hidden states.
# See docs/kv-replay.md.
DEFAULT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}
DEFAULT_KV_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}


def build_model(seed: int = 0, dtype: torch.dtype = torch.float32, init_std: float = 0.2,
                layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    """A tiny Qwen2 causal LM from a config: fixed seed, real vocabulary, eval mode.

    ``init_std`` 0.2 (ten times the usual 0.02) makes a wrong K/V move the hidden states far
    above float32 noise. Nothing is downloaded.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=32768, initializer_range=init_std, tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model.to(dtype).eval()


@dataclass
class FullCompute:
    """A prompt computed from scratch: per-position K/V ``[layers, n, kv_heads, head_dim]``
    and final hidden states ``[n, hidden]``."""

    keys: torch.Tensor
    values: torch.Tensor
    hidden: torch.Tensor


class ReplayModel:
    """The model plus the two forward passes replay needs; full recomputes are LRU-cached."""

    def __init__(self, model=None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 init_std: float = 0.2, cache_size: int = 64):
        self.model = model if model is not None else build_model(seed, dtype, init_std)
        self.config = self.model.config
        self.dtype = next(self.model.parameters()).dtype
        self.vocab = self.config.vocab_size
        self.cache_size = cache_size
        self._full: OrderedDict[tuple, FullCompute] = OrderedDict()
        self.full_computes = 0

    def _ids(self, tokens: Sequence[int]) -> torch.Tensor:
        # Ids beyond the vocabulary wrap: a collision only makes two prompts' K/V alike,
        # which can hide a bug but never raise a false alarm.
        return torch.tensor([[t % self.vocab for t in tokens]], dtype=torch.long)

    def _new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.config)

    @torch.no_grad()
    def full(self, tokens: Sequence[int]) -> FullCompute:
        key = tuple(tokens)
        hit = self._full.get(key)
        if hit is not None:
            self._full.move_to_end(key)
            return hit
        cache = self._new_cache()
        out = self.model.model(input_ids=self._ids(tokens), past_key_values=cache, use_cache=True)
        layers = out.past_key_values.layers
        result = FullCompute(
            keys=torch.stack([l.keys[0].transpose(0, 1) for l in layers]).clone(),
            values=torch.stack([l.values[0].transpose(0, 1) for l in layers]).clone(),
            hidden=out.last_hidden_state[0].clone(),
        )
        self.full_computes += 1
        self._full[key] = result
        if len(self._full) > self.cache_size:
            self._full.popitem(last=False)
        return result

    @torch.no_grad()
    def suffix(self, keys: torch.Tensor, values: torch.Tensor,
               suffix_tokens: Sequence[int]) -> torch.Tensor:
        """Run ``suffix_tokens`` on top of a prefix given as per-position K/V
        ``[layers, m, kv_heads, head_dim]`` (placed at positions 0..m-1, as a cache must);
        returns the suffix's final hidden states ``[len(suffix), hidden]``."""
        cache = self._new_cache()
        for layer in range(keys.shape[0]):  # update() keeps these tensors: pass fresh copies
            cache.update(keys[layer].transpose(0, 1).unsqueeze(0).contiguous(),
                         values[layer].transpose(0, 1).unsqueeze(0).contiguous(), layer)
        out = self.model.model(input_ids=self._ids(suffix_tokens), past_key_values=cache,
                               use_cache=True)
        return out.last_hidden_state[0]


class PagedKVPool:
    """K and V tensors ``[layers, slots, kv_heads, head_dim]``; slot = page*block_size + offset.

    Grows on demand (doubling), so any page id ≥ 0 the caches hand out has its slots.
    Unwritten slots hold zeros; written ones keep their K/V until overwritten, stale or not,
    exactly as an engine's pool does.
    """

    def __init__(self, num_slots: int, layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        shape = (layers, max(1, num_slots), kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)

    @classmethod
    def for_model(cls, model: "ReplayModel | torch.nn.Module", num_slots: int = 1024) -> "PagedKVPool":
        rm = model if isinstance(model, ReplayModel) else ReplayModel(model)
        c = rm.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(num_slots, c.num_hidden_layers, c.num_key_value_heads, head_dim, rm.dtype)

    @property
    def num_slots(self) -> int:
        return self.keys.shape[1]

    def _ensure(self, top: int) -> None:
        if top < self.num_slots:
            return
        size = self.num_slots
        while size <= top:
            size *= 2
        grow = lambda t: torch.cat([t, t.new_zeros((t.shape[0], size - t.shape[1], *t.shape[2:]))], 1)
        self.keys, self.values = grow(self.keys), grow(self.values)

    def write(self, slots: Sequence[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store per-position K/V ``[layers, len(slots), kv_heads, head_dim]`` at ``slots``."""
        if not len(slots):
            return
        index = torch.as_tensor(list(slots), dtype=torch.long)
        self._ensure(int(index.max()))
        self.keys[:, index] = keys
        self.values[:, index] = values

    def gather(self, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(list(slots), dtype=torch.long)
        if len(index):
            self._ensure(int(index.max()))
        return self.keys[:, index], self.values[:, index]


def page_slots(pages: Sequence[int], block_size: int) -> list[int]:
    """The KV slots behind ``pages``: page p holds slots p*block_size .. p*block_size+bs-1."""
    return [p * block_size + o for p in pages for o in range(block_size)]


@dataclass
class ReplayResult:
    """One replay: ``max_diff`` over the suffix's final hidden states, ``kv_max_diff`` over the
    gathered prefix K/V per position; ``first_bad_position`` is the first prompt position
    over tolerance (a prefix position for K/V, else a suffix position), or None."""

    max_diff: float
    kv_max_diff: float
    first_bad_position: int | None
    prefix_len: int
    suffix_len: int
    kv_bad_positions: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.first_bad_position is None


def check_prefix(model, pool: PagedKVPool, tokens: Sequence[int], slots: Sequence[int],
                 tolerance: float | None = None, kv_tolerance: float | None = None) -> ReplayResult:
    """Replay ``tokens`` with its first ``len(slots)`` positions' K/V gathered from ``slots``.

    ``model`` is a :class:`ReplayModel` (or a Qwen2 causal LM, wrapped on the fly). At least
    one token is always run as the suffix (a fully matched prompt replays its last token on
    top of the rest, as an engine recomputes it); the K/V check covers every gathered slot.
    """
    started = time.perf_counter()
    rm = model if isinstance(model, ReplayModel) else ReplayModel(model)
    tokens = list(tokens)
    m = len(slots)
    if not 0 < m <= len(tokens):
        raise ValueError(f"slots: need 1..{len(tokens)} slots for {len(tokens)} tokens, got {m}")
    tol = DEFAULT_TOLERANCE.get(rm.dtype, 1e-4) if tolerance is None else tolerance
    kv_tol = DEFAULT_KV_TOLERANCE.get(rm.dtype, 1e-4) if kv_tolerance is None else kv_tolerance
    ref = rm.full(tokens)
    keys, values = pool.gather(slots)

    # Per-position K/V: [m] max over layers, heads and dims of |K| and |V| differences.
    kv_diff = torch.maximum((keys - ref.keys[:, :m]).abs().amax(dim=(0, 2, 3)),
                            (values - ref.values[:, :m]).abs().amax(dim=(0, 2, 3)))
    kv_bad = (kv_diff > kv_tol).nonzero()

    p = min(m, len(tokens) - 1)
    hidden = rm.suffix(keys[:, :p], values[:, :p], tokens[p:])
    h_diff = (hidden - ref.hidden[p:]).abs().amax(dim=-1)
    h_bad = (h_diff > tol).nonzero()

    if len(kv_bad):
        first = int(kv_bad[0])
    elif len(h_bad):
        first = p + int(h_bad[0])
    else:
        first = None
    return ReplayResult(
        max_diff=float(h_diff.max()), kv_max_diff=float(kv_diff.max()), first_bad_position=first,
        prefix_len=m, suffix_len=len(tokens) - p, kv_bad_positions=len(kv_bad),
        seconds=time.perf_counter() - started,
    )


class KVReplay(Observer):
    """Lockstep observer: replay every (or a ``sample`` share of) prefix hit of every lane.

    Each lane gets its own :class:`PagedKVPool`. ``on_begin`` first checks the matched pages
    (raising :class:`Divergence` with check ``"kv replay"`` for a wrong slot), then writes the
    K/V of the request's fresh pages so later hits find it there. Only full blocks are cached,
    so only ``len(tokens) // block_size * block_size`` positions are ever written.
    """

    def __init__(self, block_size: int, sample: float = 1.0, seed: int = 0,
                 tolerance: float | None = None, kv_tolerance: float | None = None,
                 model: ReplayModel | None = None, threads: int | None = 1):
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample: a share in [0, 1], got {sample}")
        if threads:
            torch.set_num_threads(threads)  # 2-core machines: default threading was 2-20x slower
        self.block_size = block_size
        self.sample = sample
        self._rng = random.Random(seed)
        self.model = model or ReplayModel(seed=seed)
        self.tolerance = DEFAULT_TOLERANCE.get(self.model.dtype, 1e-4) if tolerance is None else tolerance
        self.kv_tolerance = (DEFAULT_KV_TOLERANCE.get(self.model.dtype, 1e-4)
                             if kv_tolerance is None else kv_tolerance)
        self.pools: dict[str, PagedKVPool] = {}
        self.hits = 0
        self.replayed = 0
        self.skipped = 0
        self.failures = 0
        self.written_tokens = 0
        self.replayed_tokens = 0
        self.max_diff = 0.0
        self.max_kv_diff = 0.0
        self.seconds = 0.0
        self.check_seconds = 0.0

    def pool(self, lane: str) -> PagedKVPool:
        if lane not in self.pools:
            self.pools[lane] = PagedKVPool.for_model(self.model)
        return self.pools[lane]

    def on_begin(self, lane: str, tokens: list[int], matched: list[int], new: list[int]) -> None:
        started = time.perf_counter()
        try:
            self._begin(lane, list(tokens), list(matched), list(new))
        finally:
            self.seconds += time.perf_counter() - started

    def on_match(self, lane: str, tokens: list[int], matched: list[int]) -> None:
        started = time.perf_counter()
        try:
            self._hit(lane, self.pool(lane), list(tokens), list(matched))
        finally:
            self.seconds += time.perf_counter() - started

    def _hit(self, lane: str, pool: PagedKVPool, tokens: list[int], matched: list[int]) -> None:
        if not matched:
            return
        self.hits += 1
        if self.sample >= 1.0 or self._rng.random() < self.sample:
            self._replay(lane, pool, tokens, matched)
        else:
            self.skipped += 1

    def _begin(self, lane: str, tokens: list[int], matched: list[int], new: list[int]) -> None:
        bs = self.block_size
        pool = self.pool(lane)
        m = len(matched) * bs
        self._hit(lane, pool, tokens, matched)
        if new:
            end = min(len(tokens), m + len(new) * bs)
            ref = self.model.full(tokens)
            slots = page_slots(new, bs)[: end - m]
            pool.write(slots, ref.keys[:, m:end], ref.values[:, m:end])
            self.written_tokens += end - m

    def _replay(self, lane: str, pool: PagedKVPool, tokens: list[int], matched: list[int]) -> None:
        bs = self.block_size
        slots = page_slots(matched, bs)
        if len(slots) > len(tokens):
            self.failures += 1
            raise Divergence(lane, "kv replay", f"matched pages {_short(matched)} cover "
                             f"{len(slots)} tokens of a {len(tokens)}-token prompt")
        result = check_prefix(self.model, pool, tokens, slots, self.tolerance, self.kv_tolerance)
        self.replayed += 1
        self.replayed_tokens += result.prefix_len
        self.check_seconds += result.seconds
        if result.ok:
            self.max_diff = max(self.max_diff, result.max_diff)
            self.max_kv_diff = max(self.max_kv_diff, result.kv_max_diff)
            return
        self.failures += 1
        pos = result.first_bad_position
        if pos < result.prefix_len:
            where = (f"K/V at prompt position {pos} (page {matched[pos // bs]}, slot {slots[pos]}) "
                     f"differs from a full recompute by {result.kv_max_diff:.3g} "
                     f"(tolerance {self.kv_tolerance:g}; {result.kv_bad_positions} of "
                     f"{result.prefix_len} cached positions wrong)")
        else:
            where = (f"hidden state at prompt position {pos} differs from a full recompute")
        raise Divergence(
            lane, "kv replay",
            f"replaying {result.prefix_len} cached tokens from pages {_short(matched)}: {where}; "
            f"suffix hidden states differ by {result.max_diff:.3g} (tolerance {self.tolerance:g})")

    def on_reset(self, lane: str) -> None:
        # The cache and allocator are emptied; the pool keeps its (now stale) contents, as an
        # engine's would, so a cache that still returns old pages is caught.
        pass

    def report(self) -> dict:
        return {"kv_replay": {
            "block_size": self.block_size, "sample": self.sample,
            "tolerance": self.tolerance, "kv_tolerance": self.kv_tolerance,
            "hits": self.hits, "replayed": self.replayed, "skipped": self.skipped,
            "failures": self.failures, "replayed_tokens": self.replayed_tokens,
            "written_tokens": self.written_tokens, "full_computes": self.model.full_computes,
            "max_diff_correct": self.max_diff, "max_kv_diff_correct": self.max_kv_diff,
            "seconds": round(self.seconds, 4), "check_seconds": round(self.check_seconds, 4),
        }}


# ----------------------------------------------------------------- measurement


def measure(trials: int = 100, seed: int = 0, dtype: torch.dtype = torch.float32,
            init_std: float = 0.2, cost_runs: int = 50) -> dict:
    """Correct-reuse vs corrupted differences over random prompts and cuts, and the cost of
    one check (512-token prompt, 285 cached + 227 replayed, one thread). Numbers for the docs."""
    torch.set_num_threads(1)
    rm = ReplayModel(seed=seed, dtype=dtype, init_std=init_std)
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(VOCAB_SIZE) for _ in range(n)]
    correct = {"hidden": 0.0, "kv": 0.0}
    corrupt: dict[str, dict[str, float]] = {}
    for _ in range(trials):
        bs = rng.choice([1, 4, 16])
        cut = rng.randrange(1, 40)
        writer = draw(cut * bs) + draw(rng.randrange(0, 60))  # another prompt, same prefix
        reader = writer[: cut * bs] + draw(rng.randrange(0, 40))
        pool = PagedKVPool.for_model(rm, 64)
        pages = rng.sample(range(1, 1000), len(writer) // bs + 3)
        wp, spare = pages[: len(writer) // bs], pages[-3:]
        end = len(writer) // bs * bs
        ref = rm.full(writer)
        pool.write(page_slots(wp, bs), ref.keys[:, :end], ref.values[:, :end])
        other = rm.full(draw(3 * bs))
        pool.write(page_slots(spare, bs), other.keys, other.values)
        slots = page_slots(wp[:cut], bs)
        r = check_prefix(rm, pool, reader, slots, 1.0, 1.0)
        correct["hidden"] = max(correct["hidden"], r.max_diff)
        correct["kv"] = max(correct["kv"], r.kv_max_diff)
        m = len(slots)
        cases = {"all slots off by one": [s + 1 for s in slots]}
        s = list(slots)
        s[rng.randrange(m)] = page_slots(spare, bs)[0]
        cases["one stale slot"] = s
        s = list(slots)
        j = rng.randrange(cut)
        s[j * bs:(j + 1) * bs] = page_slots([spare[1]], bs)
        cases["page reused after eviction"] = s
        if m > 1:
            cases["prefix slots permuted"] = slots[1:] + slots[:1]
        for name, s in cases.items():
            r = check_prefix(rm, pool, reader, s, 1.0, 1.0)
            c = corrupt.setdefault(name, {"hidden_min": float("inf"), "hidden_max": 0.0,
                                          "kv_min": float("inf")})
            c["hidden_min"] = min(c["hidden_min"], r.max_diff)
            c["hidden_max"] = max(c["hidden_max"], r.max_diff)
            c["kv_min"] = min(c["kv_min"], r.kv_max_diff)
    tokens = draw(512)
    pool = PagedKVPool.for_model(rm, 1024)
    ref = rm.full(tokens)
    slots = list(range(1, 286))
    pool.write(slots, ref.keys[:, :285], ref.values[:, :285])
    times = []
    for i in range(cost_runs + 3):
        r = check_prefix(rm, pool, tokens, slots)
        if i >= 3:
            times.append(r.seconds)
    full_times = []
    for _ in range(10):
        started = time.perf_counter()
        rm.full(draw(512))
        full_times.append(time.perf_counter() - started)
    times.sort()
    full_times.sort()
    return {
        "dtype": str(dtype), "init_std": init_std, "trials": trials,
        "correct_reuse_max": correct, "corrupted": corrupt,
        "check_ms_median": round(1000 * times[len(times) // 2], 2),
        "check_ms_min": round(1000 * times[0], 2),
        "full_recompute_512_ms_median": round(1000 * full_times[5], 2),
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bcr_verify.kv_replay",
                                     description="Measure KV-replay differences and cost.")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--init-std", type=float, default=0.2)
    args = parser.parse_args()
    print(json.dumps(measure(args.trials, dtype=torch.float64 if args.float64 else torch.float32,
                             init_std=args.init_std), indent=2, default=str))
