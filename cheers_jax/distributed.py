"""Multi-process start-up: `jax.distributed.initialize` from the launcher's environment.

One call at the top of every entry point (`maybe_initialize()`); a single process needs nothing.
Recognised environments, in order:
- explicit: CHEERS_COORDINATOR (host:port), CHEERS_NUM_PROCESSES, CHEERS_PROCESS_ID
  [, CHEERS_LOCAL_DEVICE_IDS = comma-separated]  (plain multi-node, any cluster);
- SLURM (srun): jax detects SLURM_* itself (one process per task);
- Cloud TPU pods: jax detects the TPU worker metadata itself.
"""
from __future__ import annotations

import os

import jax

_initialized = False


def maybe_initialize() -> None:
  global _initialized
  if _initialized:
    return
  env = os.environ
  if env.get("CHEERS_COORDINATOR"):
    local = env.get("CHEERS_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
        coordinator_address=env["CHEERS_COORDINATOR"],
        num_processes=int(env["CHEERS_NUM_PROCESSES"]),
        process_id=int(env["CHEERS_PROCESS_ID"]),
        local_device_ids=[int(x) for x in local.split(",")] if local else None)
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()  # cluster auto-detection (SLURM, TPU pods)
  _initialized = True
