"""Multi-process start-up and the checks that depend on the process count.

`maybe_initialize()` calls `jax.distributed.initialize` from the launcher's environment. The entry
points that can span hosts call it: `train` always, `evaluate`, `sweep` and `bench train` when they run
the layouts in-process (under a multi-process launcher); the single-host tools (aot, generate, parity, convert,
bench generate) do not. A single process needs nothing. Recognised environments, in order:
- explicit: CHEERS_COORDINATOR (host:port), CHEERS_NUM_PROCESSES, CHEERS_PROCESS_ID
  [, CHEERS_LOCAL_DEVICE_IDS = comma-separated]  (plain multi-node, any cluster);
- SLURM (srun): jax detects SLURM_* itself (one process per task);
- Cloud TPU pods: jax detects the TPU worker metadata itself.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax
from jax._src import distributed as jax_distributed  # the coordination client: it has no public barrier

from cheers_jax.errors import ConfigError

_initialized = False


def _cluster_env(env: Mapping[str, str]) -> bool:
  return bool(int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID"))


def launched_multi_process(env: Optional[Mapping[str, str]] = None) -> bool:
  """True in the environments in which `maybe_initialize` starts jax.distributed."""
  env = os.environ if env is None else env
  return bool(env.get("CHEERS_COORDINATOR")) or _cluster_env(env)


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
      local_device_ids=[int(x) for x in local.split(",")] if local else None,
    )
  elif _cluster_env(env):
    jax.distributed.initialize()  # cluster auto-detection (SLURM, TPU pods)
  _initialized = True


def is_lead() -> bool:
  """Process 0 writes files and prints reports."""
  return jax.process_index() == 0


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits for every process on the coordination service (no device collective, so any backend and
  processes that compiled different programs); a no-op in a single process."""
  if jax.process_count() == 1:
    return
  client = getattr(jax_distributed.global_state, "client", None)
  if client is not None:
    client.wait_at_barrier(name, timeout_s * 1000)


def check_batch_splits_over_processes(batch_size: int) -> None:
  """Each process loads batch_size / process_count rows."""
  if batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by {jax.process_count()} processes")


def check_rows_split_evenly(key: str, rows: int, shards: int) -> None:
  """Under several processes a batch array cannot be replicated (each process holds other rows)."""
  if jax.process_count() > 1 and rows % shards:
    raise ConfigError(
      f"batch array '{key}' has {rows} rows, not divisible by the {shards} data x fsdp "
      "shards; make train.batch_size a multiple of them"
    )
