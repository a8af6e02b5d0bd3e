"""Deterministic pools of real-token prompts whose prefix sharing mimics real traffic.

A prefix cache is only exercised by prompts that share prefixes the way production traffic
does: a conversation re-sends its history, an agent re-sends one long system prompt, RAG
re-orders the same documents. Each family below produces one such pattern from the texts in
``corpus/prompts`` tokenized with the real Qwen2 tokenizer; "mixed" interleaves them all.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import UsageError
from .tokenizer import ChatTokenizer

WORKLOADS: dict[str, str] = {
    "multi-turn": "chats that grow turn by turn; each prompt is the previous one plus a new turn",
    "shared-system": "groups sharing one long (~500-token) system prompt, different user questions",
    "few-shot": "k = 1..N shots in a fixed order, then a question",
    "tree-of-thought": "reasoning branches forking from one prompt and forking again",
    "rag": "shared documents in varying subsets and orders, then a question",
    "disjoint": "unrelated single-turn chats sharing only the chat-template header",
    "mixed": "all of the above, interleaved (the default)",
}

FAMILIES = ("system", "few_shot", "documents", "questions", "replies")
MAX_TOKENS = 700  # families stop growing a prompt past this, keeping pools cheap to replay
GREETINGS = ("", "Hi, ", "Hello. ", "Quick question: ", "Sorry to bother you, ",
             "Good morning. ", "One more thing: ", "Urgent: ")
SHIFTS = ("early shift", "day shift", "late shift", "night shift", "weekend crew")


@lru_cache(maxsize=None)
def load_texts(family: str) -> tuple[str, ...]:
    """The entries of ``corpus/prompts/<family>.txt`` (entries are separated by ``---`` lines)."""
    if family not in FAMILIES:
        raise UsageError(f"unknown prompt family {family!r}; choose one of {', '.join(FAMILIES)}")
    try:
        text = (resources.files("bcr_verify.prompts") / f"{family}.txt").read_text("utf-8")
    except ModuleNotFoundError:  # source checkout: the package mapping is not installed
        text = (Path(__file__).resolve().parents[2] / "corpus" / "prompts" / f"{family}.txt"
                ).read_text("utf-8")
    return tuple(e.strip() for e in re.split(r"^---$", text, flags=re.M) if e.strip())


def build_workload(name: str, tokenizer: ChatTokenizer, seed: int = 0, size: int = 64
                   ) -> list[list[int]]:
    """``size`` token-id prompts of workload ``name``; the same arguments give the same pool."""
    if name not in WORKLOADS:
        raise UsageError(f"unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)}")
    if size < 1:
        raise UsageError(f"workload size must be at least 1, got {size}")
    if name == "mixed":
        return _mixed(tokenizer, seed, size)
    rng = random.Random(f"{name}:{seed}")  # str seeds hash stably across processes
    pool: list[list[int]] = []
    while len(pool) < size:  # generators are finite (cheap to reason about); restart if short
        pool += _GENERATORS[name](tokenizer, rng)
    return pool[:size]


def _mixed(tok: ChatTokenizer, seed: int, size: int) -> list[list[int]]:
    """Round-robin over the families so every window of the pool contains every pattern."""
    names = list(_GENERATORS)
    counts = [size // len(names) + (i < size % len(names)) for i in range(len(names))]
    parts = [build_workload(n, tok, seed, c) for n, c in zip(names, counts) if c]
    longest = max(map(len, parts))
    return [p[i] for i in range(longest) for p in parts if i < len(p)]


def _multi_turn(tok: ChatTokenizer, rng: random.Random) -> Iterator[list[int]]:
    """One conversation: every prompt is the last one plus the reply it got and a new question."""
    systems, questions, replies = load_texts("system"), load_texts("questions"), load_texts("replies")
    messages = [("system", rng.choice(systems[1:]))] if rng.random() < 0.7 else []
    for question in rng.sample(questions, rng.randint(2, 7)):
        messages.append(("user", question))
        prompt = tok.chat(messages)
        if len(prompt) > MAX_TOKENS:
            return
        yield prompt
        messages.append(("assistant", rng.choice(replies)))


def _shared_system(tok: ChatTokenizer, rng: random.Random) -> Iterator[list[int]]:
    """One group: the long system prompt (plus a per-group shift line), several questions."""
    system = f"{load_texts('system')[0]}\n\nYou are assisting the {rng.choice(SHIFTS)}."
    for question in rng.sample(load_texts("questions"), rng.randint(4, 10)):
        yield tok.chat([("system", system), ("user", question)])


def _few_shot(tok: ChatTokenizer, rng: random.Random) -> Iterator[list[int]]:
    """One question asked after 1, 2, ... N shots, the shots always in the same order."""
    shots = [shot.split("\nA: ", 1) for shot in load_texts("few_shot")]
    rng.shuffle(shots)
    head = [("system", load_texts("system")[3])]
    question = rng.choice(load_texts("questions"))
    for k in range(1, len(shots) + 1):
        turns = [t for q, a in shots[:k] for t in (("user", q.removeprefix("Q: ")), ("assistant", a))]
        yield tok.chat(head + turns + [("user", question)])


def _tree_of_thought(tok: ChatTokenizer, rng: random.Random) -> Iterator[list[int]]:
    """A tree of partial assistant answers; each node extends its parent by one generated step.

    Children extend the parent's *token ids* (a model appends tokens, it never re-tokenizes),
    so every node's parent is an exact token prefix of it.
    """
    sentences = [s.strip() + "." for d in load_texts("documents") for s in d.split(". ") if s.strip()]
    root = tok.chat([("system", load_texts("system")[2]), ("user", rng.choice(load_texts("questions")))])
    frontier = [root + tok.encode("Let me think about this step by step.")]
    yield frontier[0]
    for depth in range(1, 4):
        frontier = [node + tok.encode(f"\nStep {depth}: {step}")
                    for node in frontier for step in rng.sample(sentences, rng.randint(1, 3))]
        yield from (node for node in frontier if len(node) <= MAX_TOKENS)


def _rag(tok: ChatTokenizer, rng: random.Random) -> Iterator[list[int]]:
    """One question over 1-3 documents; the same documents recur in different subsets and orders.

    Documents share one user message, as in typical RAG templates, so a document only starts a
    shared token prefix when it comes first; later ones are where BPE boundaries get tested.
    """
    docs = load_texts("documents")
    chosen = rng.sample(docs, rng.choice((1, 1, 2, 2, 3)))
    context = "\n\n".join(f"[Document {i}]\n{d}" for i, d in enumerate(chosen, 1))
    user = f"Answer using only these documents.\n\n{context}\n\nQuestion: {rng.choice(load_texts('questions'))}"
    yield tok.chat([("system", load_texts("system")[2]), ("user", user)])


def _disjoint(tok: ChatTokenizer, rng: random.Random) -> Iterator[list[int]]:
    """Every (greeting, question) pair once, shuffled: no system prompt, little shared text."""
    pairs = [(g, q) for g in GREETINGS for q in load_texts("questions")]
    rng.shuffle(pairs)
    for greeting, question in pairs:
        yield tok.chat([("user", greeting + question)])


_GENERATORS: dict[str, Callable[[ChatTokenizer, random.Random], Iterator[list[int]]]] = {
    "multi-turn": _multi_turn, "shared-system": _shared_system, "few-shot": _few_shot,
    "tree-of-thought": _tree_of_thought, "rag": _rag, "disjoint": _disjoint,
}
