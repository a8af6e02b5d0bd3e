"""CrossHair checks the reference model's contracts (bcr_verify/models/contracts.py) within a
time budget, and finds a planted contract violation (so a pass is not vacuous). It reasons
about Python source, so the model is loaded from its source, not its compiled build."""

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CROSSHAIR = Path(sys.executable).with_name("crosshair")
BUDGET = ["--per_condition_timeout", "8", "--max_uninteresting_iterations", "40"]


def crosshair(*args, timeout=240):
    exe = str(CROSSHAIR) if CROSSHAIR.exists() else shutil.which("crosshair")
    if exe is None:
        pytest.fail("crosshair-tool is not installed (pip install crosshair-tool)")
    return subprocess.run([exe, "check", *args, *BUDGET], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout,
                          env={**os.environ, "BCR_VERIFY_SOURCE_MODEL": "1"})


def test_reference_contracts_hold():
    start = time.monotonic()
    out = crosshair("bcr_verify/models/contracts.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - start < 200


def test_crosshair_finds_a_planted_violation(tmp_path):
    (tmp_path / "planted.py").write_text(textwrap.dedent('''
        from bcr_verify.models.reference import ReferenceCache

        class Broken(ReferenceCache):
            def match_prefix(self, token_ids):
                length, values = super().match_prefix(token_ids)
                if len(values) >= 2 and values[0] == 0:
                    values = values[:-1]
                return length, values

        def match_after_insert(tokens: list[int], block_size: int) -> bool:
            """
            pre: 1 <= block_size <= 2
            pre: len(tokens) <= 4
            pre: all(0 <= t <= 2 for t in tokens)
            post: __return__
            """
            cache = Broken(block_size)
            blocks = len(tokens) // block_size
            cache.insert(tokens, list(range(blocks)))
            length, values = cache.match_prefix(tokens)
            return length == blocks * block_size and len(values) == blocks
    '''))
    out = subprocess.run([str(CROSSHAIR), "check", str(tmp_path / "planted.py"), *BUDGET],
                         capture_output=True, text=True, cwd=ROOT, timeout=240,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                              "BCR_VERIFY_SOURCE_MODEL": "1"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "false when calling match_after_insert" in out.stdout
