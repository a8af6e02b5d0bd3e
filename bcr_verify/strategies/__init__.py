"""Prompt workloads for prefix-cache verification, built with the real Qwen2 tokenizer.

``build_workload`` gives deterministic pools of realistic prompts, ``prompts`` turns a pool
into a Hypothesis strategy (with raw ``edge_case_prompts`` mixed in), and
``prefix_stability`` measures why text-level prefixes are not token-level prefixes.
"""

from .bpe import prefix_stability
from .tokenizer import EXPECTED_SHA256, ChatTokenizer, TokenizerError, load_tokenizer
from .tokens import edge_case_prompts, prompts
from .workloads import WORKLOADS, build_workload, load_texts

__all__ = [
    "EXPECTED_SHA256", "WORKLOADS", "ChatTokenizer", "TokenizerError", "build_workload",
    "edge_case_prompts", "load_texts", "load_tokenizer", "prefix_stability", "prompts",
]
