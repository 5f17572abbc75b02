"""`python -m cheers_jax.bench train`: compile time, step time, samples/s, MFU and memory of the train step."""

from __future__ import annotations

import json

import pytest

from cheers_jax import config as config_lib
from cheers_jax.bench import train as bench_train
from cheers_jax.train import synthetic
from tests.scale.common import SMALL_VOCAB, TINY, run


def test_reference_table_lines():
  """The side-by-side table with the reference's H100 figures, from rows as the sweep returns them."""
  spec = synthetic.batch_spec(config_lib.load(bench_train.FULL_SIZE_CONFIG), 8, seq_len=400)
  assert spec.sample_len == 400  # the default batch is the reference's composition
  rows = [
    {
      "batch_size": 8,
      "status": "ok",
      "step_s": 0.567,
      "samples_per_s": 14.1,
      "peak_mem_gib": 60.0,
      "tflops_per_device": 229.0,
      "device_kind": "NVIDIA H100 80GB HBM3",
    },
    {"batch_size": 4, "status": "oom", "device_kind": "NVIDIA H100 80GB HBM3"},
  ]
  text = "\n".join(bench_train.reference_lines(rows, {8: spec}))
  assert "1.134" in text and "7.06" in text and "2.00x" in text and "(oom)" in text and "not an H100" not in text


def test_bad_composition_fails_before_compiling(capsys):
  assert bench_train.main(["--config", TINY, "--seq-len", "16"]) == 2
  assert "do not fit seq_len" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_train_tiny_prints_its_figures():
  """`python -m cheers_jax.bench train --config configs/tiny.py --steps 2` (+ the 1024-token vocabulary of
  these tests) prints compile time, step time, samples/s, MFU (n/a on CPU) and memory, and a RESULT line."""
  proc = run(["-m", "cheers_jax.bench", "train", "--config", TINY, "--steps", "2", SMALL_VOCAB], timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  for text in (
    "compile s",
    "s/step",
    "samples/s",
    "MFU",
    "peak GiB",
    "FLOPs per sample",
    "4 generation + 4 understanding samples",
  ):
    assert text in out, (text, out)
  result = json.loads(out.strip().splitlines()[-1][len("RESULT ") :])
  (row,) = result["rows"]
  assert row["status"] == "ok" and row["batch_size"] == 8 and row["mfu"] is None  # CPU: no peak FLOP/s
  for key in ("compile_s", "step_s", "samples_per_s", "tokens_per_s", "peak_mem_gib"):
    assert row[key] > 0, (key, row)
  assert result["flops_per_sample"] > 0
