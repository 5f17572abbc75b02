"""One process of the multi-process CPU test (tests/scale/test_distributed.py).

  python -m tests.scale.dist_worker OUT_PREFIX LOCAL_DEVICES

Joins jax.distributed through cheers_jax.distributed (CHEERS_COORDINATOR / CHEERS_NUM_PROCESSES /
CHEERS_PROCESS_ID; without them it is the single-process reference), then runs STEPS train steps of
the tiny model (1024-token vocabulary, fp32) on an fsdp mesh over all global devices, twice from the
same initial state, feeding a fixed global batch of BATCH samples in two ways:
  'global':   this process's rows of the globally indexed batch (image positions / slots count from
              row 0 of the GLOBAL batch), through jax.make_array_from_process_local_data;
  'pipeline': this process's rows collated on their own, indexed locally exactly as the data
              pipeline hands each process its batch, through batching.device_batch (the loop's path).
Writes OUT_PREFIX.<process_index>.json: {"global": [losses], "pipeline": [losses], ...}.
"""

from __future__ import annotations

import json
import os
import sys

BATCH, SEQ, STEPS = 4, 32, 3


def main(out_prefix: str, local_devices: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  from cheers_jax import distributed

  distributed.maybe_initialize()

  import numpy as np
  from cheers_jax import config as config_lib
  from cheers_jax import sharding
  from cheers_jax.model.cheers import Cheers
  from cheers_jax.train import synthetic
  from cheers_jax.train import batching
  from cheers_jax.train import state as state_lib
  from cheers_jax.train import step as step_lib
  from tests.scale.common import SMALL_VOCAB, TINY

  # activation_shardings off: with it, XLA:CPU's thunk runtime ran the two processes' gloo collectives
  # in different orders (size mismatch); see cheers_jax/config.py
  config = config_lib.load(
    TINY,
    [
      SMALL_VOCAB,
      f"--config.train.batch_size={BATCH}",
      "--config.train.warmup_ratio=0.0",
      "--config.train.lr=0.001",
      "--config.train.activation_shardings=False",
    ],
  )
  n, pid = jax.process_count(), jax.process_index()
  mesh = sharding.make_mesh_on_first_devices({"fsdp": jax.device_count()})
  spec = synthetic.batch_spec(config, BATCH, seq_len=SEQ)
  per = BATCH // n
  rows = range(pid * per, (pid + 1) * per)
  local = synthetic.synthetic_batch(spec, rows)  # the pipeline's per-process batch: local indices
  local.pop("num_skipped")
  shifted = dict(local)  # the same rows, indexed into the global batch
  shifted["image_positions"] = local["image_positions"] + rows.start * SEQ
  shifted["image_index"] = np.where(
    local["image_index"] >= 0, local["image_index"] + rows.start * spec.image_slots * spec.tokens_per_image, -1
  )
  shardings = batching.batch_shardings(mesh, local)
  compiled = None
  result = {
    "process_count": n,
    "process_index": pid,
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
  }
  for mode, host in (("global", shifted), ("pipeline", local)):
    state, state_shardings = synthetic.synthetic_train_state(config, mesh, seed=0)
    if mode == "global":  # already globally indexed: straight to global arrays
      batch = {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
        for k, v in host.items()
        if k in shardings
      }
    else:  # the loop's path: device_batch re-bases the local indices
      batch = batching.device_batch(host, shardings)
    if compiled is None:
      step_fn = step_lib.make_train_step(Cheers(state_lib.model_config(config)), config, mesh, state_shardings)
      compiled = step_fn.lower(state, batch).compile()
      _barrier("compiled")
    losses = []
    for _ in range(STEPS):
      state, metrics = compiled(state, batch)
      losses.append(float(jax.device_get(metrics["loss"])))
    result[mode] = losses
  with open(f"{out_prefix}.{pid}.json", "w") as f:
    json.dump(result, f)
  if n > 1:
    jax.distributed.shutdown()


def _barrier(name: str) -> None:
  """Wait for every process on the coordination service (no device collective): gloo gives a peer only
  30 s to join the first collective, and one process may compile minutes longer than the other (a
  persistent-cache hit on one side only)."""
  from jax._src import distributed as jax_distributed  # the client has no public barrier

  client = getattr(jax_distributed.global_state, "client", None)
  if client is not None:
    client.wait_at_barrier(name, 900_000)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
