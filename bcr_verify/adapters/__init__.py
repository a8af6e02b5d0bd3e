"""Adapters: one protocol the machine speaks, one thin translation per implementation."""

from bcr_verify.adapters.base import CacheAdapter, Contract, Inserted, Match, PagePool, Sizes
from bcr_verify.adapters.bcr_api import BCRApiAdapter
from bcr_verify.adapters.registry import (
    BUILTIN, DEFAULT, Implementation, all_implementations, from_factory, resolve,
)

__all__ = [
    "BCRApiAdapter", "BUILTIN", "CacheAdapter", "Contract", "DEFAULT", "Implementation",
    "Inserted", "Match", "PagePool", "Sizes", "all_implementations", "from_factory", "resolve",
]
