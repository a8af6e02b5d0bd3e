"""Deliberately broken caches, one per invariant family, each usable as ``module:attr``.

Each is SGLang's real ``RadixCache`` with one method changed the way real bugs changed it, or a
reference-model variant with one wrong answer. The tests assert which check catches each.
"""

from bcr_verify.models import ReferenceCache
from bcr_verify.mutants.radix import radix_mutant, split_shares_storage


class OffByOneMatch(ReferenceCache):
    """Returns the neighbouring page for the last matched block: a wrong slot, tree intact."""

    def match_prefix(self, token_ids):
        length, values = super().match_prefix(token_ids)
        if len(values) >= 2:
            values = values[:-1] + [values[-1] + 1]
        return length, values


def off_by_one_match(block_size):
    return OffByOneMatch(block_size)


def _radix(patch):
    """An ``sglang-radix`` adapter factory whose cache has ``patch(cache, adapter)`` applied."""
    return radix_mutant(patch, capacity_pages=64, prefix="broken")


def _after(cache, method, hook):
    original = getattr(cache, method)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        hook(cache, result, *args)
        return result
    setattr(cache, method, wrapped)


def _first_child(cache):
    return next(iter(cache.root_node.children.values()), None)


def wrong_parent(cache, adapter):
    def hook(cache, result, params):
        child = _first_child(cache)
        if child is not None and child.children:
            next(iter(child.children.values())).parent = cache.root_node
    _after(cache, "insert", hook)


def wrong_child_key(cache, adapter):
    def hook(cache, result, params):
        root = cache.root_node
        if len(root.children) >= 2:
            (k1, n1), (k2, n2) = list(root.children.items())[:2]
            root.children[k1], root.children[k2] = n2, n1
    _after(cache, "insert", hook)


def short_value(cache, adapter):
    def hook(cache, result, params):
        child = _first_child(cache)
        if child is not None and len(child.value) > 1:
            child.value = child.value[:-1].clone()
    _after(cache, "insert", hook)


def empty_node(cache, adapter):
    def hook(cache, result, params):
        from sglang.srt.mem_cache.radix_cache import TreeNode
        child = _first_child(cache)
        if child is not None:
            empty = TreeNode()
            empty.parent, empty.key, empty.value = child, child.key[:0], child.value[:0].clone()
            child.children[("empty",)] = empty
    _after(cache, "insert", hook)


def double_unlock(cache, adapter):
    original = cache.dec_lock_ref

    def dec_lock_ref(node, *args):
        original(node, *args)
        return original(node, *args)
    cache.dec_lock_ref = dec_lock_ref


def size_drift(cache, adapter):
    def hook(cache, result, params):
        if result.prefix_len < len(params.key):
            cache.evictable_size_ += 1
    _after(cache, "insert", hook)


def stale_after_evict(cache, adapter):
    """Frees evicted slots but keeps the nodes: cached indices end up in the free list."""
    def evict(params):
        if cache.evictable_leaves:
            oldest = min(cache.evictable_leaves, key=lambda n: n.last_access_time)
            cache.token_to_kv_pool_allocator.free_segment(oldest.value, start_pos=0)
    cache.evict = evict


def leak_on_flush(cache, adapter):
    """Flushing forgets the tree but never returns its slots to the allocator."""
    adapter.allocator.real.clear = lambda: None


broken_parent = _radix(wrong_parent)
broken_child_key = _radix(wrong_child_key)
broken_value_length = _radix(short_value)
broken_empty_node = _radix(empty_node)
broken_lock_count = _radix(double_unlock)
broken_sizes = _radix(size_drift)
broken_free_list = _radix(stale_after_evict)
broken_storage = _radix(split_shares_storage)
broken_conservation = _radix(leak_on_flush)
