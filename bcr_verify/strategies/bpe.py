"""How often tokenize(A) is a token prefix of tokenize(A + B): BPE prefix (in)stability.

A prefix cache keyed on token ids only hits when the cached prompt's ids are a prefix of the
new prompt's ids. Cutting text at an arbitrary character usually breaks that (the last tokens
of A merge differently with B); cutting at a special token (a chat-turn boundary) never does.
These numbers justify building workloads from whole chat turns and token-level extensions.
"""

from __future__ import annotations

import random
import re

from .tokenizer import IM_END, IM_START, ChatTokenizer

_SPECIAL = re.compile(re.escape(IM_START) + "|" + re.escape(IM_END))


def prefix_stability(tokenizer: ChatTokenizer, texts: list[str], samples: int = 500, seed: int = 0
                     ) -> dict:
    """Measure prefix stability at ``samples`` random character cuts and special-token cuts.

    Random cuts split one of ``texts``; special-token cuts split a ChatML rendering of 2-6 of
    ``texts`` just before or after an ``<|im_start|>``/``<|im_end|>``. Each side reports the
    share of stable cuts and, over unstable ones, how many trailing tokens of A changed.
    """
    usable = [t for t in texts if len(t) >= 2]
    if not usable or samples < 1:
        raise ValueError("prefix_stability needs samples >= 1 and a text of 2+ characters")
    rng = random.Random(seed)
    random_cuts = []
    for _ in range(samples):
        text = rng.choice(usable)
        random_cuts.append(_split(text, rng.randint(1, len(text) - 1)))
    special_cuts = []
    for _ in range(samples):
        picked = rng.sample(usable, min(len(usable), rng.randint(2, 6)))
        turns = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(picked)]
        text = tokenizer.render(turns, add_generation_prompt=False)
        cuts = [pos for m in _SPECIAL.finditer(text) for pos in (m.start(), m.end())]
        special_cuts.append(_split(text, rng.choice([c for c in cuts if 0 < c < len(text)])))
    return {
        "tokenizer_sha256": tokenizer.sha256,
        "samples": samples,
        "seed": seed,
        "random_cuts": _summarize(tokenizer, random_cuts),
        "special_token_cuts": _summarize(tokenizer, special_cuts),
    }


def _split(text: str, at: int) -> tuple[str, str]:
    return text[:at], text[at:]


def _summarize(tokenizer: ChatTokenizer, cuts: list[tuple[str, str]]) -> dict:
    changed = []
    for a, b in cuts:
        ids_a, ids_ab = tokenizer.encode(a), tokenizer.encode(a + b)
        same = next((i for i, (x, y) in enumerate(zip(ids_a, ids_ab)) if x != y), len(ids_a))
        changed.append(len(ids_a) - same)
    unstable = [c for c in changed if c]
    return {
        "prefix_share": round(1 - len(unstable) / len(changed), 4),
        "unstable": len(unstable),
        "mean_changed_tail": round(sum(unstable) / len(unstable), 3) if unstable else 0.0,
        "max_changed_tail": max(unstable, default=0),
    }
