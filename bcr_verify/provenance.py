"""What a report or a trace was made with, so a result can be traced back and re-run."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tool_versions() -> dict:
    """bcr_verify's, Python's and Hypothesis's versions, and whether the model judging
    implementations runs compiled."""
    from bcr_verify.models import COMPILED

    return {"bcr_verify": _version("bcr-verify"), "python": platform.python_version(),
            "hypothesis": _version("hypothesis"),
            "reference_model": "compiled (mypyc)" if COMPILED else "Python source"}


def provenance(implementations: list[str], **request) -> dict:
    """bcr_verify, Python, Hypothesis and each implementation's version, whether the model
    judging them ran compiled, the command line, what was asked for (``request``: budget,
    seed, ...), the CPUs it could run on (one where it was pinned) and when."""
    from bcr_verify.adapters.registry import resolve
    from bcr_verify.affinity import allowed

    versions = {}
    for name in implementations:
        try:
            versions[name] = resolve(name).version()
        except Exception as exc:  # noqa: BLE001 - provenance must never fail a run
            versions[name] = f"unknown ({type(exc).__name__})"
    return {
        **tool_versions(), "implementations": versions,
        "command": sys.argv[:], "request": request, "cpus": allowed(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
