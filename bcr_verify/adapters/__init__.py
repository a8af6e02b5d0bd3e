"""Adapters: one protocol the machine speaks, one thin translation per implementation."""

from bcr_verify.adapters.base import (
    OPTIONS, CacheAdapter, CacheSpec, Cleared, Contract, Inserted, Match, PagePool, Removed,
    Sizes, Stored,
)
from bcr_verify.adapters.bcr_api import BCRApiAdapter
from bcr_verify.adapters.registry import (
    BUILTIN, DEFAULT, Implementation, all_implementations, from_factory, resolve,
)

__all__ = [
    "BCRApiAdapter", "BUILTIN", "CacheAdapter", "CacheSpec", "Cleared", "Contract", "DEFAULT",
    "Implementation", "Inserted", "Match", "OPTIONS", "PagePool", "Removed", "Sizes", "Stored",
    "all_implementations", "from_factory", "resolve",
]
