"""cheers_jax.aot: the train step's per-device memory from an ahead-of-time compile on abstract inputs."""

from __future__ import annotations

import csv

import pytest

from cheers_jax import aot
from tests.scale.common import SMALL_VOCAB, TINY, run


def test_bad_arguments_fail_before_compiling():
  assert aot.main(["--config", TINY, "--meshes", "model=2"]) == 2
  assert aot.main(["--config", TINY, "--seq-len", "8"]) == 2


@pytest.mark.slow
@pytest.mark.heavy
def test_aot_memory_of_a_small_config(tmp_path):
  """The tiny model (1024-token vocabulary) on one CPU device, batch 8 at its 96-token bucket: the same
  program as test_bench's, so one of the two compiles is a cache lookup. Arguments, outputs, temp and
  total are positive, the donated state is aliased, and the arguments are the train state + the batch."""
  out = tmp_path / "aot.csv"
  proc = run(
    [
      "-m",
      "cheers_jax.aot",
      "--config",
      TINY,
      SMALL_VOCAB,
      "--meshes",
      "fsdp=1",
      "--per-device-batch",
      "8",
      "--seq-len",
      "96",
      "--out",
      str(out),
    ],
    devices=1,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "cpu (estimate), 1 devices" in proc.stdout and "total" in proc.stdout
  with open(out) as f:
    (row,) = list(csv.DictReader(f))
  assert row["status"] == "ok" and row["global_batch"] == "8" and row["fits"] == "yes", row
  gib = {k: float(row[k]) for k in ("args_gib", "outputs_gib", "alias_gib", "temp_gib", "total_gib", "compile_s")}
  assert all(v > 0 for v in gib.values()), gib
  assert gib["alias_gib"] <= min(gib["args_gib"], gib["outputs_gib"])
  assert gib["total_gib"] == pytest.approx(
    gib["args_gib"] + gib["outputs_gib"] - gib["alias_gib"] + gib["temp_gib"], rel=1e-6
  )
  # the arguments are the whole train state (fp32 params + Adam moments) and the batch
  import jax
  import numpy as np
  from cheers_jax import config as config_lib
  from cheers_jax import sharding
  from cheers_jax.train import synthetic
  from cheers_jax.train import state as state_lib

  config = config_lib.load(TINY, [SMALL_VOCAB])
  mesh = sharding.make_mesh_on_first_devices({"fsdp": 1}, jax.devices()[:1])
  abstract, _ = state_lib.abstract_train_state(config, mesh)
  state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  shapes = synthetic.batch_shapes(synthetic.batch_spec(config, 8, seq_len=96))
  batch = sum(np.prod(s) * d.itemsize for s, d in shapes.values())
  assert gib["args_gib"] * 2**30 == pytest.approx(state + batch, rel=0.01), (gib, state, batch)
