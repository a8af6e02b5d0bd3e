"""An external invariant walker for SGLang's classic ``RadixCache``, which has no self-check.

It reads the tree as SGLang left it and checks what the rest of SGLang silently assumes:
links, child keys, key/value lengths, no empty nodes, lock counts, the size counters against
the walked tree, the evictable-leaf set, KV indices distinct and not free, and each node's
value owning its own storage. (Pool conservation is checked by the machine for every lane.)
On every release: how a child is filed comes from the release's translations, and what a
release cannot express (page alignment before 0.4.4, the evictable-leaf set before 0.5.9) is
listed by :meth:`~bcr_verify.adapters.sglang_api.Translations.not_checked`, not checked here.
"""

from __future__ import annotations

from bcr_verify.errors import InvariantViolation


def walk_radix_cache(impl: str, cache, free_pages: set[int], api) -> None:
    """Raise :class:`InvariantViolation` for the first broken invariant of ``cache``."""

    def fail(invariant: str, detail: str):
        raise InvariantViolation(impl, invariant, detail)

    page_size = getattr(cache, "page_size", 1)
    root = cache.root_node
    total = protected = 0
    seen_pages: dict[int, int] = {}
    storages: dict[int, int] = {}
    leaves = set()
    stack = [root]
    while stack:
        node = stack.pop()
        for key, child in node.children.items():
            stack.append(child)
            if child.parent is not node:
                fail("parent link", f"node {child.id} is a child of {node.id} but points to "
                     f"{getattr(child.parent, 'id', None)}")
            if child.value is None:
                continue  # evicted to host: not on the device
            n = len(child.key)
            if n == 0:
                fail("no empty nodes", f"node {child.id} has an empty key")
            filed_as = api.child_key(cache, child.key)
            if key != filed_as:
                fail("child key", f"node {child.id} is filed under {key!r}, its key starts "
                     f"{filed_as!r}")
            if len(child.value) != n:
                fail("key/value length", f"node {child.id}: key {n} tokens, value {len(child.value)}")
            if n % page_size:
                fail("page alignment", f"node {child.id} holds {n} tokens, page size {page_size}")
            if child.lock_ref < 0:
                fail("lock count", f"node {child.id} has lock_ref {child.lock_ref}")
            if node is not root and child.lock_ref > node.lock_ref:
                fail("lock hierarchy", f"node {child.id} lock_ref {child.lock_ref} > parent "
                     f"{node.id} lock_ref {node.lock_ref}")
            storage = child.value.untyped_storage().data_ptr()
            if storage in storages:
                fail("value owns storage", f"nodes {storages[storage]} and {child.id} share one "
                     "value storage (a view, not a copy)")
            storages[storage] = child.id
            indices = child.value.tolist()
            for index in indices:
                if index < 0:
                    fail("kv index", f"node {child.id} holds KV index {index}")
            for page in {i // page_size for i in indices}:
                if page in seen_pages:
                    fail("kv indices distinct", f"page {page} is cached by nodes "
                         f"{seen_pages[page]} and {child.id}")
                if page in free_pages:
                    fail("kv not free", f"page {page} of node {child.id} is in the allocator's "
                         "free list")
                seen_pages[page] = child.id
            total += n
            protected += n if child.lock_ref > 0 else 0
            if child.lock_ref == 0 and not any(c.value is not None for c in child.children.values()):
                leaves.add(child)
    if cache.protected_size() != protected:
        fail("protected size", f"counter {cache.protected_size()}, locked nodes hold {protected}")
    if cache.evictable_size() + cache.protected_size() != total:
        fail("evictable + protected = total",
             f"{cache.evictable_size()} + {cache.protected_size()} != walked {total}")
    if api.t.evictable_leaves and set(cache.evictable_leaves) != leaves:
        extra = [n.id for n in set(cache.evictable_leaves) - leaves][:5]
        missing = [n.id for n in leaves - set(cache.evictable_leaves)][:5]
        fail("evictable leaves", f"set has non-leaves or locked {extra}, lacks leaves {missing}")
