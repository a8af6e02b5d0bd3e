"""Mutants of vLLM's automatic prefix caching: the real ``KVCacheManager`` and ``BlockPool``
(:class:`~bcr_verify.adapters.vllm.VLLMAdapter`) with one method replaced by a variant that
carries a bug of a class real block-hash caches shipped. Every factory takes a CacheSpec
(``module:attr`` usable as --impl).
"""

from __future__ import annotations

from bcr_verify.adapters.base import CacheSpec


def vllm_mutant(patch):
    def factory(spec: CacheSpec):
        from bcr_verify.adapters.vllm import VLLMAdapter

        adapter = VLLMAdapter(spec.block_size, spec.capacity_pages, spec.events)
        adapter.name = f"mutant-vllm-{patch.__name__.replace('_', '-')}"
        patch(adapter)
        return adapter
    factory.__doc__ = patch.__doc__
    return factory


def hit_not_counted(adapter) -> None:
    """A hit on a block another request holds does not take a reference: when that request
    ends, the block is freed (and reusable) while this one still reads it."""
    pool = adapter.pool

    def touch(blocks):
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                pool.free_block_queue.remove(block)
                block.ref_cnt += 1
    pool.touch = touch


def content_only_hash(adapter) -> None:
    """Block hashes of the tokens alone, not chained to the parent's: the same tokens under
    another prefix, or at another position, hit the wrong block."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import hash_block_tokens

    block_size = adapter.contract.block_size

    def hasher(request):
        start, hashes = len(request.block_hashes) * block_size, []
        while start + block_size <= request.num_tokens:
            tokens = request.all_token_ids[start:start + block_size]
            hashes.append(hash_block_tokens(sha256, None, tokens))
            start += block_size
        return hashes
    adapter._hasher = hasher


def head_first_reuse(adapter) -> None:
    """A request's blocks enter the free queue head first, so a chain's shared prefix is
    evicted before its own tail."""
    free_blocks = adapter.pool.free_blocks
    adapter.pool.free_blocks = lambda ordered: free_blocks(list(ordered)[::-1])


def ref_count_off_by_one(adapter) -> None:
    """A hit takes two references, and the request gives back one: the block never returns
    to the free queue."""
    pool = adapter.pool
    touch = pool.touch

    def touch_twice(blocks):
        touch(blocks)
        for block in blocks:
            block.ref_cnt += 1
    pool.touch = touch_twice


hit_unreferenced = vllm_mutant(hit_not_counted)
content_hash = vllm_mutant(content_only_hash)
wrong_reuse_order = vllm_mutant(head_first_reuse)
refcount_off_by_one = vllm_mutant(ref_count_off_by_one)
