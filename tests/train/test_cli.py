"""`python -m cheers_jax.train`: --help, and clear errors for wrong config keys and values."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.train.common import REPO


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "cheers_jax.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_help():
  proc = run_cli("--help")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout + proc.stderr
  for text in ("--config", "--workdir", "--config.train.steps=", "resumes", "--[no]export_hf"):
    assert text in out, text


def test_misspelt_override_is_a_clear_error(tmp_path):
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}", "--config.train.stepz=3")
  assert proc.returncode == 2
  assert "did you mean 'steps'" in proc.stderr and "--config.train.stepz=3" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)  # nothing started


def test_bad_values_are_clear_errors(tmp_path):
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}", "--config.train.nan_policy=maybe")
  assert proc.returncode == 2 and "nan_policy='maybe'" in proc.stderr and "Traceback" not in proc.stderr
  proc = run_cli("--config", "configs/missing.py", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "configs/missing.py" in proc.stderr and "Traceback" not in proc.stderr
  proc = run_cli("--config", "configs/tiny.py")
  assert proc.returncode != 0 and "--workdir" in proc.stderr


def test_impossible_config_values_exit_2_before_anything_starts(tmp_path):
  """Issue 13 item 5 through the CLI: one line naming the key, nothing written."""
  proc = run_cli("--config", "tiny", f"--workdir={tmp_path}", "--config.train.batch_size=0")
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and lines == [lines[-1]] and "train.batch_size=0" in lines[-1], proc.stderr
  assert not os.listdir(tmp_path)
