"""Inert CPU stand-ins for CUDA-only packages that some SGLang releases import at module level.

SGLang 0.4.x imports ``vllm`` and 0.5.7-0.5.9 import ``sgl_kernel`` on the way to the prefix
cache, which never calls them; neither installs on a machine without CUDA. Only when the cache
module's import fails *because one of these is missing* does :func:`import_with_standins`
put a stand-in in its place and try again. Likewise for a CPU-feature probe of torch's that
the local torch no longer has (0.4.9 asks ``torch._C._cpu._is_amx_tile_supported()`` at
import): it answers False, the answer of a CPU without the feature. A stand-in answers every attribute with an inert
placeholder (subclassable, callable, returning placeholders) and records each name asked for,
so the report can say exactly what stood in ("stand-in used for vllm: _custom_ops, ..."):
no verdict hides it. Were the cache ever to compute with a placeholder, its results would be
nonsense, and the lockstep comparison would say so.
"""

from __future__ import annotations

import importlib
import importlib.abc
import re
import importlib.machinery
import sys
import types

CUDA_ONLY = ("vllm", "sgl_kernel", "sglang_kernel", "flashinfer", "deep_gemm", "torchvision",
             "xgrammar", "tvm_ffi")
"""Packages that may stand in, and only after an import failed for want of them."""


class _InertType(type):
    def __getattr__(cls, name):  # class attributes too: ``scalar_types.uint4b8``
        if name.startswith("__"):
            raise AttributeError(name)
        return Inert()

    def __iter__(cls):
        return iter(())


class Inert(metaclass=_InertType):
    """A placeholder for any name: subclass it, call it, read from it, iterate it."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator: leave the function as it was
        return Inert()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Inert()

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False


class StandIn(types.ModuleType):
    def __init__(self, name: str, names: list[str]):
        super().__init__(name)
        self.__path__ = []  # a package: its submodules stand in too
        self.__version__ = "0.0.0"  # older than anything a feature check asks for
        self._names = names

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._names.append(f"{self.__name__}.{name}")
        placeholder = type(name, (Inert,), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str):
        self.package = package
        self.names: list[str] = []

    def find_spec(self, fullname, path, target=None):
        if fullname == self.package or fullname.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return StandIn(spec.name, self.names)

    def exec_module(self, module):
        pass


def import_with_standins(module: str) -> tuple[types.ModuleType, list[dict]]:
    """Import ``module``, standing in for CUDA-only packages its import chain lacks.

    Returns the module and, per stand-in used, ``{"package": ..., "names": [...]}``.
    """
    finders: list[_Finder] = []
    probes: list[str] = []
    while True:
        try:
            loaded = importlib.import_module(module)
            break
        except AttributeError as exc:
            probe = _missing_cpu_probe(exc)
            if probe is None or probe in probes:
                raise
            import torch
            setattr(torch._C._cpu, probe, lambda *args: False)
            probes.append(probe)
            _forget_failed(module)
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top not in CUDA_ONLY or any(f.package == top for f in finders):
                raise
            finder = _Finder(top)
            sys.meta_path.insert(0, finder)
            finders.append(finder)
            _forget_failed(module)
    used = [{"package": f.package, "names": sorted(set(f.names))} for f in finders]
    used += [{"package": "torch", "names": [f"torch._C._cpu.{p} (answers False)"]}
             for p in probes]
    return loaded, used


def _missing_cpu_probe(exc: AttributeError) -> str | None:
    """The name of a ``torch._C._cpu`` probe this torch lacks, if that is what failed."""
    match = re.fullmatch(r"module 'torch\._C\._cpu' has no attribute '(_is_\w+_supported)'",
                         str(exc))
    return match.group(1) if match else None


def _forget_failed(module: str) -> None:
    """Drop what the failed attempt left half-imported, so the retry starts clean."""
    top = module.split(".")[0]
    orphaned = top not in sys.modules  # the package itself failed: its children go too
    for name in [n for n in sys.modules if n == module or n.startswith(top + ".")]:
        if orphaned or sys.modules[name] is None or not getattr(sys.modules[name], "__spec__",
                                                                  None):
            del sys.modules[name]
