"""Models that implementations are judged against.

:mod:`~bcr_verify.models.reference` may be compiled (``setup.py``). Its source is loaded
instead when ``BCR_VERIFY_SOURCE_MODEL=1`` is set, or when the source is newer than the
compiled build: an edited model is never judged by the build of its previous version.
"""

import importlib.util
import os
import sys
import warnings
from importlib.machinery import EXTENSION_SUFFIXES


def _load_reference():
    name = "bcr_verify.models.reference"
    spec = importlib.util.find_spec(name)
    source = os.path.join(os.path.dirname(__file__), "reference.py")
    if spec.origin.endswith(tuple(EXTENSION_SUFFIXES)):
        stale = os.path.getmtime(source) > os.path.getmtime(spec.origin) + 1
        if stale:
            warnings.warn(f"{source} is newer than its compiled build {spec.origin}: judging "
                          "with the source (slower); rebuild with `make setup` or "
                          "`pip install --no-build-isolation -e .`", stacklevel=3)
        if stale or os.environ.get("BCR_VERIFY_SOURCE_MODEL") == "1":
            spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


COMPILED = _load_reference().__file__.endswith(tuple(EXTENSION_SUFFIXES))
"""Whether the reference model runs compiled (see :mod:`~bcr_verify.models.reference`)."""

from bcr_verify.models.free_queue import FreeQueue  # noqa: E402
from bcr_verify.models.reference import BCRCache, ReferenceCache  # noqa: E402

__all__ = ["BCRCache", "COMPILED", "FreeQueue", "ReferenceCache"]
