"""How evaluation spreads over devices and processes.

Every process of a `jax.distributed` run (started as `train` starts it, `cheers_jax.distributed`) takes
its own share of the work (`Workers.share`), runs it data parallel over its local devices
(`sharding.local_data_mesh`), and writes what it finished into the output folder; process 0 then merges
the shares and writes the outputs and the score. No array spans processes, so the processes need no
collective, only a barrier on the coordination service. As in VLMEvalKit's multi-GPU inference (its
ranks write part files that rank 0 merges), the output folder must be shared by the processes.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence, TypeVar

import jax
from tqdm import tqdm

from cheers_jax import distributed
from cheers_jax.sharding import local_data_mesh, replicated

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Workers:
  process_index: int = 0
  process_count: int = 1
  local_devices: int = 1
  mesh: object = None  # jax.sharding.Mesh over the local devices; None: one device, no placement

  @property
  def is_lead(self) -> bool:
    return self.process_index == 0

  def share(self, items: Sequence[T]) -> list[T]:
    """This process's items: every process_count-th, starting at its index (deterministic, any count)."""
    return list(items[self.process_index :: self.process_count])

  def barrier(self, name: str) -> None:
    distributed.barrier(name)

  def describe(self) -> str:
    return f"{self.process_count} process(es) x {self.local_devices} device(s)"


def current_workers() -> Workers:
  """The processes and local devices of this run (call `distributed.maybe_initialize()` first)."""
  local = jax.local_device_count()
  return Workers(jax.process_index(), jax.process_count(), local, local_data_mesh() if local > 1 else None)


def replicate(variables, workers: Workers):
  """The model's variables on every local device (a no-op on one device)."""
  if workers.mesh is None:
    return variables
  return jax.device_put(variables, replicated(workers.mesh))


def round_up(n: int, m: int) -> int:
  return -(-n // max(1, m)) * max(1, m)


class _NoBar:
  def update(self, n):
    pass

  def close(self):
    pass


def progress_bar(total: int, enabled: bool, unit: str, desc: str):
  if not enabled or total == 0:
    return _NoBar()
  return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)
