"""The batch on the devices: shardings, host -> global device arrays, and micro-batches.

A batch (the contract of `cheers_jax.data.batch`) has its rows (and image slots) split over data x
fsdp; every process holds its own rows, indexed locally as the pipeline collates them.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cheers_jax import distributed, sharding
from cheers_jax.data import batch as batch_lib

Array = jax.Array


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
  """Leading axis over (data, fsdp) where it divides evenly, else replicated."""
  out = {}
  for key, x in batch.items():
    if key in batch_lib.HOST_ONLY_KEYS:
      continue
    shape = np.shape(x)
    # a replicated array would need the same rows on every process
    distributed.check_rows_split_evenly(key, shape[0] if shape else 0, sharding.data_shards(mesh))
    out[key] = sharding.leading_axis_sharding(mesh, shape)
  return out


def globalize_indices(batch: Mapping[str, Any], process_index: int) -> dict[str, Any]:
  """Re-base a process-local batch's cross references to the global batch: process p holds rows
  [p*B, (p+1)*B) and image slots [p*M, (p+1)*M), so flat positions shift by p*B*S and image token
  indices by p*M*N."""
  if process_index == 0 or "image_positions" not in batch:
    return dict(batch)
  b, s = np.shape(batch["token_ids"])
  m, n = np.shape(batch["image_positions"])
  out = dict(batch)
  out["image_positions"] = np.asarray(batch["image_positions"]) + process_index * b * s
  idx = np.asarray(batch["image_index"])
  out["image_index"] = np.where(idx >= 0, idx + process_index * m * n, idx).astype(idx.dtype)
  return out


def device_batch(batch: Mapping[str, Any], shardings: Mapping[str, NamedSharding]) -> dict[str, Array]:
  """Per-process numpy batch (locally indexed, as the pipeline collates it) -> global jax arrays
  (multi-host: each process holds its rows; process p's rows follow those of processes < p)."""
  batch = globalize_indices(batch, jax.process_index())
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items() if k in shardings
  }


def split_micro_batches(batch: dict, accum: int) -> dict:
  """(B, ...) -> (accum, B/accum, ...); micro-batch j holds rows j, j+accum, ... so that every
  device keeps its own rows in every micro-batch. Images follow their samples (slot m belongs to
  sample m // (M/B), the pipeline's layout); image_positions and image_index are re-based to the
  micro-batch."""
  b, s = batch["token_ids"].shape
  m = batch["pixels"].shape[0]
  if b % accum:
    raise ValueError(f"batch of {b} rows is not divisible by train.grad_accum={accum}")
  if m % b:
    raise ValueError(f"{m} image slots for {b} rows: grad_accum needs a fixed number of slots per sample")
  bm, slots = b // accum, m // b

  def rows(x):
    return x.reshape(bm, accum, *x.shape[1:]).swapaxes(0, 1)

  def images(x):
    x = x.reshape(bm, accum, slots, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(accum, bm * slots, *x.shape[3:])

  out = {k: rows(batch[k]) for k in batch_lib.ROW_KEYS if k in batch}
  out.update({k: images(batch[k]) for k in batch_lib.IMAGE_KEYS + batch_lib.OPTIONAL_KEYS if k in batch})
  # re-base the cross references to the micro-batch: flat positions b*S + s and image slots b*K + i
  pos = out["image_positions"]
  out["image_positions"] = ((pos // s) // accum) * s + pos % s
  n_tok = batch["image_positions"].shape[1]
  idx = out["image_index"]
  slot, tok = idx // n_tok, idx % n_tok
  local = ((slot // slots) // accum) * slots + slot % slots
  out["image_index"] = jnp.where(idx >= 0, local * n_tok + tok, -1)
  return out
