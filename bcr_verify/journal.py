"""The step record on disk as it happens, so a process that dies leaves its steps behind.

A supervised child (:mod:`bcr_verify.supervise`) opens a journal; every
:class:`~bcr_verify.lockstep.Lockstep` then writes where its lanes start from (``origin``:
the implementations, block size, pool capacity) and each step *before* running it, one JSON
line per step with a plain ``write(2)``: the data is in the kernel once the call returns, so
it survives a segfault or ``os._exit`` of the process, and the step that killed it is the
last line. The file is cut back whenever lanes start afresh (a new Hypothesis example, a
soak's flush), so it holds exactly the steps a trace needs and stays small.

Encoding a long prompt as JSON costs more than some caches take to serve it (~38 µs for 500
tokens), and workloads repeat prompts, so a prompt is written once, as base64 of 64-bit ints
(~6 µs; a JSON list for ints past 64 bits): ``{"prompt": n, "q": "..."}``, and the steps that
use it name it (``{"op": "begin", "prompt": n}``).
"""

from __future__ import annotations

import base64
import json
import os
from array import array
from pathlib import Path

_DUMPS = json.JSONEncoder(separators=(",", ":")).encode


PROMPTS_KEPT = 256
"""Prompts remembered since the last fresh start; past this they are forgotten and written
again when next used (a deep soak's prompts never repeat and grow long)."""


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self._prompts: dict[tuple[int, ...], int] = {}

    def fresh(self, origin: dict) -> None:
        """Lanes start from empty here: drop what came before."""
        os.ftruncate(self._fd, 0)
        self._prompts.clear()
        os.write(self._fd, (_DUMPS({"origin": origin}) + "\n").encode())

    def step(self, op: str, args: dict) -> None:
        tokens = args.get("tokens")
        if tokens is None:
            os.write(self._fd, (_DUMPS({"op": op, "args": args}) + "\n").encode())
            return
        key = tuple(tokens)
        number = self._prompts.get(key)
        line = ""
        if number is None:
            if len(self._prompts) >= PROMPTS_KEPT:
                self._prompts.clear()
            number = self._prompts[key] = len(self._prompts)
            line = _DUMPS({"prompt": number, **_packed(tokens)}) + "\n"
        os.write(self._fd, (line + _DUMPS({"op": op, "prompt": number}) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def _packed(tokens: list[int]) -> dict:
    try:
        return {"q": base64.b64encode(array("q", tokens).tobytes()).decode()}
    except OverflowError:
        return {"tokens": tokens}


def _unpacked(record: dict) -> list[int]:
    if "q" in record:
        return array("q", base64.b64decode(record["q"])).tolist()
    return record["tokens"]


def read(path: str | os.PathLike) -> tuple[dict | None, list[dict]]:
    """The last origin written and the steps after it (a torn last line is dropped)."""
    origin, steps, prompts = None, [], {}
    try:
        text = Path(path).read_text()
    except OSError:
        return None, []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if "origin" in record:
            origin, steps, prompts = record["origin"], [], {}
        elif "op" not in record:
            prompts[record["prompt"]] = _unpacked(record)
        elif "prompt" in record:
            steps.append({"op": record["op"], "args": {"tokens": prompts[record["prompt"]]}})
        else:
            steps.append(record)
    return origin, steps


JOURNAL: Journal | None = None
"""The open journal of this process, or None (not supervised: nothing to survive a crash)."""
