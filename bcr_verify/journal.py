"""The step record on disk as it happens, so a process that dies leaves its steps behind.

A supervised child (:mod:`bcr_verify.supervise`) opens a journal; every
:class:`~bcr_verify.lockstep.Lockstep` then writes where its lanes start from (``origin``:
the implementations, block size, pool capacity) and each step *before* running it. The file
is mapped shared (``mmap``), so a record is in the kernel's page cache, which the parent reads,
as soon as it is stored: it survives a segfault or ``os._exit`` of the process, and the step
that killed it is the last record. Lanes starting afresh (a new Hypothesis example, a soak's
flush) write from the start again, so the journal holds exactly the steps a trace needs.

It is written on every step of every run, so it is cheap: a supervised soak spent 6.6 % of
its loop on JSON lines and a ``write(2)`` per step. Records are binary: ``kind`` (one byte),
``length`` (four), a body, and a zero ``kind`` after the last one ends the journal. A prompt
is written once, as its tokens' 64-bit ints, and the steps that use it name it; a step whose
arguments are one int (or none) is its op, that argument's name and value; anything else,
and prompts with ints past 64 bits, are JSON. The header is stored last, so a record is
whole once it counts.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from array import array
from pathlib import Path

_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_HEAD = struct.Struct("<cI")
_PROMPT_STEP = struct.Struct("<I")
_INT = struct.Struct("<q")
_END = bytes(_HEAD.size)

ORIGIN, PROMPT, PROMPT_JSON, STEP_PROMPT, STEP_INT, STEP_JSON = (
    bytes([kind]) for kind in b"OPpTIJ")
"""Record kinds: the origin (JSON); a prompt (number, then 64-bit ints, or JSON past 64
bits); a step on a named prompt (number, then op); a step with one int argument or none
(op, name, value); any other step (JSON)."""

MAPPED = 1 << 20
"""Bytes mapped at first; doubled when a run outgrows them (a deep soak never starts afresh)."""

PROMPTS_KEPT = 256
"""Prompts remembered since the last fresh start; past this they are forgotten and written
again when next used (a deep soak's prompts never repeat and grow long)."""


def _record(kind: bytes, body: bytes) -> bytes:
    return _HEAD.pack(kind, len(body)) + body


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._map: mmap.mmap | None = None
        self._end = 0
        self._map_size(MAPPED)
        self._prompts: dict[int | tuple[int, ...], int] = {}
        self._encoded: dict[int | tuple[int, ...], tuple[bytes, bytes]] = {}
        """Prompts' record kinds and bodies without their number, kept across fresh starts: a
        soak flushes every few dozen steps and its prompts repeat."""
        self._int_heads: dict[tuple[str, str], bytes] = {}

    def _map_size(self, size: int) -> None:
        try:  # blocks reserved now: a full disk fails here, not as SIGBUS at a later store
            os.posix_fallocate(self._fd, 0, size)
        except OSError:
            os.ftruncate(self._fd, size)
        if self._map is not None:
            self._map.close()
        self._map = mmap.mmap(self._fd, size)

    def _write(self, records: bytes) -> None:
        """Store ``records`` after the last one, the zero kind after them, the first header
        last: until it is stored, the journal ends where it ended before."""
        start, end = self._end, self._end + len(records)
        if end + _HEAD.size > len(self._map):
            self._map_size(2 * (end + _HEAD.size))
        self._map[start + _HEAD.size:end + _HEAD.size] = records[_HEAD.size:] + _END
        self._map[start:start + _HEAD.size] = records[:_HEAD.size]
        self._end = end

    def fresh(self, origin: dict) -> None:
        """Lanes start from empty here: what came before is no longer read."""
        self._prompts.clear()
        self._end = 0
        self._map[:_HEAD.size] = _END
        self._write(_record(ORIGIN, _DUMPS(origin).encode()))

    def step(self, op: str, args: dict, prompt: int | None = None) -> None:
        """Write one step. ``prompt``: a number the caller gives ``args["tokens"]``, the same
        for equal prompts and never given to another one in this process, so that the
        journal knows a prompt again without hashing its tokens; by default the tokens are
        their own name."""
        tokens = args.get("tokens")
        if tokens is None:
            name, value = next(iter(args.items()), ("", 0))
            if len(args) > 1 or type(value) is not int or not -2**63 <= value < 2**63:
                self._write(_record(STEP_JSON, _DUMPS({"op": op, "args": args}).encode()))
                return
            head = self._int_heads.get((op, name))
            if head is None:
                body = f"{op} {name} ".encode()
                head = self._int_heads[op, name] = _HEAD.pack(STEP_INT, len(body) + _INT.size) \
                    + body
            self._write(head + _INT.pack(value))
            return
        key = tuple(tokens) if prompt is None else prompt
        number = self._prompts.get(key)
        record = b""
        if number is None:
            if len(self._prompts) >= PROMPTS_KEPT:
                self._prompts.clear()
            number = self._prompts[key] = len(self._prompts)
            encoded = self._encoded.get(key)
            if encoded is None:
                if len(self._encoded) >= PROMPTS_KEPT:
                    self._encoded.clear()
                encoded = self._encoded[key] = _encode(tokens)
            kind, body = encoded
            record = _record(kind, _PROMPT_STEP.pack(number) + body)
        self._write(record + _record(STEP_PROMPT, _PROMPT_STEP.pack(number) + op.encode()))

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def _encode(tokens: list[int]) -> tuple[bytes, bytes]:
    """A prompt's record kind, and its body after the number."""
    try:
        return PROMPT, array("q", tokens).tobytes()
    except OverflowError:
        return PROMPT_JSON, _DUMPS(tokens).encode()


def read(path: str | os.PathLike) -> tuple[dict | None, list[dict]]:
    """The last origin written and the steps after it, up to the zero kind that ends them
    (or a torn record: a journal written some other way, or damaged)."""
    origin, steps, prompts = None, [], {}
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, []
    at = 0
    while at + _HEAD.size <= len(data):
        kind, length = _HEAD.unpack_from(data, at)
        body = data[at + _HEAD.size:at + _HEAD.size + length]
        if kind == _END[:1] or len(body) < length:  # the end, or a torn record
            break
        at += _HEAD.size + length
        try:
            origin, steps, prompts = _apply(kind, body, origin, steps, prompts)
        except (ValueError, KeyError, struct.error):  # damaged: what came before stands
            break
    return origin, steps


def _apply(kind: bytes, body: bytes, origin, steps: list, prompts: dict):
    """One record read: the origin, steps and prompts after it (ValueError: not a record)."""
    if kind == ORIGIN:
        return json.loads(body), [], {}
    if kind in (PROMPT, PROMPT_JSON):
        (number,) = _PROMPT_STEP.unpack_from(body)
        rest = body[_PROMPT_STEP.size:]
        prompts[number] = array("q", rest).tolist() if kind == PROMPT else json.loads(rest)
    elif kind == STEP_PROMPT:
        (number,) = _PROMPT_STEP.unpack_from(body)
        steps.append({"op": body[_PROMPT_STEP.size:].decode(),
                      "args": {"tokens": prompts[number]}})
    elif kind == STEP_INT:
        op, name, _ = body[:-_INT.size].decode().split(" ")
        (value,) = _INT.unpack(body[-_INT.size:])
        steps.append({"op": op, "args": {name: value} if name else {}})
    elif kind == STEP_JSON:
        steps.append(json.loads(body))
    else:
        raise ValueError(f"unknown record kind {kind}")
    return origin, steps, prompts


JOURNAL: Journal | None = None
"""The open journal of this process, or None (not supervised: nothing to survive a crash)."""
