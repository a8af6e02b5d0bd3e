"""Mutants of SGLang's ``RadixCache``: each is the real cache with one method changed the way a
shipped bug changed it. Every factory takes a CacheSpec (``module:attr`` usable as --impl).
"""

from __future__ import annotations

from bcr_verify.adapters.base import CacheSpec


def radix_mutant(patch, capacity_pages: int | None = None, prefix: str = "mutant"):
    """A factory for an ``sglang-radix`` adapter whose cache has ``patch(cache, adapter)``.

    The pool is the run's own (the :class:`~bcr_verify.adapters.CacheSpec`) unless
    ``capacity_pages`` is given.
    """
    def factory(spec: CacheSpec):
        from bcr_verify.adapters.sglang import SGLangAdapter

        class Mutant(SGLangAdapter):
            def _build(self):
                cache = super()._build()
                patch(cache, self)
                return cache

        adapter = Mutant("radix", spec.block_size, capacity_pages or spec.capacity_pages,
                         spec.events)
        adapter.name = f"{prefix}-{patch.__name__.replace('_', '-')}"
        return adapter
    factory.__doc__ = patch.__doc__
    return factory


def lock_parent_only(cache, adapter):
    """inc/dec_lock_ref start at the matched node's *parent*: the node a request actually
    matched is never protected (the lock walked from the parent)."""
    inc, dec = cache.inc_lock_ref, cache.dec_lock_ref

    def inc_lock_ref(node):
        return inc(node.parent if node is not cache.root_node and node.parent else node)

    def dec_lock_ref(node, *args):
        return dec(node.parent if node is not cache.root_node and node.parent else node, *args)
    cache.inc_lock_ref, cache.dec_lock_ref = inc_lock_ref, dec_lock_ref


def unlock_skips_leaf(cache, adapter):
    """dec_lock_ref starts one node up, so the deepest locked node keeps its reference for
    ever: reference counts never return to zero (unbalanced lock/unlock)."""
    dec = cache.dec_lock_ref

    def dec_lock_ref(node, *args):
        if node is not cache.root_node and node.parent is not None:
            node = node.parent
        return dec(node, *args)
    cache.dec_lock_ref = dec_lock_ref


def aliased_value(cache, adapter):
    """insert keeps a *view* of the caller's value tensor for the new node instead of a copy:
    when the scheduler reuses its page-table row, the cached indices change under the tree."""
    insert = cache.insert

    def patched(params):
        result = insert(params)
        node, value = result.last_device_node, params.value
        if node is not None and node is not cache.root_node and node.value is not None:
            n = len(node.value)
            end = len(params.key) // cache.page_size * cache.page_size
            if n and end >= n and value is not None and len(value) >= end \
                    and bool((value[end - n:end] == node.value).all()):
                node.value = value[end - n:end]  # a view into the caller's row
        return result
    cache.insert = patched


def split_shares_storage(cache, adapter):
    """After a node split both halves keep views of one storage (no ``.clone()``), so the
    tree's accounting of what evicting one half frees is wrong."""
    def split(key, child, split_len):
        from sglang.srt.mem_cache.radix_cache import TreeNode
        new = TreeNode(priority=child.priority)
        new.children = {key[split_len:].child_key(cache.page_size): child}
        new.parent, new.lock_ref = child.parent, child.lock_ref
        new.last_access_time = child.last_access_time
        new.key, new.value = child.key[:split_len], child.value[:split_len]
        child.parent, child.key, child.value = new, child.key[split_len:], child.value[split_len:]
        new.parent.children[key.child_key(cache.page_size)] = new
        return new
    cache._split_node = split


def size_drift_on_delete(cache, adapter):
    """_delete_leaf subtracts the key length in pages instead of tokens, so evictable_size
    drifts away from the tree (a size counter out of step with the nodes)."""
    def delete_leaf(node):
        key = node.key.child_key(cache.page_size)
        node.parent.children.pop(key, None)
        cache.evictable_size_ -= max(1, len(node.key) // cache.page_size)
        if node in cache.evictable_leaves:
            cache.evictable_leaves.remove(node)
        cache._update_leaf_status(node.parent)
    cache._delete_leaf = delete_leaf


def evict_in_pages(cache, adapter):
    """evict() is asked for tokens but the caller's count is treated as pages of the wrong
    unit: it frees ``num_tokens // page_size`` tokens (page-size unit confusion)."""
    evict = cache.evict

    def patched(params):
        params.num_tokens = max(1, params.num_tokens // cache.page_size)
        return evict(params)
    cache.evict = patched


def lru_stale_after_split(cache, adapter):
    """On a split the timestamps go to the wrong halves: the new upper node is stamped with
    the access time, but the lower half (the original node object) has its last_access_time
    reset to the node's creation time, losing every use since. LRU order is then wrong."""
    split = cache._split_node

    def patched(key, child, split_len):
        new = split(key, child, split_len)
        child.last_access_time = child.creation_time
        return new
    cache._split_node = patched


lock_parent = radix_mutant(lock_parent_only)
unbalanced_unlock = radix_mutant(unlock_skips_leaf)
aliased_indices = radix_mutant(aliased_value)
split_storage = radix_mutant(split_shares_storage)
size_drift = radix_mutant(size_drift_on_delete)
page_units = radix_mutant(evict_in_pages)
lru_after_split = radix_mutant(lru_stale_after_split)
