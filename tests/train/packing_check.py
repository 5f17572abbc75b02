"""Run in a subprocess with 8 fake CPU devices (see test_sharding.py): one train step on a PACKED batch
(8 rows of several samples each) on the mesh data=2 x fsdp=4 (rows split 8 ways, weights over 4) against
one device (one mesh: each is a compile of minutes on 2 cores; tests/train/sharding_check.py covers the
others with unpacked batches).

Prints one JSON line `RESULT {...}`; exits non-zero (AssertionError) on a mismatch.
"""

from __future__ import annotations

import json
import sys

import jax

from cheers_jax import sharding
from cheers_jax.data import batch as batch_lib
from cheers_jax.data import packing
from cheers_jax.model.cheers import Cheers
from cheers_jax.train import batching
from cheers_jax.train import state as state_lib
from cheers_jax.train import step as step_lib
from tests.data.test_packing import fake_samples
from tests.train.common import TOKENS, small_config
from tests.train.sharding_check import compare_to_one_device

MESHES = {"data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1}}
SPEC = packing.PackingSpec(rows=8, row_len=64, row_images=3)


def packed_batch() -> dict:
  """The first packed batch of a stream of fake samples: 8 rows, several samples in most."""
  samples = fake_samples(40, seed=3)
  [placement, *_] = packing.first_fit([s["length"] for s in samples], [1] * len(samples), SPEC)
  batch = packing.collate_packed(samples[: len(placement)], placement, SPEC, TOKENS)
  assert batch["segment_ids"].max(axis=1).min() >= 1 and batch["segment_ids"].max() >= 2, "rows must be packed"
  return {k: v for k, v in batch.items() if k not in batch_lib.HOST_ONLY_KEYS}


def main() -> int:
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  config = small_config()
  config.train.batch_size = SPEC.rows
  model = Cheers(state_lib.model_config(config))
  batch = packed_batch()

  def run(mesh, state, shardings):
    step_fn = step_lib.make_train_step(model, config, mesh, shardings)
    dev = batching.device_batch(batch, batching.batch_shardings(mesh, batch))
    new, metrics = step_fn(state, dev)
    return jax.device_get(new), jax.device_get(metrics)

  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state, shardings = state_lib.init_train_state(config, one)
  initial = jax.device_get(state)
  ref_state, ref = run(one, state, shardings)
  results = {"samples": packing.samples_in(batch)}
  for name, shape in MESHES.items():
    mesh = sharding.make_mesh(shape)
    _, shardings = state_lib.abstract_train_state(config, mesh)
    new, metrics = run(mesh, jax.device_put(initial, shardings), shardings)
    results[name] = compare_to_one_device(name, new, metrics, ref_state, ref)
  print("RESULT " + json.dumps(results), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
