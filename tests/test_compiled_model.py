"""The compiled reference model (setup.py builds it with mypyc) is its source, only faster:
driven side by side through one random workload, the two give the same answer, or refuse
with the same error, at every call."""

import importlib.util
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

import bcr_verify.models as models
from bcr_verify.models import ReferenceCache


def _source_class():
    name = "bcr_verify_reference_source"
    spec = importlib.util.spec_from_file_location(
        name, Path(models.__file__).with_name("reference.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building Block
    spec.loader.exec_module(module)
    return module.ReferenceCache


def test_the_set_up_venv_runs_the_compiled_model():
    assert models.COMPILED, (
        "bcr_verify.models.reference runs from source: build it with `make setup` (or "
        "`pip install --no-build-isolation -e .` with mypy installed)")


def _outcome(call):
    try:
        return "ok", call()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


MIXES = {
    "lru": ("insert", "insert", "match", "acquire", "release", "evict_lru", "apply_lru",
            "evict", "reset", "bad"),
    "copies": ("insert", "insert", "match", "acquire", "release", "evict_copy", "reset", "bad"),
}
"""SGLang's way (LRU and subtree eviction) and vLLM's (duplicate copies, evicted one by one):
no contract mixes the two, and the model refuses their mix (a block hollowed by
``evict_copy`` is not something ``evict_lru`` or ``evict`` expect to find)."""


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("block_size", [1, 4])
def test_compiled_and_source_models_agree_call_by_call(block_size, mix):
    if not models.COMPILED:
        pytest.fail("nothing to compare: the model is not compiled (see the test above)")
    rng = random.Random(block_size)
    duplicates = mix == "copies"
    caches = (ReferenceCache(block_size), _source_class()(block_size))
    prompts = [[rng.randrange(6) for _ in range(rng.randrange(12 * block_size))]
               for _ in range(20)]
    held: list[list[int]] = []
    next_value = 0
    seen = Counter()
    for _ in range(6000):
        op = rng.choice(MIXES[mix])
        tokens = rng.choice(prompts)
        full = len(tokens) // block_size
        cached = caches[0].values()
        values = list(range(next_value, next_value + full))
        if rng.random() < 0.1 and full and cached:
            values[-1] = rng.choice(cached)  # cached elsewhere, unless its block is: refused
        next_value += full
        pick = rng.sample(cached, min(len(cached), rng.randrange(3))) if cached else []
        count = rng.randrange(4 * block_size)
        if op == "reset" and rng.random() > 0.05:
            continue
        calls = {
            "insert": lambda c: c.insert(tokens, values, keep_duplicates=duplicates),
            "match": lambda c: c.match_prefix(tokens),
            "acquire": lambda c: c.acquire(pick),
            "release": lambda c: c.release(held[-1] if held else pick),
            "evict_lru": lambda c: c.evict_lru(count),
            "apply_lru": lambda c: c.apply_lru_eviction(
                c.lru_victims(count) if rng.random() < 0.8 else pick, count),
            "evict": lambda c: c.evict(pick[0] if pick else -1),
            "evict_copy": lambda c: c.evict_copy(pick[0] if pick else -1),
            "reset": lambda c: c.reset(),
            "bad": lambda c: c.insert([True] * block_size, [-2]) if rng.random() < 0.5
            else c.lru_victims(True),
        }
        state = rng.getstate()
        outcomes = []
        for cache in caches:  # the same random choices inside each call
            rng.setstate(state)
            outcomes.append(_outcome(lambda: calls[op](cache)))
        assert outcomes[0] == outcomes[1], f"{op}: compiled {outcomes[0]}, source {outcomes[1]}"
        seen[op, outcomes[0][0]] += 1
        if op == "acquire" and outcomes[0][0] == "ok":
            held.append(pick)
        elif op == "release" and held and outcomes[0][0] == "ok":
            held.pop()
        elif op == "reset":
            held.clear()
        snapshot = [(c.cached_tokens, c.protected_tokens, c.clock, c.values()) for c in caches]
        assert snapshot[0] == snapshot[1], f"after {op}: states differ"
        caches[0].assert_invariants()
    for op in MIXES[mix][:-2]:
        assert seen[op, "ok"] > 50, f"{op} succeeded only {seen[op, 'ok']} times: {seen}"
    assert seen["insert", "ValueError"] and seen["bad", "TypeError"], seen
