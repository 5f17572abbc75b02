"""The error contract of every command-line tool: a user's mistake is ONE line `error: ...` and exit
status 2, never a traceback (`--debug` shows it); output folders holding results are not overwritten."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cheers_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(module: str):
  import importlib

  return importlib.import_module(module).main


def _non_empty(path) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "result.txt"), "w") as f:
    f.write("an earlier result\n")
  return str(path)


# (tool module, argv builder from tmp_path, text the message must contain)
CASES = {
  "sweep-unknown-config": ("cheers_jax.sweep", lambda d: ["--config", "tinyy"], "did you mean 'tiny'"),
  "sweep-bad-override": (
    "cheers_jax.sweep",
    lambda d: ["--config", "tiny", "--config.train.stepz=2"],
    "did you mean 'steps'",
  ),
  "sweep-out-not-empty": (
    "cheers_jax.sweep",
    lambda d: ["--config", "tiny", "--out", _non_empty(d / "out")],
    "--overwrite",
  ),
  "aot-bad-mesh": ("cheers_jax.aot", lambda d: ["--config", "tiny", "--meshes", "model=2"], "AXIS=SIZE"),
  # issue 24: a mesh size that is no device count, named with its flag
  "aot-zero-mesh-axis": ("cheers_jax.aot", lambda d: ["--config", "tiny", "--meshes", "fsdp=0"], "--meshes 'fsdp=0'"),
  "aot-two-rest-axes": (
    "cheers_jax.aot",
    lambda d: ["--config", "tiny", "--meshes", "data=-1,fsdp=-1"],
    "at most one axis",
  ),
  "bench-train-negative-mesh": (
    "cheers_jax.bench.train",
    lambda d: ["--config", "tiny", "--mesh", "fsdp=-2"],
    "--mesh 'fsdp=-2'",
  ),
  "aot-out-exists": (
    "cheers_jax.aot",
    lambda d: ["--config", "tiny", "--out", _non_empty(d) + "/result.txt"],
    "--overwrite",
  ),
  "bench-unknown": ("cheers_jax.bench.__main__", lambda d: ["nope"], "unknown benchmark"),
  "bench-generate-bad-batch-sizes": (
    "cheers_jax.bench.generate",
    lambda d: ["--config", "tiny", "--batch-sizes", "1,x"],
    "--batch-sizes",
  ),
  "bench-train-missing-config": ("cheers_jax.bench.train", lambda d: ["--config", str(d / "none.py")], "not found"),
  "bench-generate-missing-config": (
    "cheers_jax.bench.generate",
    lambda d: ["--config", str(d / "none.py")],
    "not found",
  ),
  "generate-no-checkpoint": (
    "cheers_jax.generate",
    lambda d: ["chat", "--checkpoint", str(d), "--prompt", "hi"],
    "config.json",
  ),
  "generate-bad-argument": (
    "cheers_jax.generate",
    lambda d: ["chat", "--checkpoint", str(d), "--max-len", "x"],
    "--max-len",
  ),
  "generate-out-not-empty": (
    "cheers_jax.generate",
    lambda d: ["t2i", "--checkpoint", str(d), "a cat", "--out", _non_empty(d / "out")],
    "--overwrite",
  ),
  "parity-unknown-group": (
    "cheers_jax.parity",
    lambda d: ["--checkpoint", str(d), "--golden", _golden(d), "--groups", "nope"],
    "unknown group",
  ),
  "parity-missing-golden": (
    "cheers_jax.parity",
    lambda d: ["--checkpoint", str(d), "--golden", str(d / "none.npz")],
    "golden file not found",
  ),
  "convert-missing-checkpoint": (
    "cheers_jax.convert",
    lambda d: ["hf-to-orbax", "--hf", str(d / "none"), "--out", str(d / "o")],
    "config.json",
  ),
  "convert-truncated-shard": (
    "cheers_jax.convert",
    lambda d: ["hf-to-orbax", "--hf", _truncated_checkpoint(d), "--out", str(d / "o")],
    "safetensors",
  ),
  "convert-assemble-unknown-config": (
    "cheers_jax.convert",
    lambda d: ["assemble", "--config", "tinyy", "--out", str(d / "o")],
    "did you mean 'tiny'",
  ),
  "convert-assemble-missing-part": (
    "cheers_jax.convert",
    lambda d: ["assemble", "--llm", str(d / "none"), "--config", "tiny", "--out", str(d / "o")],
    "no such directory",
  ),
  "convert-split-out-not-empty": (
    "cheers_jax.convert",
    lambda d: ["split", "--hf", str(d), "--out", _non_empty(d / "out")],
    "--overwrite",
  ),
  "evaluate-score-unknown-dataset": (
    "cheers_jax.evaluate.__main__",
    lambda d: ["score", "--dataset", "NoSuchSet", "--predictions", str(d / "p.tsv")],
    "unknown dataset",
  ),
  "evaluate-two-model-sources": (
    "cheers_jax.evaluate.__main__",
    lambda d: [
      "understanding",
      "--checkpoint",
      str(d),
      "--orbax",
      str(d),
      "--data",
      str(d / "x.tsv"),
      "--out",
      str(d / "o"),
    ],
    "exactly one of",
  ),
  "evaluate-bad-argument": (
    "cheers_jax.evaluate.__main__",
    lambda d: [
      "understanding",
      "--checkpoint",
      str(d),
      "--data",
      str(d / "x.tsv"),
      "--out",
      str(d / "o"),
      "--batch-size",
      "x",
    ],
    "--batch-size",
  ),
  "evaluate-geneval-missing-metadata": (
    "cheers_jax.evaluate.__main__",
    lambda d: ["geneval", "--checkpoint", str(d), "--metadata", str(d / "none.jsonl"), "--out", str(d / "o")],
    "--metadata",
  ),
  "bench-evaluate-missing-config": (
    "cheers_jax.bench.evaluate",
    lambda d: ["--config", str(d / "none.py")],
    "not found",
  ),
  # issue 13: NaN / impossible numbers, where the flag or the config is parsed
  "generate-nan-cfg": (
    "cheers_jax.generate",
    lambda d: ["t2i", "--checkpoint", str(d), "a cat", "--cfg", "nan"],
    "argument --cfg",
  ),
  "evaluate-geneval-nan-shift": (
    "cheers_jax.evaluate.__main__",
    lambda d: [
      "geneval",
      "--checkpoint",
      str(d),
      "--metadata",
      str(d / "m.jsonl"),
      "--out",
      str(d / "o"),
      "--shift",
      "nan",
    ],
    "argument --shift",
  ),
  "bench-generate-nan-cfg": (
    "cheers_jax.bench.generate",
    lambda d: ["--config", "tiny", "--cfg", "nan"],
    "argument --cfg",
  ),
  "sweep-zero-steps": ("cheers_jax.sweep", lambda d: ["--config", "tiny", "--steps", "0"], "argument --steps"),
  "sweep-negative-train-steps": (
    "cheers_jax.sweep",
    lambda d: ["--config", "tiny", "--config.train.steps=-5"],
    "train.steps=-5",
  ),
  "aot-string-model-number": (
    "cheers_jax.aot",
    lambda d: ["--config", "cheers_1p5b", "--config.model.text.num_layers=many"],
    "model.text.num_layers='many'",
  ),
  "convert-bad-config-json": (
    "cheers_jax.convert",
    lambda d: ["assemble", "--config", _bad_config_json(d), "--out", str(d / "o")],
    "num_hidden_layers=-1",
  ),
  "generate-binary-prompt-file": (
    "cheers_jax.generate",
    lambda d: ["t2i", "--checkpoint", str(d), "--prompt-file", _binary_file(d), "--out", str(d / "o")],
    "not UTF-8",
  ),
  "convert-orbax-neither": (
    "cheers_jax.convert",
    lambda d: ["orbax-to-hf", "--orbax", str(d), "--out", str(d / "o")],
    "training workdir",
  ),
}


def _binary_file(d) -> str:
  (d / "prompts.txt").write_bytes(bytes(range(128, 256)))
  return str(d / "prompts.txt")


def _bad_config_json(d) -> str:
  import json
  from cheers_jax.model.config import ModelConfig

  config = ModelConfig().to_hf_dict()
  config["text_config"]["num_hidden_layers"] = -1
  (d / "config.json").write_text(json.dumps(config))
  return str(d / "config.json")


def _golden(d) -> str:
  import numpy as np

  np.savez(d / "golden.npz", a=np.zeros(1))
  return str(d / "golden.npz")


def _truncated_checkpoint(d) -> str:
  """A tiny HF checkpoint whose only shard is cut short."""
  import json

  ckpt = d / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text(json.dumps({}))
  (ckpt / "model.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": ')
  return str(ckpt)


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_and_exit_2(case, tmp_path, capsys):
  module, argv, wanted = CASES[case]
  code = _main(module)(argv(tmp_path))
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, err
  assert lines and lines[-1].startswith("error: ") and wanted in lines[-1], err
  assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
  with pytest.raises(UserError, match="did you mean 'tiny'"):
    _main("cheers_jax.sweep")(["--config", "tinyy", "--debug"])


def test_train_cli_follows_the_contract(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-m", "cheers_jax.train", "--config", "tinyy", f"--workdir={tmp_path}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and lines[-1].startswith("error: ") and "did you mean 'tiny'" in lines[-1]
  assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)
