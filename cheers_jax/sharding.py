"""The device mesh and the logical-axis rules: the only place that knows mesh axis names.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params and optimizer
state), `tensor` (Megatron-style sharding of heads and MLP width). Model code names logical axes
only (see `cheers_jax/model/layers.py`); `LOGICAL_RULES` maps them here.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cheers_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch's rows are split over these; `tensor` devices share rows

# logical name -> mesh axis (or None = replicated). First match wins (flax semantics).
LOGICAL_RULES: tuple[tuple[str, Optional[str | tuple[str, ...]]], ...] = (
  # activations
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", "tensor"),
  # text / DiT widths
  ("embed", "fsdp"),
  ("vision_embed", "fsdp"),
  ("mlp", "tensor"),
  ("vision_mlp", "tensor"),
  ("heads", "tensor"),
  ("vision_heads", "tensor"),
  ("kv", None),  # only 2 KV heads: too few to split
  ("modulation", "tensor"),
  ("vocab", "tensor"),
  # conv channels (VAE): whole. Sharding them over fsdp made XLA compute the VAE's weight gradients from
  # channel-sharded activations of the GLOBAL batch (1.6x the temp memory at fsdp=4, tests/train/
  # test_fsdp_memory.py); the two decoders are ~2 % of the parameters.
  ("conv_in", None),
  ("conv_out", None),
  ("layers", None),
  ("norm", None),
)


def make_mesh(shape: dict | Sequence[int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over (data, fsdp, tensor). `shape` maps axis -> size, one size may be -1 (= the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  if isinstance(shape, dict):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes: {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
      f"{len(devices)} are available; set one axis to -1 to use the rest"
    )
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # fake CPU devices / odd topologies
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_to_mesh(tree, rules=LOGICAL_RULES):
  """PartitionSpecs for a tree of logical specs (from `nn.get_partition_spec`)."""
  return nn.logical_to_mesh(tree, rules)


def _spec_of_names(names: Sequence[Optional[str]], rules) -> P:
  """One array's logical names -> mesh PartitionSpec, each dim resolved on its own; `_fit` then gives
  a mesh axis wanted by two dims (a square kernel such as time_embed's ('embed', 'embed'), or two names
  with one rule) to the first of them."""
  return P(*(None if name is None else nn.logical_to_mesh_axes((name,), rules)[0] for name in names))


def param_shardings(abstract_variables, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for boxed abstract variables (from `jax.eval_shape(init)`); unboxed leaves
  (no logical names) and vectors (norm scales, biases: tiny, and when split over fsdp XLA computes
  their gradients from feature-sharded activations of the global batch) are replicated."""

  def one(leaf):
    value = leaf.unbox() if isinstance(leaf, nn.Partitioned) else leaf
    names = leaf.names if isinstance(leaf, nn.Partitioned) and value.ndim > 1 else ()
    return NamedSharding(mesh, _fit(_spec_of_names(names, rules), value.shape, mesh))

  return jax.tree_util.tree_map(one, abstract_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes of size 1, axes that do not divide the dimension (e.g. 3 RGB channels), and axes
  an earlier dimension already uses (two logical names with the same rule, e.g. und_projector fc1's
  ('vision_mlp', 'mlp') -> tensor twice)."""
  out = []
  used: set[str] = set()
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axis is None:
      out.append(None)
      continue
    axes = axis if isinstance(axis, tuple) else (axis,)
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    if axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
      axes = ()
    used.update(axes)
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def _without_data_axes(axes):
  if axes is None:
    return None
  kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a not in BATCH_AXES)
  return None if not kept else (kept[0] if len(kept) == 1 else kept)


_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("cheers_jax_mesh", default=None)


@contextlib.contextmanager
def axis_rules_context(mesh: Optional[Mesh] = None, rules=LOGICAL_RULES) -> Iterator[None]:
  """Activate the logical-axis rules (and the mesh the model's constraints resolve against) while a
  step is traced. The mesh is passed explicitly: `with mesh:` is deprecated in jax 0.10, and under it
  flax's constraints found no mesh and were silently dropped."""
  token = _MESH.set(mesh)
  try:
    with nn.logical_axis_rules(rules):
      yield
  finally:
    _MESH.reset(token)


def constrain(x, names: Sequence[Optional[str]], rules=None):
  """Pin an array's sharding by logical names (a no-op outside `axis_rules_context(mesh)`)."""
  mesh = _MESH.get()
  if mesh is None or not nn.get_logical_axis_rules():
    return x
  return nn.with_logical_constraint(x, tuple(names), rules=rules, mesh=mesh)


def gathered(x, names: Sequence[Optional[str]]):
  """A parameter as a layer uses it: whole over the data-parallel axes (FSDP shards it at rest, so this is
  the all-gather, done after the cast to the compute dtype), still split over `tensor`.

  Pinning this makes XLA gather the weight instead of re-sharding the activations along their features
  to match it (which keeps the GLOBAL batch on every device). The gradient comes back reduce-scattered.
  A no-op outside `axis_rules_context` (init, single-device inference).
  """
  rules = nn.get_logical_axis_rules()
  if not rules or _MESH.get() is None:
    return x
  in_use = tuple((name, _without_data_axes(axes)) for name, axes in rules)
  seen: set = set()
  unique = []  # a square kernel such as ('embed', 'embed'): the second use stays whole (as `_fit` does)
  for name in names:
    unique.append(None if name in seen else name)
    seen.add(name)
  return constrain(x, unique, rules=in_use)


def batch_groups(rows: int) -> int:
  """Into how many row blocks the active mesh (`axis_rules_context`) splits a batch of `rows`: its data
  shards where they divide the rows, else 1 (also outside the context)."""
  mesh = _MESH.get()
  if mesh is None or not nn.get_logical_axis_rules():
    return 1
  shards = data_shards(mesh)
  return shards if rows % shards == 0 else 1


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_shards(mesh: Mesh) -> int:
  """Into how many blocks a batch's rows are split (data x fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def leading_axis_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Rows over data x fsdp where the leading axis divides evenly, else replicated."""
  if len(shape) and shape[0] % data_shards(mesh) == 0:
    return batch_sharding(mesh, len(shape))
  return replicated(mesh)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_data_mesh() -> Mesh:
  """Pure data parallelism over this process's devices (evaluation: each process answers its own rows,
  so no array spans processes)."""
  return make_mesh({"data": -1}, jax.local_devices())


def place_rows(tree, mesh: Mesh):
  """Numpy arrays of a batch onto `mesh`, rows split over the data axes (replicated where they do not divide)."""
  return jax.tree_util.tree_map(lambda v: jax.device_put(np.asarray(v), leading_axis_sharding(mesh, np.shape(v))), tree)


# ---- mesh shapes as text and on a subset of the devices --------------------------------------------
def parse_meshes(text: str, flag: str = "--meshes") -> list[dict[str, int]]:
  """'data=8;fsdp=8;fsdp=4,tensor=2' -> [{'data': 8}, {'fsdp': 8}, {'fsdp': 4, 'tensor': 2}]. A size is a
  device count >= 1, or -1 (at most one per mesh) for the rest of the devices; anything else is a
  UserError naming `flag`."""
  meshes = []
  for chunk in filter(None, (c.strip() for c in text.split(";"))):
    mesh = {}
    for part in filter(None, (p.strip() for p in chunk.split(","))):
      axis, eq, size = part.partition("=")
      if not eq or axis.strip() not in MESH_AXES or not size.strip().lstrip("-").isdigit():
        raise UserError(f"{flag} {chunk!r}: use AXIS=SIZE pairs with AXIS in {MESH_AXES}, e.g. 'fsdp=4,tensor=2'")
      if int(size) < 1 and int(size) != -1:
        raise UserError(
          f"{flag} {chunk!r}: {axis.strip()}={int(size)}; give a device count >= 1, or -1 for the rest of the devices"
        )
      mesh[axis.strip()] = int(size)
    if list(mesh.values()).count(-1) > 1:
      raise UserError(f"{flag} {chunk!r}: at most one axis may be -1 (the rest of the devices)")
    meshes.append(mesh)
  if not meshes:
    raise UserError(f"{flag} {text!r}: give at least one mesh, e.g. 'fsdp=4'")
  return meshes


def mesh_name(mesh: Mapping[str, int]) -> str:
  """{'data': 1, 'fsdp': 4, 'tensor': 2} -> 'fsdp=4,tensor=2' (size-1 axes dropped; all 1 -> 'fsdp=1')."""
  parts = [f"{a}={int(mesh[a])}" for a in MESH_AXES if int(mesh.get(a, 1)) != 1]
  return ",".join(parts) or "fsdp=1"


def full_mesh_shape(mesh: Mapping[str, int]) -> dict[str, int]:
  """Every axis, size 1 where `mesh` does not name it."""
  return {a: int(mesh.get(a, 1)) for a in MESH_AXES}


def mesh_overrides(mesh: Mapping[str, int]) -> str:
  """The config overrides that select `mesh`, every axis named: '--config.mesh.data=1 --config.mesh.fsdp=8 ...'."""
  return " ".join(f"--config.mesh.{axis}={size}" for axis, size in full_mesh_shape(mesh).items())


def make_mesh_on_first_devices(mesh_shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The mesh over the first prod(sizes) devices (all of them when an axis is -1)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = list(full_mesh_shape(mesh_shape).values())
  if -1 not in sizes:
    need = math.prod(sizes)
    if need > len(devices):
      raise UserError(f"mesh {mesh_name(mesh_shape)} needs {need} devices, {len(devices)} are available")
    devices = devices[:need]
  return make_mesh(dict(mesh_shape), devices)
