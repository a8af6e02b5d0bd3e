"""Refuse a command before its work when its outputs could not be written afterwards.

A run that finds a divergence after twenty minutes and then cannot write its trace or report
has lost the finding. So every output path and every optional dependency a command asked
for is checked first, and a problem is a usage error naming the argument.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from bcr_verify.errors import UsageError

FILE_OPTIONS = {"json": "--json", "plot": "--plot", "markdown": "--markdown"}
DIR_OPTIONS = {"trace_dir": "--trace-dir"}
NEEDS = {
    "plot": ("--plot", ("matplotlib",), "pip install matplotlib"),
    "kv_replay": ("--kv-replay", ("torch", "transformers"),
                  "pip install 'bcr-verify[replay]' (torch and transformers)"),
}


def check(args) -> None:
    """Raise :class:`UsageError` for the first output or dependency of ``args`` that fails."""
    for attr, option in FILE_OPTIONS.items():
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:  # `impls --json` is a flag, not a path
            writable_file(option, Path(value))
    for attr, option in DIR_OPTIONS.items():
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            writable_dir(option, Path(value))
    for attr, (option, modules, fix) in NEEDS.items():
        if getattr(args, attr, None):
            missing = [m for m in modules if importlib.util.find_spec(m) is None]
            if missing:
                raise UsageError(f"{option} needs {', '.join(missing)}, which is not installed "
                                 f"here: {fix}")


def writable_file(option: str, path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file path")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UsageError(f"{option} {path}: the file is not writable")
        return
    _creatable(option, path.parent, f"cannot create {path.name} there")


def writable_dir(option: str, path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{option} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path}: the directory is not writable")
        return
    _creatable(option, path, "cannot create it")


def _creatable(option: str, directory: Path, what: str) -> None:
    """``directory`` exists and is writable, or could be made under a writable ancestor."""
    probe = directory.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{option}: {probe} is a file, so {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: {probe} is not writable, so {what}")
