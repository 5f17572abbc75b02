"""The installable package: the wheel holds every asset the tools read (tokenizer, tiny parts, GPU
descriptions), so a non-editable install works away from the checkout (CI installs it: .ci/run)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "cheers_jax", "assets")


def _build_wheel(tmp_path) -> zipfile.ZipFile:
  """`pip wheel` of a copy of the sources (the build writes build/ and *.egg-info next to them)."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "requirements.txt"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(
    os.path.join(REPO, "cheers_jax"), src / "cheers_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
  )
  # Offline when the build backend is at hand (setuptools + wheel, as in a Python 3.11 venv); else pip
  # fetches it into an isolated build environment.
  offline = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
  cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)]
  subprocess.run(cmd + (["--no-build-isolation"] if offline else []), check=True, capture_output=True, text=True)
  (wheel,) = (tmp_path / "dist").glob("cheers_jax-*.whl")
  return zipfile.ZipFile(wheel)


def test_the_wheel_holds_every_asset(tmp_path):
  assets = sorted(
    os.path.relpath(os.path.join(folder, f), os.path.dirname(ASSETS)).replace(os.sep, "/")
    for folder, _, files in os.walk(ASSETS)
    for f in files
  )
  assert any(a.startswith("assets/gpu_targets/") for a in assets) and any(
    a.startswith("assets/tokenizer/") for a in assets
  )
  names = set(_build_wheel(tmp_path).namelist())
  missing = [a for a in assets if f"cheers_jax/{a}" not in names]
  assert not missing, f"package data misses {missing}: see [tool.setuptools.package-data] in pyproject.toml"
  assert "cheers_jax/train/__main__.py" in names
