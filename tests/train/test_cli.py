"""`python -m cheers_jax.train`: --help, and clear errors for wrong config keys and values."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from cheers_jax.train.__main__ import LOG_FORMAT, _quiet_libraries, configure_logging
from tests.train.common import REPO


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "cheers_jax.train", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_help():
  proc = run_cli("--help")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout + proc.stderr
  for text in (
    "--config",
    "--workdir",
    "--config.train.steps=",
    "resumes",
    "--export-hf",
    "--no-export-hf",
    "--no-eval",
  ):
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


def test_resuming_with_another_model_config_names_the_fields_without_noise(tmp_path):
  """Issue 13 item 6: resuming a workdir with a changed model config buried "requested shape (3, 64), stored
  (2, 64)" in ~375 lines of "Event loop is closed" tracebacks (exit 1). The stored config is now compared
  BEFORE any array is restored: exit 2, one line naming the field with both values, nothing else."""
  import jax
  import numpy as np

  from cheers_jax import config as config_lib
  from cheers_jax import sharding
  from cheers_jax.train import checkpointing as ckpt_lib
  from cheers_jax.train import state as state_lib

  config = config_lib.load("tiny")  # what `--config tiny` saved: a step-1 checkpoint (zeros suffice)
  abstract, _ = state_lib.abstract_train_state(config, sharding.make_mesh(dict(config.mesh)))
  checkpointer = ckpt_lib.Checkpointer(tmp_path)
  checkpointer.save(1, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract), None, config, force=True)
  checkpointer.close()
  proc = run_cli("--config", "tiny", f"--workdir={tmp_path}", "--config.model.text.num_layers=3")
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(errors) == 1 and "model.text.num_layers: 3 (now) vs 2 (checkpoint)" in errors[0], proc.stderr[-3000:]
  assert "Event loop" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_preempted_run_exits_75(tmp_path, monkeypatch, capsys):
  """Issue 13 item 8: a preempted run exited 0, like a finished one. SIGTERM -> checkpoint -> exit 75
  (EX_TEMPFAIL, documented in --help, README and launch/README.md; the SLURM script requeues on it)."""
  from cheers_jax.train import __main__ as train_main
  from cheers_jax.train import loop

  monkeypatch.setattr(loop, "train", lambda *a, **k: loop.TrainResult("preempted", 4))
  argv = ["--config", "tiny", f"--workdir={tmp_path}"]
  assert train_main.main(argv) == train_main.EXIT_PREEMPTED == 75
  monkeypatch.setattr(loop, "train", lambda *a, **k: loop.TrainResult("done", 6))
  assert train_main.main(argv) == 0
  assert "75" in (train_main.__doc__ or "") and "preempted" in capsys.readouterr().out


def test_flags_are_the_shared_argparse_ones(tmp_path, monkeypatch):
  """Issue 24: train parses its flags as every other tool (cli.ArgumentParser, cli.add_config_flags): the
  end-of-run switches are --no-X, the absl spellings still work, a bad flag is one line and exit 2."""
  from cheers_jax.train import __main__ as train_main
  from cheers_jax.train import loop

  seen = {}
  monkeypatch.setattr(
    loop, "train", lambda config, workdir, **k: seen.update(k, steps=config.train.steps) or loop.TrainResult("done", 1)
  )
  base = ["--config", "tiny", f"--workdir={tmp_path}", "--config.train.steps=7"]
  assert train_main.main(base + ["--no-export-hf", "--no-eval"]) == 0
  assert seen == {"export_hf": False, "evaluate": False, "samples": True, "steps": 7}
  assert train_main.main(base + ["--noexport_hf", "--nosamples"]) == 0
  assert seen["export_hf"] is False and seen["samples"] is False and seen["evaluate"] is True
  assert train_main.main(base + ["--epochs=3"]) == 2


def test_library_chatter_is_filtered_but_warnings_and_our_info_pass():
  """The clean-venv log of session 9 began with JAX's INFO 'Unable to initialize backend tpu: libtpu.so'."""

  def record(name, level, path="x.py"):
    return logging.LogRecord(name, level, path, 1, "m", None, None)

  assert not _quiet_libraries(record("jax._src.xla_bridge", logging.INFO))
  assert not _quiet_libraries(record("absl", logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
  assert _quiet_libraries(record("jax._src.xla_bridge", logging.WARNING))
  assert _quiet_libraries(record("cheers_jax.train.loop", logging.INFO))
  assert _quiet_libraries(record("absl", logging.INFO))  # CLU's metric lines


def test_one_log_format_even_after_absl_configured_the_root_logger():
  """Orbax's absl logging calls `logging.basicConfig()` at import: the train log mixed `INFO:absl:...` with ours."""
  root = logging.getLogger()
  bare = logging.StreamHandler()
  bare.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
  mine = logging.StreamHandler()
  mine.setFormatter(logging.Formatter("%(message)s"))
  level = root.level
  root.addHandler(bare)
  root.addHandler(mine)
  try:
    configure_logging()
    assert bare.formatter._fmt == LOG_FORMAT and mine.formatter._fmt == "%(message)s"
    assert _quiet_libraries in bare.filters and root.level == logging.INFO
  finally:
    root.removeHandler(bare)
    root.removeHandler(mine)
    root.setLevel(level)
