"""NVIDIA Dynamo's KV-router index (``RadixTree`` from ``ai-dynamo-runtime``, in Rust) as a
consumer of a lane's KV events: one Dynamo worker per lane, fed exactly what the lane
published, asked the same questions as the reference router index.

Each lane gets a tree of its own: Dynamo requires every worker of one tree to give the same
token prefix the same block hash, and lanes of different engines (vLLM, SGLang) do not.
The only translation is Dynamo's own event format: engine block hashes become unsigned 64-bit
ints (vLLM and SGLang publish signed ones), and each block carries the ``tokens_hash`` Dynamo
walks by, computed with Dynamo's ``compute_block_hash_for_seq`` from the block's tokens. An
event Dynamo rejects (a store under a parent it does not know, a removal of a block it does
not hold) is counted; what it then answers is compared all the same.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

from bcr_verify.adapters.base import Cleared, Removed, Stored
from bcr_verify.event_index import Answers

os.environ.setdefault("DYN_LOG", "error")  # rejected events are counted, not logged
from dynamo._core import RadixTree, compute_block_hash_for_seq  # noqa: E402

MASK = (1 << 64) - 1


def u64(h) -> int:
    if isinstance(h, (bytes, bytearray)):
        return int.from_bytes(bytes(h)[:8], "little")
    return int(h) & MASK


class DynamoIndex:
    """``stats``: where the events Dynamo rejected (``dynamo_rejected``), the time spent inside
    its own calls (``dynamo_seconds``) and the lookups actually sent to it (``dynamo_asked``)
    are added up."""

    def __init__(self, block_size: int, worker: int, stats: Counter | None = None):
        self.tree = RadixTree()
        self.block_size = block_size
        self.worker = worker
        self.stats = Counter() if stats is None else stats
        self._event_id = 0
        self.answers = Answers()
        """Each question costs a round trip to the tree's worker thread (~50 µs, however
        short the prompt); the tree is built without expiry, so a lookup changes nothing."""

    def apply(self, event) -> None:
        self.answers.forget()
        if isinstance(event, Stored):
            tokens_hashes = compute_block_hash_for_seq(list(event.tokens), self.block_size)
            data = {"stored": {
                "parent_hash": None if event.parent is None else u64(event.parent),
                "blocks": [{"block_hash": u64(h), "tokens_hash": t}
                           for h, t in zip(event.hashes, tokens_hashes)]}}
        elif isinstance(event, Removed):
            data = {"removed": {"block_hashes": [u64(h) for h in event.hashes]}}
        elif isinstance(event, Cleared):
            data = "cleared"
        else:
            raise TypeError(f"not a KV event: {event!r}")
        self._event_id += 1
        message = json.dumps({"event_id": self._event_id, "dp_rank": 0, "data": data})
        started = time.perf_counter()
        try:
            self.tree.apply_event(self.worker, message.encode())
        except RuntimeError:
            self.stats["dynamo_rejected"] += 1
        finally:
            self.stats["dynamo_seconds"] += time.perf_counter() - started

    def held_blocks(self, tokens) -> int:
        return self.held_of(block_hashes(tokens, self.block_size))

    def held_of(self, hashes) -> int:
        """:meth:`held_blocks` of a prompt already hashed by :func:`block_hashes`."""
        known = self.answers.get(hashes)
        if known is not None:
            return known
        started = time.perf_counter()
        scores = self.tree.find_matches(hashes).scores
        self.stats["dynamo_seconds"] += time.perf_counter() - started
        self.stats["dynamo_asked"] += 1
        return self.answers.put(hashes, scores.get((self.worker, 0), 0))


def block_hashes(tokens, block_size: int) -> list[int]:
    """The prompt's blocks as Dynamo walks them: one hash per full block of tokens."""
    return compute_block_hash_for_seq(list(tokens), block_size)
