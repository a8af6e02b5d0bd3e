"""Compiles the reference model with mypyc where mypy is importable at build time.

The model is the harness's own largest cost in a soak (it judges every lane's every call);
compiled, a soak's harness overhead fell by about a sixth (docs/benchmarks.md §4.1). It stays
a plain Python module: without mypy or a C compiler the package installs as pure Python and
behaves the same, only slower (``bcr_verify.models`` says which one runs, and falls back to
the source when it is newer than its build). Everything else is in ``pyproject.toml``.
"""

from setuptools import setup

try:
    from mypyc.build import mypycify
except ImportError:
    ext_modules = []
else:
    ext_modules = mypycify(["bcr_verify/models/reference.py"], opt_level="3")
    for extension in ext_modules:
        extension.optional = True  # no C compiler: install the pure-Python module

setup(ext_modules=ext_modules)
