"""A non-editable install has every subpackage: built as a wheel, installed into a fresh
virtual environment, and run from there (the package is on no public index, so this is the
install users get from a checkout or a wheel)."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_every_subpackage_and_runs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("bcr_verify-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent.relative_to(ROOT).as_posix()
                      for p in (ROOT / "bcr_verify").rglob("__init__.py"))
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert any(n.startswith("bcr_verify/prompts/") and n.endswith(".txt") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # Dependencies come from this environment, behind the fresh install (a plain .pth path
    # does not run this environment's editable-install hook, so bcr_verify is the wheel's).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import bcr_verify, bcr_verify.mutants; print(bcr_verify.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(site) in where, where
    out = subprocess.run([str(venv / "bin" / "bcr-verify"), "mutants", "--list"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "lock-parent" in out.stdout
