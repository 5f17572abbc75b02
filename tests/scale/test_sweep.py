"""cheers_jax.sweep: argument parsing, the synthetic batch contract, and a sweep on 8 fake CPU devices."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from cheers_jax import config as config_lib
from cheers_jax import sharding
from cheers_jax import sweep
from cheers_jax.errors import UserError
from cheers_jax.model.sequence import KIND_GEN, KIND_UND
from cheers_jax.train import synthetic
from cheers_jax.train import measure
from tests.scale.common import SMALL_VOCAB, TINY, run


def _tiny(*overrides: str):
  return config_lib.load(TINY, [SMALL_VOCAB, *overrides])


# ---- fast: parsing ------------------------------------------------------------------------------------
def test_parse_meshes_and_names():
  assert sharding.parse_meshes("data=8;fsdp=8;fsdp=4,tensor=2") == [{"data": 8}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}]
  assert sharding.mesh_name({"data": 1, "fsdp": 4, "tensor": 2}) == "fsdp=4,tensor=2"
  assert sharding.mesh_name({"data": 1, "fsdp": 1, "tensor": 1}) == "fsdp=1"
  assert sharding.mesh_overrides({"fsdp": 4, "tensor": 2}) == (
    "--config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=2"
  )
  with pytest.raises(UserError, match="AXIS=SIZE"):
    sharding.parse_meshes("model=8")


def test_config_overrides():
  c = _tiny("--config.train.lr=0.5", "--config.data.seq_buckets=32,", "--config.model.remat_policy=full")
  assert c.model.text.vocab_size == 1024 and c.train.lr == 0.5 and tuple(c.data.seq_buckets) == (32,)
  assert c.model.remat_policy == "full"
  with pytest.raises(UserError, match="did you mean 'batch_size'"):
    _tiny("--config.train.batch_sise=4")
  rest, overrides = config_lib.split_overrides(["--steps", "2", "--config.train.lr", "0.1", "--config.seed=3"])
  assert rest == ["--steps", "2"] and overrides == ["--config.train.lr=0.1", "--config.seed=3"]


# ---- fast: the synthetic batch --------------------------------------------------------------------------
def test_synthetic_batch_contract():
  """Pipeline contract: shapes/dtypes, one real image per sample in slot b*K, every image token's
  index and flat position consistent, the reference mix of generation and understanding samples."""
  spec = synthetic.batch_spec(_tiny(), 8, seq_len=40, image_slots=2)
  b = synthetic.synthetic_batch(spec)
  assert {k: (v.shape, v.dtype) for k, v in b.items() if k != "num_skipped"} == synthetic.batch_shapes(spec)
  n, s, k = spec.tokens_per_image, spec.seq_len, spec.image_slots
  assert list(b["image_kind"][::k]) == [KIND_UND, KIND_GEN] * 4 and not b["image_weight"][1::k].any()
  assert (b["valid"].sum(1) >= spec.sample_len - 1).all() and (b["valid"].sum(1) <= spec.sample_len).all()
  for m in np.flatnonzero(b["image_weight"]):
    rows, cols = np.nonzero(b["image_index"] // n == m)
    assert (rows == m // k).all() and len(cols) == n
    np.testing.assert_array_equal(b["image_positions"][m], rows * s + cols)
  assert b["token_ids"].max() < 1024 and b["targets"].max() < 1024 and (b["targets"] >= 0).any()


def test_synthetic_batch_rows_are_independent():
  """Rows built alone (a process's half, indexed locally like the pipeline) equal the global batch's."""
  spec = synthetic.batch_spec(_tiny(), 4, seq_len=40)
  full, half = synthetic.synthetic_batch(spec), synthetic.synthetic_batch(spec, range(2, 4))
  for key in ("token_ids", "targets", "valid", "pixels", "t", "image_kind"):
    np.testing.assert_array_equal(half[key], full[key][2:])
  np.testing.assert_array_equal(half["image_positions"] + 2 * spec.seq_len, full["image_positions"][2:])


def test_batch_too_long_is_a_clear_error():
  with pytest.raises(UserError, match="do not fit seq_len"):
    synthetic.batch_spec(_tiny(), 4, seq_len=40, text_len=64)


def test_report_helpers(tmp_path):
  rows = [
    {
      "mesh": "data=8",
      "remat": "none",
      "attention": "xla",
      "batch_size": 8,
      "status": "ok",
      "compile_s": 1.0,
      "step_s": 0.5,
      "samples_per_s": 16.0,
      "peak_mem_gib": 0.1,
      "mem_source": "compiled",
    },
    {
      "mesh": "fsdp=8",
      "remat": "none",
      "attention": "xla",
      "batch_size": 8,
      "status": "oom",
      "error": "[run] RESOURCE_EXHAUSTED",
    },
  ]
  assert measure.best_row(rows) is rows[0]
  measure.write_csv(rows, tmp_path / "s.csv")
  sweep.plot(rows, tmp_path / "s.png")
  assert (tmp_path / "s.png").stat().st_size > 0
  assert "RESOURCE_EXHAUSTED" in sweep.format_table(rows)


# ---- slow: the whole sweep on 8 fake devices ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.heavy
def test_sweep_on_8_fake_devices(tmp_path):
  """Two layouts x 2 steps of the tiny model (1024-token vocabulary) plus one that cannot run (batch 8 over
  16 shards is refused before compiling): CSV rows for all three, positive numbers, a PNG, a best layout."""
  out = tmp_path / "sweep"
  proc = run(
    [
      "-m",
      "cheers_jax.sweep",
      "--config",
      TINY,
      SMALL_VOCAB,
      "--meshes",
      "data=8;fsdp=4,tensor=2;data=2,fsdp=8",
      "--batch-sizes",
      "8",
      "--steps",
      "2",
      "--seq-len",
      "32",
      "--out",
      str(out),
    ],
    devices=8,
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["mesh"] for r in rows] == ["data=8", "fsdp=4,tensor=2", "data=2,fsdp=8"]
  ok = [r for r in rows if r["status"] == "ok"]
  assert len(ok) == 2, rows
  for r in ok:
    for key in (
      "compile_s",
      "step_s",
      "samples_per_s",
      "tokens_per_s",
      "tflops_per_device",
      "peak_mem_gib",
      "args_gib",
      "temp_gib",
    ):
      assert float(r[key]) > 0, (key, r)
    assert r["mfu"] == ""  # no peak FLOP/s for CPU devices
    assert r["mem_source"] == "compiled" and int(r["devices"]) == 8 and np.isfinite(float(r["loss"]))
  assert rows[2]["status"] == "error" and "needs 16 devices" in rows[2]["error"], rows[2]
  assert os.path.getsize(out / "sweep.png") > 10_000
  best = max(ok, key=lambda r: float(r["samples_per_s"]))
  assert f"best layout: {best['mesh']} " in proc.stdout


def test_device_memory_counters_and_the_row_line():
  """GPU/TPU rows split the peak into before-the-first-step and in use after; CPU has no counters."""

  class Dev:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  gib = 2**30
  devs = [
    Dev({"peak_bytes_in_use": 3 * gib, "bytes_in_use": gib}),
    Dev({"peak_bytes_in_use": 5 * gib, "bytes_in_use": 2 * gib}),
  ]
  assert measure.device_peak_bytes(devs) == 5 * gib
  assert measure.device_peak_bytes(devs, "bytes_in_use") == 2 * gib
  assert measure.device_peak_bytes([Dev(None)]) is None and measure.device_peak_bytes([Dev({})], "bytes_in_use") is None
  row = dict(status="ok", compile_s=1.0, step_s=0.5, samples_per_s=16.0, peak_mem_gib=85.47, mem_source="device_peak")
  assert measure._one_line(row).endswith("peak 85.47 GiB (device_peak)")
  row.update(setup_peak_gib=84.9, in_use_gib=19.2)
  assert "before the first step 84.90, in use after 19.20" in measure._one_line(row)
  assert {"setup_peak_gib", "in_use_gib"} <= set(measure.FIELDS)
