"""The reference prefix cache: a plain block trie that everything else is judged against.

It speaks BCR-memory-2's public API (``BCRCache(block_size)``, ``insert``, ``match_prefix``,
``evict``, ``acquire``/``release``, ``assert_invariants``) and adds what judging SGLang's
token-granular LRU caches needs: ``block_size=1`` for token granularity, a logical clock
instead of wall time, LRU eviction by token count, and :meth:`apply_lru_eviction`, which
accepts any eviction an LRU cache may legally make and refuses the rest.

Engines that keep *duplicate physical copies* of one block (vLLM's append-only block tables:
a block computed twice is cached twice, each copy evictable on its own) are modelled with
``insert(..., keep_duplicates=True)`` and :meth:`evict_copy`: a block then holds several
values, lookups return the oldest, and a block whose last copy went while blocks below it are
still cached stays as a *hollow* node that ends every match until it is cached again (a hash
map keyed by chained hashes behaves exactly so). Such engines evict copies, radix caches whole
blocks and what lies below them; a model that has evicted a copy refuses whole-block eviction
until :meth:`~ReferenceCache.reset`.

Design rule: obviously correct beats fast. One node per block, a dict of children per node,
a dict from value to node; no path compression, no cleverness. Every public method validates
all of its input before changing anything, so a refused call leaves the model unchanged.

Where the package is built with mypy at hand, ``setup.py`` also compiles this module with
mypyc: the same code, somewhat faster, which matters because every lane's every call is
judged here. Compiled code enforces annotations, so an input the model validates itself is
annotated ``Any``: a bool or a str then gets the model's own error, compiled or not.
"""

from __future__ import annotations

from array import array
from typing import Any, Hashable, Iterable, Sequence, Union

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # only compiling this module (setup.py) needs it
    def mypyc_attr(*_, **__):  # type: ignore[misc]
        return lambda cls: cls


BlockKey = Union[bytes, tuple]
"""A block's tokens as the trie files them: their 8-byte unsigned encoding, or, for a block
holding a token of 2**64 or more, the tuple of ints itself. Bytes cache their hash, and a
lookup hashes a key at every level of every walk: a tuple of 16 ints costs ~130 ns each time.
Which form a block takes depends only on its own tokens, so equal blocks always get equal
keys."""

_TOKEN_LIMIT = 2 ** 64


def _key(tokens: list[int]) -> BlockKey:
    return array("Q", tokens).tobytes() if max(tokens) < _TOKEN_LIMIT else tuple(tokens)


class Block:
    """One cached block: ``block_size`` tokens below ``parent``, filed under their ``key``
    (:data:`BlockKey`), held in one page or more.

    ``copies`` maps each physical copy's value to its reference count, oldest copy first;
    it is empty for a hollow block (see the module docstring).

    LRU bookkeeping is on the model's logical clock. ``used`` is the last time the block was
    matched or inserted. ``maybe_used`` is the latest time a radix tree may also have
    refreshed it: a radix node refreshes its whole key before splitting off the matched part,
    so the unmatched rest of that node counts as touched there.

    A plain class rather than a dataclass: compiled, it is built in a sixth of the time, and
    the model builds one for every block it caches.
    """

    __slots__ = ("key", "copies", "parent", "children", "used", "maybe_used")

    def __init__(self, key: BlockKey, parent: Block | None, clock: int):
        self.key = key
        self.copies: dict[Hashable, int] = {}
        self.parent = parent
        self.children: dict[BlockKey, Block] = {}
        self.used = clock
        self.maybe_used = clock

    @property
    def tokens(self) -> tuple[int, ...]:
        """The block's tokens, decoded from its key (for messages and event checks)."""
        key = self.key
        return tuple(array("Q", key)) if isinstance(key, bytes) else key

    @property
    def value(self) -> Hashable:
        """The copy a lookup returns: the oldest one."""
        return next(iter(self.copies))

    @property
    def refs(self) -> int:
        return sum(self.copies.values())

    @property
    def pinned(self) -> bool:
        """Some copy is held by a running request."""
        for refs in self.copies.values():  # compiled, a loop beats any() over a view
            if refs:
                return True
        return False


RELAXATIONS = {
    "whole-node over-eviction": "freed more blocks than asked for, because a radix node "
                                "(several blocks) goes as a whole",
    "split refresh": "evicted a block used later than a kept leaf, which is legal only because "
                     "a radix node refreshes its whole key before a match splits it, so the "
                     "kept leaf (the unmatched rest) counts as used then too",
}
"""Departures from strict block-level LRU that :meth:`ReferenceCache.apply_lru_eviction`
accepts, by name."""


@mypyc_attr(allow_interpreted_subclasses=True)  # tests and users derive broken caches from it
class ReferenceCache:
    """A pure-Python prefix cache with BCR-memory-2's API. See the module docstring."""

    def __init__(self, block_size: Any = 16):  # Any: validated below, whatever it is
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size: int = block_size
        self.clock = 0
        self._root_children: dict[BlockKey, Block] = {}
        self._by_value: dict[Hashable, Block] = {}
        self._pinned = 0  # copies with a reference; protected_tokens is read on every admission
        self._copies_evicted = False  # see _whole_blocks
        self.changes: list[tuple] | None = None
        """When a list: every copy cached ``("+", block, value)`` and every copy dropped
        ``("-", block, value)``, in order, and ``("clear",)`` for a flush, for an observer
        that judges a cache's own account of its changes (its KV-cache events)."""

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        """Number of cached blocks."""
        return len(self._by_value)

    def __contains__(self, value: Hashable) -> bool:
        return value in self._by_value

    def cached_blocks(self, token_ids: Sequence[int]) -> int:
        """How many leading full blocks of ``token_ids`` are cached (a lookup that is not a
        use: no LRU stamp)."""
        return self.cached_in(self._split(token_ids, "token_ids"))

    def cached_in(self, blocks: list[BlockKey]) -> int:
        """:meth:`cached_blocks` on blocks made by :meth:`split` of a model of this block size."""
        return len(self._walk(blocks))

    @property
    def cached_tokens(self) -> int:
        return len(self._by_value) * self.block_size

    @property
    def protected_tokens(self) -> int:
        """Tokens in blocks held by at least one acquire (SGLang's ``protected_size``)."""
        return self._pinned * self.block_size

    @property
    def evictable_tokens(self) -> int:
        return self.cached_tokens - self.protected_tokens

    def holds_none(self, values: Iterable[Hashable]) -> bool:
        """No value in ``values`` is cached (one set operation, for checking allocations)."""
        return self._by_value.keys().isdisjoint(values)

    def values(self) -> list[Hashable]:
        return list(self._by_value)

    def refcount(self, value: Hashable) -> int:
        return self._block(value, "value").copies[value]

    def subtree_values(self, value: Hashable) -> list[Hashable]:
        """``value`` and every value cached below it, parents before children."""
        return [v for b in self._subtree(self._block(value, "value")) for v in b.copies]

    def evictable_values(self) -> list[Hashable]:
        """Values whose explicit eviction is allowed: nothing in their subtree is in use."""
        return [v for v, b in self._by_value.items() if not any(x.refs for x in self._subtree(b))]

    def unreferenced_values(self) -> list[Hashable]:
        """Cached copies no request holds: what an engine evicting single copies may take."""
        return [v for v, b in self._by_value.items() if not b.copies[v]]

    def lru_victims(self, num_tokens: Any) -> list[Hashable]:
        """What this model evicts for ``evict_lru(num_tokens)``, in eviction order."""
        self._check_count(num_tokens, "num_tokens")
        self._whole_blocks("LRU eviction")
        children_left = {b: len(b.children) for b in self._by_value.values()}  # by identity
        leaves = list(dict.fromkeys(b for b in self._by_value.values()
                                    if not b.children and b.refs == 0))
        victims: list[Hashable] = []
        while leaves and len(victims) * self.block_size < num_tokens:
            leaf = min(leaves, key=lambda b: (b.used, repr(b.value)))
            leaves.remove(leaf)
            victims.append(leaf.value)
            parent = leaf.parent
            if parent is not None:
                children_left[parent] -= 1
                if children_left[parent] == 0 and parent.refs == 0:
                    leaves.append(parent)
        return victims

    # ----------------------------------------------------------------- BCR-memory-2 API

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[int, list[Hashable]]:
        """Longest cached prefix of ``token_ids`` in whole blocks: ``(matched_len, values)``.

        A match counts as a use for LRU: the matched blocks are stamped with the clock.
        """
        return self.match_blocks(self._split(token_ids, "token_ids"))

    def split(self, token_ids: Sequence[int]) -> list[BlockKey]:
        """``token_ids`` validated and cut into the keys of its full blocks
        (:data:`BlockKey`), for :meth:`match_blocks` and :meth:`insert_blocks`. Validating
        and cutting a long prompt costs more than walking the trie with it, and every lane's
        model of one lockstep step sees the same prompt, so the cut is made once and shared."""
        return self._split(token_ids, "token_ids")

    def match_blocks(self, blocks: list[BlockKey]) -> tuple[int, list[Hashable]]:
        """:meth:`match_prefix` on blocks made by :meth:`split` of a model of this block size."""
        path = self._walk(blocks)
        self._touch(path, len(path))
        return len(path) * self.block_size, [b.value for b in path]

    def insert(self, token_ids: Sequence[int], block_values: Sequence[Hashable],
               keep_duplicates: bool = False) -> int:
        """Cache the full blocks of ``token_ids`` with one value per full block.

        Blocks already cached keep their existing value; the caller's value for such a block is
        a duplicate that the caller still owns, or with ``keep_duplicates`` a further copy of
        the block, cached too. Returns the number of tokens that were already cached (SGLang's
        ``InsertResult.prefix_len``).
        """
        return self.insert_blocks(self._split(token_ids, "token_ids"), block_values,
                                  keep_duplicates)

    def insert_blocks(self, blocks: list[BlockKey], block_values: Sequence[Hashable],
                      keep_duplicates: bool = False) -> int:
        """:meth:`insert` on blocks made by :meth:`split` of a model of this block size; the
        values are validated as :meth:`insert` validates them."""
        values = list(block_values) if not isinstance(block_values, (str, bytes)) else None
        if values is None:
            raise TypeError("block_values must be a sequence of values, one per full block")
        if len(values) != len(blocks):
            raise ValueError(
                f"block_values has {len(values)} values but token_ids has {len(blocks)} full "
                f"blocks of {self.block_size} tokens"
            )
        path = self._walk(blocks)
        existing = len(path)
        copies = [(b, v) for b, v in zip(path, values) if v not in b.copies] \
            if keep_duplicates else []
        new_values = values[existing:] + [v for _, v in copies]
        try:
            distinct = set(new_values)
        except TypeError:
            for value in new_values:
                try:
                    hash(value)
                except TypeError:
                    raise TypeError("block_values must be hashable, got "
                                    f"{type(value).__name__}") from None
            raise
        if len(distinct) != len(new_values):
            raise ValueError("block_values repeats a value: each cached block needs its own")
        if not self._by_value.keys().isdisjoint(distinct):  # walks the smaller of the two
            taken = [v for v in new_values if v in self._by_value]
            raise ValueError(f"block_values {taken[:3]} are already cached under another prefix")

        self._touch(path, existing)
        for copied, value in copies:
            self._cache_copy(copied, value)
        parent = path[-1] if path else None
        children = self._children(parent)
        for key, value in zip(blocks[existing:], values[existing:]):
            block = children.get(key)
            if block is None:
                block = children[key] = Block(key, parent, self.clock)
            else:  # hollow: cached again
                block.used = block.maybe_used = self.clock
            self._cache_copy(block, value)
            parent, children = block, block.children
        return existing * self.block_size

    def evict(self, block_value: Hashable) -> list[Hashable]:
        """Remove ``block_value`` and everything cached below it; returns the removed values."""
        block = self._block(block_value, "block_value")
        self._whole_blocks("evict")
        doomed = self._subtree(block)
        busy = [v for b in doomed for v, refs in b.copies.items() if refs]
        if busy:
            raise ValueError(
                f"block_value {block_value!r} cannot be evicted: {busy[:3]} in its subtree are "
                "acquired; release them first"
            )
        removed = [v for b in doomed for v in b.copies]
        self._remove(doomed)
        return removed

    def evict_copy(self, value: Hashable) -> None:
        """Drop one physical copy (an engine reusing its page); blocks below stay cached,
        reachable again once their block is cached again."""
        block = self._block(value, "value")
        if block.copies[value]:
            raise ValueError(f"value {value!r} cannot be evicted: a running request holds it")
        del block.copies[value]
        del self._by_value[value]
        self._copies_evicted = True
        if self.changes is not None:
            self.changes.append(("-", block, value))
        empty: Block | None = block
        while empty is not None and not empty.copies and not empty.children:
            self._children(empty.parent).pop(empty.key)
            empty = empty.parent

    def acquire(self, values: Iterable[Hashable]) -> None:
        """Pin blocks against eviction (a running request holding its prefix)."""
        values = list(values)
        blocks = [self._block(v, "values") for v in values]
        for value, block in zip(values, blocks):
            self._pinned += not block.copies[value]
            block.copies[value] += 1

    def release(self, values: Iterable[Hashable]) -> None:
        """Undo :meth:`acquire`. Releasing more often than acquired is refused."""
        values = list(values)
        blocks = [self._block(v, "values") for v in values]
        wanted: dict[Hashable, int] = {}
        for value, block in zip(values, blocks):
            wanted[value] = wanted.get(value, 0) + 1
            if wanted[value] > block.copies[value]:
                raise ValueError(
                    f"values: {value!r} is released more often than it was acquired"
                )
        for value, block in zip(values, blocks):
            block.copies[value] -= 1
            self._pinned -= not block.copies[value]

    def reset(self) -> None:
        """Drop everything, in-use blocks included (SGLang's ``flush_cache``)."""
        self._root_children.clear()
        self._by_value.clear()
        self._pinned = 0
        self._copies_evicted = False
        if self.changes is not None:
            self.changes.append(("clear",))

    # ----------------------------------------------------------------- LRU caches

    def evict_lru(self, num_tokens: Any) -> list[Hashable]:
        """Evict least-recently-used unpinned leaves until ``num_tokens`` tokens are freed."""
        victims = self.lru_victims(num_tokens)
        for value in victims:
            if value in self._by_value:
                self._remove([self._by_value[value]])
        return victims

    def apply_lru_eviction(self, freed: Sequence[Hashable], num_tokens: Any) -> list[str]:
        """Accept an LRU cache's own eviction choice if it is legal, then apply it.

        Legal means: only cached, unpinned blocks, whole subtrees (a block never outlives its
        parent), at least ``num_tokens`` freed unless everything evictable went, and LRU order:
        no freed block was used later than a leaf that could have been evicted instead and
        stayed. Raises ``ValueError`` with what was wrong, and then changes nothing.

        Two relaxations of strict block-level LRU are accepted, because radix trees make them
        by design; each one this choice needed is returned by name (:data:`RELAXATIONS`), so
        a caller can count them, or refuse them (``--strict-lru``).
        """
        self._check_count(num_tokens, "num_tokens")
        self._whole_blocks("apply_lru_eviction")
        freed = list(freed)
        if len(set(freed)) != len(freed):
            raise ValueError("freed the same block twice")
        unknown = [v for v in freed if v not in self._by_value]
        if unknown:
            raise ValueError(f"freed {unknown[:3]}, which this cache does not hold")
        blocks = [self._by_value[v] for v in freed]
        gone = set(blocks)  # blocks hash by identity
        pinned = [b.value for b in blocks if b.pinned]
        if pinned:
            raise ValueError(f"evicted {pinned[:3]}, which a running request holds")
        orphans = [c.value for b in blocks for c in b.children.values() if c not in gone]
        if orphans:
            raise ValueError(f"evicted a block but kept {orphans[:3]} below it")
        freed_tokens = len(freed) * self.block_size
        if freed_tokens < min(num_tokens, self.evictable_tokens):
            raise ValueError(
                f"asked to free {num_tokens} tokens, freed {freed_tokens} while "
                f"{self.evictable_tokens} were evictable"
            )
        oldest: Block | None = None  # of the kept leaves that could have gone instead
        least_used = -1
        for b in self._by_value.values():
            if b.children or b in gone or b.pinned:
                continue
            if oldest is None or b.maybe_used < oldest.maybe_used:
                oldest = b
            if least_used < 0 or b.used < least_used:
                least_used = b.used
        relaxed = []
        if blocks and oldest is not None:
            newest = blocks[0]
            for b in blocks:  # compiled, a loop beats max() with a key function
                if b.used > newest.used:
                    newest = b
            if newest.used > oldest.maybe_used:
                raise ValueError(
                    f"not LRU: evicted {newest.value!r} (last used at t={newest.used}) but kept "
                    f"leaf {oldest.value!r} (last used at t={oldest.maybe_used})"
                )
            if newest.used > least_used:
                relaxed.append("split refresh")
        needed = -(-min(num_tokens, self.evictable_tokens) // self.block_size)
        if len(blocks) > needed:
            relaxed.append("whole-node over-eviction")
        self._remove(blocks)
        return relaxed

    # ----------------------------------------------------------------- self-check

    def assert_invariants(self) -> None:
        """Check the trie's own consistency; raises ``AssertionError`` naming what broke."""
        seen: dict[int, Block] = {}
        stack: list[tuple[Block | None, BlockKey, Block]] = [
            (None, key, b) for key, b in self._root_children.items()]
        bs, clock, by_value = self.block_size, self.clock, self._by_value

        def name(block):  # only when an assertion fails: it costs more than the checks
            return f"block {list(block.copies)[:2]} at {block.tokens}"

        while stack:
            parent, key, block = stack.pop()
            assert id(block) not in seen, f"{name(block)} reachable twice"
            seen[id(block)] = block
            assert block.parent is parent, f"{name(block)} has a wrong parent link"
            assert key == block.key, f"{name(block)} is filed under a wrong key"
            assert len(key) == 8 * bs if isinstance(key, bytes) else (
                len(key) == bs and max(key) >= _TOKEN_LIMIT), f"{name(block)}: malformed key"
            assert block.copies or block.children, f"{name(block)} is hollow with nothing below it"
            for value, refs in block.copies.items():
                assert refs >= 0, f"{name(block)}: {value!r} has refcount {refs}"
                assert by_value.get(value) is block, f"value {value!r} not indexed"
            assert block.used <= block.maybe_used <= clock, f"{name(block)} clock"
            if parent is not None:
                assert block.used <= parent.maybe_used, "a block was used but its parent was not"
            stack.extend((block, k, c) for k, c in block.children.items())
        assert sum(len(b.copies) for b in seen.values()) == len(self._by_value), \
            "value index holds blocks not in the trie"
        assert self._pinned == sum(1 for v, b in self._by_value.items() if b.copies[v]), \
            "pinned-copy count drifted from the copies' reference counts"

    # ----------------------------------------------------------------- internals

    def _split(self, token_ids: Sequence[int], name: str) -> list[BlockKey]:
        if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
            raise TypeError(f"{name} must be a sequence of ints, got {type(token_ids).__name__}")
        tokens = token_ids if type(token_ids) is list else list(token_ids)
        if not self.plain_ints(tokens):
            self._reject_tokens(tokens, name)
        bs = self.block_size
        n = len(tokens) // bs * bs
        try:
            raw = array("Q", tokens).tobytes()
        except OverflowError:  # a token below 0, or one of 2**64 or more
            if min(tokens) < 0:
                self._reject_tokens(tokens, name)
            return [_key(tokens[i:i + bs]) for i in range(0, n, bs)]
        width = 8 * bs
        return [raw[i:i + width] for i in range(0, 8 * n, width)]

    @staticmethod
    def plain_ints(tokens: list) -> bool:
        """Every token is exactly an ``int``. A cut remembered for a prompt is found by
        equality, and ``[True]`` equals ``[1]`` but is refused, so a reuse must ask this.
        Compiled, the loop costs a tenth of ``set(map(type, tokens))``."""
        for token in tokens:
            if type(token) is not int:
                return False
        return True

    @staticmethod
    def _reject_tokens(tokens: list, name: str) -> None:
        """Name the first token that is not an int >= 0 (an int subclass is judged here)."""
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"{name}[{i}] must be an int, got {type(t).__name__}")
            if t < 0:
                raise ValueError(f"{name}[{i}] must be >= 0, got {t}")

    def _whole_blocks(self, method: str) -> None:
        """Refuse a whole-block eviction after :meth:`evict_copy`. The two are two engines'
        ways (a radix cache evicts blocks and what lies below them, an engine with duplicate
        copies evicts one copy at a time) and their mix is left undefined: a block hollowed
        by ``evict_copy`` is neither cached nor gone."""
        if self._copies_evicted:
            raise ValueError(f"{method}: this model has evicted single copies (evict_copy); "
                             "it evicts whole blocks only from empty or after reset()")

    @staticmethod
    def _check_count(n: Any, name: str) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name} must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")

    def _children(self, block: Block | None) -> dict[BlockKey, Block]:
        return self._root_children if block is None else block.children

    def _walk(self, blocks: list[BlockKey]) -> list[Block]:
        path: list[Block] = []
        children = self._root_children
        for key in blocks:
            block = children.get(key)
            if block is None or not block.copies:
                break
            path.append(block)
            children = block.children
        return path

    def _touch(self, path: list[Block], existing: int) -> None:
        """Stamp ``path`` with a new clock tick; ``existing`` is how much of it was cached."""
        self.clock += 1
        for block in path:
            block.used = block.maybe_used = self.clock
        if not existing:
            return
        # A radix tree may have ended this walk inside a node, whose unmatched rest is the
        # single-child chain below the last cached block: it counts as maybe touched.
        children = path[existing - 1].children
        while len(children) == 1:
            (block,) = children.values()
            block.maybe_used = self.clock
            children = block.children

    def _cache_copy(self, block: Block, value: Hashable) -> None:
        block.copies[value] = 0
        self._by_value[value] = block
        if self.changes is not None:
            self.changes.append(("+", block, value))

    def _block(self, value: Hashable, name: str) -> Block:
        try:
            return self._by_value[value]
        except KeyError:
            raise ValueError(f"{name}: {value!r} is not cached") from None
        except TypeError:
            raise TypeError(f"{name} must hold hashable values, got {type(value).__name__}") from None

    def _subtree(self, block: Block) -> list[Block]:
        out, stack = [], [block]
        while stack:
            b = stack.pop()
            out.append(b)
            stack.extend(b.children.values())
        return out

    def _remove(self, blocks: list[Block]) -> None:
        for block in blocks:
            self._children(block.parent).pop(block.key, None)
            for value, refs in block.copies.items():
                del self._by_value[value]
                self._pinned -= bool(refs)
                if self.changes is not None:
                    self.changes.append(("-", block, value))


BCRCache = ReferenceCache
"""BCR-memory-2's class name, so code written against ``bcr_cache`` runs on the model."""
