"""cheers_jax.aot: the train step's per-device memory from an ahead-of-time compile on abstract inputs."""
from __future__ import annotations

import csv

import pytest

from cheers_jax import aot
from tests.scale.common import SMALL_VOCAB, TINY, run

# the same program as tests/scale/dist_worker.py's single-process run (a shared compilation-cache entry)
SAME_AS_DIST = [SMALL_VOCAB, "--config.train.warmup_ratio=0.0", "--config.train.lr=0.001"]


def test_bad_arguments_fail_before_compiling():
  assert aot.main(["--config", TINY, "--meshes", "model=2"]) == 2
  assert aot.main(["--config", TINY, "--seq-len", "8"]) == 2


@pytest.mark.slow
def test_aot_memory_of_a_small_config(tmp_path):
  """fsdp=2 over 2 fake CPU devices, 2 rows per device: arguments, outputs, temp and total are positive,
  the donated state is aliased, and sharding the params over 2 devices leaves each about half."""
  out = tmp_path / "aot.csv"
  proc = run(["-m", "cheers_jax.aot", "--config", TINY, *SAME_AS_DIST, "--meshes", "fsdp=2", "--per-device-batch", "2",
              "--seq-len", "32", "--out", str(out)], devices=2, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "cpu (estimate), 2 devices" in proc.stdout and "fsdp=2" in proc.stdout
  with open(out) as f:
    (row,) = list(csv.DictReader(f))
  assert row["status"] == "ok" and row["global_batch"] == "4" and row["fits"] == "yes", row
  gib = {k: float(row[k]) for k in ("args_gib", "outputs_gib", "alias_gib", "temp_gib", "total_gib", "compile_s")}
  assert all(v > 0 for v in gib.values()), gib
  assert gib["alias_gib"] <= min(gib["args_gib"], gib["outputs_gib"])
  assert gib["total_gib"] == pytest.approx(gib["args_gib"] + gib["outputs_gib"] - gib["alias_gib"] + gib["temp_gib"],
                                           rel=1e-6)
  # the arguments are the train state (fp32 params + Adam moments), about halved by fsdp=2, plus the batch
  import jax
  import numpy as np
  from cheers_jax import sweep
  from cheers_jax.train import step as step_lib
  config = sweep.load_config(TINY, SAME_AS_DIST)
  abstract, _ = step_lib.abstract_train_state(config, sweep.make_layout_mesh({"fsdp": 1}, jax.devices()[:1]))
  state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  batch = sum(np.prod(s) * d.itemsize for s, d in sweep.batch_shapes(sweep.batch_spec(config, 4, seq_len=32)).values())
  assert 0.45 * state < gib["args_gib"] * 2 ** 30 < state + batch, (gib, state, batch)
