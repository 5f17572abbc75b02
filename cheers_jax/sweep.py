r"""Compare train-step layouts (mesh x remat x batch x attention) on this hardware.

  python -m cheers_jax.sweep --config configs/tiny.py --meshes "data=8;fsdp=8;fsdp=4,tensor=2" \
      [--remat none,full] [--batch-sizes 8,16] [--attention xla,cudnn] [--steps 5] [--out DIR] \
      [--seq-len 400] [--gen-fraction 0.5] [--config.train.grad_accum=2 ...]

For every combination: build the mesh, create the train state already sharded, compile the train step
(timed: lower + compile), run --warmup untimed and --steps timed steps on one synthetic static-shape
batch in the data pipeline's contract (no data pipeline involved), and record the median step time,
samples/s, tokens/s (valid tokens), TFLOP/s per device, MFU and the peak device memory. A layout that
runs out of memory, fails to compile or crashes becomes a row with its error: the sweep goes on.
Writes OUT/sweep.csv and OUT/sweep.png, prints a table and the best layout (highest samples/s).

- `--batch-sizes` are GLOBAL batches (split over data x fsdp; `tensor` devices share rows).
- The synthetic batch is the reference timing's mix (`--gen-fraction` generation samples, the rest
  understanding, one image each, ~`--text-len` text tokens, padded to `--seq-len`); see `BatchSpec`.
- MFU = flops_per_sample (cheers_jax.train.metrics: matmul/conv/attention FLOPs of forward + backward,
  16.2 TFLOP at 512x512, seq 400) x samples/s / (devices x peak bf16 FLOP/s); n/a where the peak is
  unknown (CPU).
- Memory: `peak_bytes_in_use` of the devices where the backend reports it (GPU, TPU), else the
  compiled step's `memory_analysis()` (arguments + outputs - aliased + temp, per device; CPU).
- Isolation (`--isolate auto`): each layout runs in a fresh subprocess, so peak-memory counters start
  at zero and an OOM abort cannot take the sweep down. Under jax.distributed (CHEERS_COORDINATOR,
  SLURM, TPU pods) every process runs the layouts in-process, in lockstep; the device peak is then
  cumulative (`mem_source` says so) and the compiled figure is the per-layout one.
- The train state is filled with cheap deterministic pseudo-random values by default (`--init
  synthetic`: compiles in seconds, the step's cost is the same); `--init config` runs the real
  initialisation (`init_train_state`, honours `init_from`).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import difflib
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from cheers_jax.tokens import (CHAT_END_ID, CHAT_START_ID, IGNORE_INDEX, IM_END_ID, IM_START_ID,
                               IMAGE_GEN_TOKEN_INDEX, IMAGE_TOKEN_INDEX, NEWLINE_ID)

MESH_AXES = ("data", "fsdp", "tensor")  # checked against cheers_jax.sharding.MESH_AXES in the worker
ROW_PREFIX = "SWEEP_ROW "
FIELDS = ("mesh", "remat", "attention", "batch_size", "per_device_batch", "devices", "device_kind", "status",
          "compile_s", "step_s", "samples_per_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gib",
          "mem_source", "args_gib", "temp_gib", "loss", "seq_len", "error")
GIB = 2.0 ** 30
SYSTEM_ID, USER_ID, ASSISTANT_ID = 8948, 872, 77091  # 'system', 'user', 'assistant'


class SweepError(ValueError):
  """Bad sweep arguments; the message says what to change."""


# ---- config files and --config.KEY=VALUE overrides ------------------------------------------------
def load_config(path: str, overrides: Sequence[str] = ()):
  """An ml_collections config from `path[:arg]` (calls get_config() or get_config(arg)) + overrides."""
  file, _, arg = path.partition(":")
  if not os.path.exists(file):
    raise SweepError(f"config file {file!r} not found")
  root = os.path.dirname(os.path.dirname(os.path.abspath(file)))
  if root not in sys.path:  # configs/*.py import their siblings as `configs.common`
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(file))}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  apply_overrides(config, overrides)
  return config


def _literal(raw: str) -> Any:
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _coerce(raw: str, like: Any) -> Any:
  """The override's text as the type of the value it replaces (as ml_collections' config_flags)."""
  if isinstance(like, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise SweepError(f"expected a boolean, got {raw!r}")
  if isinstance(like, int):
    return int(raw)
  if isinstance(like, float):
    return float(raw)
  if isinstance(like, (tuple, list)):
    value = _literal(raw)
    if not isinstance(value, (tuple, list)):
      value = tuple(_literal(x.strip()) for x in raw.split(",") if x.strip())
    return type(like)(value)
  if like is None:
    return _literal(raw)
  return raw


def apply_overrides(config, overrides: Iterable[str]) -> None:
  """'--config.a.b=v' (or 'a.b=v'). Keys must exist, except under `model.` (ModelConfig checks those)."""
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    key, eq, raw = text.partition("=")
    if not eq:
      raise SweepError(f"override {item!r}: use --config.KEY=VALUE")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
      if part not in node:
        raise SweepError(_unknown(".".join(parts[:i + 1]), part, node))
      node = node[part]
    last = parts[-1]
    if last in node:
      value = _coerce(raw, node[last])
    elif parts[0] == "model":  # e.g. model.text.vocab_size: validated by ModelConfig.from_dict
      value = _literal(raw)
    else:
      raise SweepError(_unknown(key, last, node))
    if hasattr(node, "unlocked"):
      with node.unlocked():
        node[last] = value
    else:
      node[last] = value


def _unknown(where: str, key: str, node) -> str:
  close = difflib.get_close_matches(key, list(node.keys()), n=1)
  hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(node.keys()))}"
  return f"unknown config key '{where}'{hint}"


def parse_meshes(text: str) -> list[dict[str, int]]:
  """'data=8;fsdp=8;fsdp=4,tensor=2' -> [{'data': 8}, {'fsdp': 8}, {'fsdp': 4, 'tensor': 2}]."""
  meshes = []
  for chunk in filter(None, (c.strip() for c in text.split(";"))):
    mesh = {}
    for part in filter(None, (p.strip() for p in chunk.split(","))):
      axis, eq, size = part.partition("=")
      if not eq or axis.strip() not in MESH_AXES:
        raise SweepError(f"mesh {chunk!r}: use AXIS=SIZE pairs with AXIS in {MESH_AXES}, e.g. 'fsdp=4,tensor=2'")
      mesh[axis.strip()] = int(size)
    meshes.append(mesh)
  if not meshes:
    raise SweepError(f"no mesh in {text!r}")
  return meshes


def mesh_name(mesh: Mapping[str, int]) -> str:
  """{'data': 1, 'fsdp': 4, 'tensor': 2} -> 'fsdp=4,tensor=2' (size-1 axes dropped; all 1 -> 'fsdp=1')."""
  parts = [f"{a}={int(mesh[a])}" for a in MESH_AXES if int(mesh.get(a, 1)) != 1]
  return ",".join(parts) or "fsdp=1"


def _split_list(text: str, cast=str) -> list:
  return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


# ---- synthetic batches in the pipeline's contract -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """A synthetic global batch, built like the reference's timing batch (time_reference_gpu.py).

  Sample i is a generation sample ('user: <text> / assistant: <image_gen>') for `gen_fraction` of the
  indices (evenly interleaved, so every data shard gets the same mix), else an understanding sample
  ('user: <image> <text> / assistant: <text>'); a 6-token system prompt, `text_len` random text tokens,
  one image, labels as the pipeline builds them. Assembled length: text_len + 24 + N tokens (N = tokens
  per image; the chat template adds 24), right-padded to `seq_len`. The reference's timing batch is
  text_len 120 at 512x512: 400 tokens. Every sample is a pure function of (seed, i), so any subset of
  rows can be built on its own.
  """
  batch_size: int             # global rows
  seq_len: int
  image_size: int
  tokens_per_image: int
  text_len: int = 120
  gen_fraction: float = 0.5
  image_slots: int = 1        # image slots per sample (the pipeline's max_images_per_sample); extra = padding
  vocab_size: int = 151936    # ids >= vocab (special tokens of a small test vocabulary) wrap around
  seed: int = 0

  def __post_init__(self):
    if self.text_len < 2:
      raise SweepError(f"text_len={self.text_len}: at least 2 text tokens per sample")
    if self.sample_len > self.seq_len:
      raise SweepError(f"samples of {self.sample_len} tokens ({self.text_len} text + {CHAT_TOKENS} chat + "
                       f"{self.tokens_per_image} image) do not fit seq_len={self.seq_len}; lower --text-len "
                       "or raise --seq-len")
    if not 0.0 <= self.gen_fraction <= 1.0:
      raise SweepError(f"gen_fraction={self.gen_fraction} is not in [0, 1]")
    if self.image_slots < 1:
      raise SweepError(f"image_slots={self.image_slots}: at least 1")

  @property
  def sample_len(self) -> int:
    return self.text_len + CHAT_TOKENS + self.tokens_per_image

  def is_gen(self, i: int) -> bool:
    f = self.gen_fraction
    return math.floor((i + 1) * f + 1e-9) - math.floor(i * f + 1e-9) == 1


CHAT_TOKENS = 24      # system prompt + turn markers + image block markers around the text
REFERENCE_TEXT_LEN = 120  # the reference timing's samples: 120 + 24 + 256 = 400 tokens at 512x512


def batch_spec(config, batch_size: int, *, seq_len: Optional[int] = None, text_len: Optional[int] = None,
               gen_fraction: float = 0.5, image_slots: int = 1, seed: int = 0) -> BatchSpec:
  """Defaults: seq_len = the config's smallest bucket; text_len = the reference's 120, or what fits."""
  from cheers_jax.model.config import ModelConfig
  cfg = ModelConfig.from_dict(config.model)
  n = cfg.tokens_per_image
  seq_len = int(seq_len or min(config.data.seq_buckets))
  text_len = int(text_len or max(2, min(REFERENCE_TEXT_LEN, seq_len - CHAT_TOKENS - n)))
  return BatchSpec(int(batch_size), seq_len, cfg.vision.image_size, n, text_len, float(gen_fraction),
                   int(image_slots), cfg.text.vocab_size, int(seed))


def _sample(spec: BatchSpec, i: int) -> tuple[list[int], list[int], float]:
  rng = np.random.default_rng([spec.seed, i])
  words = lambda k: [int(x) for x in rng.integers(0, min(spec.vocab_size, 151000), k)]
  n = spec.text_len
  sys_ids = [CHAT_START_ID, SYSTEM_ID, NEWLINE_ID] + words(6) + [CHAT_END_ID, NEWLINE_ID]
  if spec.is_gen(i):
    user = words(n)
    asst = [IM_START_ID, IMAGE_GEN_TOKEN_INDEX, IM_END_ID]
    t = float(np.clip(rng.uniform(), 1e-6, 1 - 1e-6))
  else:
    user = [IM_START_ID, IMAGE_TOKEN_INDEX, IM_END_ID, NEWLINE_ID] + words(n // 2)
    asst = words(n - n // 2)
    t = 1.0
  u = [CHAT_START_ID, USER_ID, NEWLINE_ID] + user + [CHAT_END_ID, NEWLINE_ID]
  a = [CHAT_START_ID, ASSISTANT_ID, NEWLINE_ID] + asst + [CHAT_END_ID, NEWLINE_ID]
  ids = sys_ids + u + a
  structural = {NEWLINE_ID, CHAT_START_ID, CHAT_END_ID, IM_START_ID, IM_END_ID}
  labels = [IGNORE_INDEX] * (len(sys_ids) + len(u)) + a
  labels = [x if x in structural else lab for x, lab in zip(ids, labels)]
  labels = [IGNORE_INDEX if lab in (IMAGE_TOKEN_INDEX, IMAGE_GEN_TOKEN_INDEX) else lab for lab in labels]
  return ids, labels, t


def synthetic_batch(spec: BatchSpec, rows: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
  """The numpy batch of samples `rows` (default: all), indexed locally exactly as the data pipeline
  collates a per-process batch (cheers_jax/data/pipeline.py `collate`): flat positions b*S + s and
  image slots b*K + i count from this batch's first row."""
  from cheers_jax.model.sequence import assemble
  rows = list(range(spec.batch_size)) if rows is None else list(rows)
  samples = [_sample(spec, i) for i in rows]
  b, n_tok, k, hw = len(rows), spec.tokens_per_image, spec.image_slots, spec.image_size
  width = max(len(s[0]) for s in samples)
  ids = np.zeros((b, width), np.int64)
  labels = np.full((b, width), IGNORE_INDEX, np.int64)
  mask = np.zeros((b, width), np.int64)
  for r, (i, lab, _) in enumerate(samples):
    ids[r, :len(i)], labels[r, :len(lab)], mask[r, :len(i)] = i, lab, 1
  lay = assemble(ids, n_tok, attention_mask=mask, labels=labels, seq_len=spec.seq_len, check_fm_positions=True)
  assert lay.num_images == b and np.array_equal(lay.image_sample, np.arange(b))  # one image per sample
  m = b * k
  slot = np.arange(b) * k
  image_index = np.where(lay.image_index >= 0, slot[lay.image_index // n_tok] * n_tok + lay.image_index % n_tok, -1)
  pixels = np.zeros((m, hw, hw, 3), np.float32)
  for r, i in enumerate(rows):
    pixels[slot[r]] = np.random.default_rng([spec.seed, i, 1]).random((hw, hw, 3), np.float32)
  t = np.ones((m,), np.float32)
  t[slot] = [s[2] for s in samples]
  image_kind = np.zeros((m,), np.int32)
  image_kind[slot] = lay.image_kind
  image_weight = np.zeros((m,), np.float32)
  image_weight[slot] = 1.0
  image_positions = np.repeat((np.arange(m) // k * spec.seq_len)[:, None], n_tok, axis=1).astype(np.int32)
  image_positions[slot] = lay.image_positions(n_tok)
  wrap = lambda x: np.where(x >= spec.vocab_size, x % spec.vocab_size, x).astype(np.int32)
  return {
      "token_ids": wrap(lay.token_ids), "image_index": image_index.astype(np.int32),
      "image_mask": lay.image_mask.astype(np.int32), "positions": lay.positions.astype(np.int32),
      "targets": wrap(lay.targets), "valid": lay.valid.astype(bool), "pixels": pixels, "t": t,
      "image_kind": image_kind, "image_weight": image_weight, "image_positions": image_positions,
      "num_skipped": np.asarray(0, np.int32),
  }


def batch_shapes(spec: BatchSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of every array the step consumes, without building the batch."""
  b, s, m, n, hw = spec.batch_size, spec.seq_len, spec.batch_size * spec.image_slots, spec.tokens_per_image, spec.image_size
  i32 = np.dtype(np.int32)
  rows = {k: ((b, s), i32) for k in ("token_ids", "image_index", "image_mask", "positions", "targets")}
  return {**rows, "valid": ((b, s), np.dtype(bool)), "pixels": ((m, hw, hw, 3), np.dtype(np.float32)),
          "t": ((m,), np.dtype(np.float32)), "image_kind": ((m,), i32), "image_weight": ((m,), np.dtype(np.float32)),
          "image_positions": ((m, n), i32)}


def abstract_batch(spec: BatchSpec, mesh) -> dict:
  """ShapeDtypeStructs carrying the step's batch shardings (for AOT lowering: nothing is allocated)."""
  import jax
  from cheers_jax.train import step as step_lib
  shapes = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in batch_shapes(spec).items()}
  shardings = step_lib.batch_shardings(mesh, shapes)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in shapes.items()}


def global_device_batch(full: Mapping[str, np.ndarray], mesh) -> dict:
  """A GLOBAL numpy batch (e.g. `synthetic_batch(spec)`) as sharded jax arrays. Right under any process
  count: every process holds the whole numpy batch and hands each of its devices that device's block
  (unlike the pipeline's per-process batches, whose indices are local)."""
  import jax
  from cheers_jax.train import step as step_lib
  shardings = step_lib.batch_shardings(mesh, full)
  return {k: jax.make_array_from_callback(np.shape(full[k]), shardings[k], lambda idx, x=full[k]: x[idx])
          for k in shardings}


# ---- the train state ------------------------------------------------------------------------------
def _mix32(x):
  """A 32-bit integer hash (murmur3's finaliser): cheap pseudo-random bits from an iota."""
  import jax.numpy as jnp
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def synthetic_train_state(config, mesh, seed: int = 0):
  """(state, shardings): a TrainState of the right shapes, created already sharded, with deterministic
  pseudo-random params (U(-a, a), std 0.02; norm weights 1, biases 0, BatchNorm mean 0 / var 1) and a
  fresh optimizer state. One small elementwise program: compiles in seconds where the real init (which
  traces every module) takes minutes on a CPU. Only for measuring: the values are not a trained model's.
  """
  import jax
  import jax.numpy as jnp
  from cheers_jax.train import optimizer as opt_lib
  from cheers_jax.train import step as step_lib
  abstract, shardings = step_lib.abstract_train_state(config, mesh)
  tx = opt_lib.make_optimizer(config.train)

  def fill(path, leaf, salt):
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    if name in ("weight", "scale", "running_var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name.endswith("bias") or name == "running_mean":
      return jnp.zeros(leaf.shape, leaf.dtype)
    # flat index from broadcasted iotas (not a reshaped 1-D iota): partitions without gathers
    index = jnp.full(leaf.shape, salt * 0x9E3779B1 % 2 ** 32, jnp.uint32)
    stride = 1
    for d in reversed(range(len(leaf.shape))):
      index = index + jax.lax.broadcasted_iota(jnp.uint32, leaf.shape, d) * jnp.uint32(stride % 2 ** 32)
      stride *= leaf.shape[d]
    u = (_mix32(index) >> 8).astype(jnp.float32) * (2.0 / 2 ** 24) - 1.0  # U(-1, 1)
    return (0.02 * math.sqrt(3.0) * u).astype(leaf.dtype)

  def build():
    leaves, treedef = jax.tree_util.tree_flatten_with_path({"params": abstract.params,
                                                            "batch_stats": abstract.batch_stats})
    filled = jax.tree_util.tree_unflatten(treedef, [fill(p, l, i + 1) for i, (p, l) in enumerate(leaves)])
    params = filled["params"]
    trainable, _ = opt_lib.partition(params, opt_lib.trainable_mask(params, config.train.trainable))
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=filled["batch_stats"],
                               opt_state=tx.init(trainable), rng=jax.random.PRNGKey(seed))

  return jax.jit(build, out_shardings=shardings)(), shardings


# ---- one layout -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
  mesh: tuple[tuple[str, int], ...]   # ((axis, size), ...)
  remat: str
  attention: str
  batch_size: int                      # global

  @classmethod
  def make(cls, mesh: Mapping[str, int], remat: str, attention: str, batch_size: int) -> "Layout":
    return cls(tuple((a, int(mesh.get(a, 1))) for a in MESH_AXES), remat, attention, int(batch_size))

  @property
  def mesh_dict(self) -> dict[str, int]:
    return dict(self.mesh)

  @property
  def name(self) -> str:
    return f"{mesh_name(self.mesh_dict)} remat={self.remat} attn={self.attention} B={self.batch_size}"

  def to_json(self) -> dict:
    return {"mesh": self.mesh_dict, "remat": self.remat, "attention": self.attention, "batch_size": self.batch_size}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Layout":
    return cls.make(d["mesh"], d["remat"], d["attention"], d["batch_size"])


@dataclasses.dataclass(frozen=True)
class BatchOptions:
  """How to build the synthetic batch of a layout (its batch size comes from the layout)."""
  seq_len: Optional[int] = None
  text_len: Optional[int] = None
  gen_fraction: float = 0.5
  image_slots: int = 1

  def spec(self, config, batch_size: int) -> BatchSpec:
    return batch_spec(config, batch_size, seq_len=self.seq_len, text_len=self.text_len,
                      gen_fraction=self.gen_fraction, image_slots=self.image_slots, seed=int(config.seed))


def layout_config(config, layout: Layout):
  """A copy of `config` with the layout's mesh, remat policy, attention and global batch."""
  c = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
  with c.unlocked() if hasattr(c, "unlocked") else contextlib.nullcontext():
    c.model.remat_policy = layout.remat
    c.model.attention = layout.attention
    c.train.batch_size = layout.batch_size
    c.mesh = dict(layout.mesh_dict)
  return c


def make_layout_mesh(mesh_shape: Mapping[str, int], devices=None):
  """The mesh over the first prod(sizes) devices (all of them when an axis is -1)."""
  import jax
  from cheers_jax import sharding
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_shape.get(a, 1)) for a in sharding.MESH_AXES]
  if -1 not in sizes:
    need = math.prod(sizes)
    if need > len(devices):
      raise SweepError(f"mesh {mesh_name(mesh_shape)} needs {need} devices, {len(devices)} are available")
    devices = devices[:need]
  return sharding.make_mesh(dict(mesh_shape), devices)


def classify_error(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OOM" in text:
    return "oom"
  return "error"


def short_error(e: BaseException | str, limit: int = 300) -> str:
  text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def memory_figures(compiled) -> dict[str, Optional[float]]:
  """Per-device bytes of a compiled step: arguments, outputs, aliased (donated), temp, and their total."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    ma = None
  if ma is None:
    return {"args": None, "outputs": None, "alias": None, "temp": None, "total": None, "code": None}
  args, out, alias, temp = (float(ma.argument_size_in_bytes), float(ma.output_size_in_bytes),
                            float(ma.alias_size_in_bytes), float(ma.temp_size_in_bytes))
  return {"args": args, "outputs": out, "alias": alias, "temp": temp, "total": args + out - alias + temp,
          "code": float(getattr(ma, "generated_code_size_in_bytes", 0) or 0)}


def device_peak_bytes(devices) -> Optional[float]:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(float(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def measure_layout(config, layout: Layout, *, steps: int = 5, warmup: int = 1,
                   batch: BatchOptions = BatchOptions(), init: str = "synthetic",
                   cumulative_peak: bool = False) -> dict[str, Any]:
  """Compile and time the train step of one layout, in this process. Never raises: failures are rows."""
  row: dict[str, Any] = {"mesh": mesh_name(layout.mesh_dict), "remat": layout.remat, "attention": layout.attention,
                         "batch_size": layout.batch_size, "status": "error"}
  phase = "setup"
  try:
    import jax
    from cheers_jax.model.cheers import Cheers
    from cheers_jax.train import metrics as metrics_lib
    from cheers_jax.train import step as step_lib
    c = layout_config(config, layout)
    cfg = step_lib.model_config(c)
    mesh = make_layout_mesh(layout.mesh_dict)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n_dev = mesh.devices.size
    kind = mesh.devices.flat[0].device_kind
    row.update(devices=n_dev, device_kind=kind)
    if layout.batch_size % shards:
      raise SweepError(f"global batch {layout.batch_size} is not divisible by data x fsdp = {shards}")
    row["per_device_batch"] = layout.batch_size // shards
    spec = batch.spec(c, layout.batch_size)
    row["seq_len"] = spec.seq_len
    if init == "synthetic":
      state, shardings = synthetic_train_state(c, mesh, int(c.seed))
    elif init == "config":
      state, shardings = step_lib.init_train_state(c, mesh)
    else:
      raise SweepError(f"init={init!r}: use 'synthetic' or 'config'")
    host = synthetic_batch(spec)
    valid_tokens = float(np.sum(host["valid"]))
    dbatch = global_device_batch(host, mesh)
    del host
    step_fn = step_lib.make_train_step(Cheers(cfg), c, mesh, shardings)

    phase = "compile"
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, dbatch).compile()
    row["compile_s"] = time.perf_counter() - t0
    mem = memory_figures(compiled)
    row["args_gib"] = None if mem["args"] is None else mem["args"] / GIB
    row["temp_gib"] = None if mem["temp"] is None else mem["temp"] / GIB

    phase = "run"
    times, metrics = [], None
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, dbatch)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times) if times else float("nan")
    flops = metrics_lib.flops_per_sample(cfg, spec.seq_len, spec.image_size, spec.image_slots,
                                         c.train.trainable) * layout.batch_size
    util = metrics_lib.mfu(flops / step_s, n_dev, kind)
    peak = device_peak_bytes(mesh.local_devices)
    row.update(status="ok", step_s=step_s, samples_per_s=layout.batch_size / step_s, tokens_per_s=valid_tokens / step_s,
               tflops_per_device=flops / step_s / n_dev / 1e12, mfu=util,
               loss=float(jax.device_get(metrics["loss"])))
    if peak is not None:
      row.update(peak_mem_gib=peak / GIB, mem_source="device_peak_cumulative" if cumulative_peak else "device_peak")
    elif mem["total"] is not None:
      row.update(peak_mem_gib=mem["total"] / GIB, mem_source="compiled")
    del state, dbatch, compiled
  except Exception as e:  # noqa: BLE001 -- a failed layout is a row, never the end of the sweep
    status = classify_error(e)
    row.update(status=status if status == "oom" else ("compile_error" if phase == "compile" else "error"),
               error=f"[{phase}] {short_error(e)}")
  gc.collect()
  return row


# ---- many layouts -----------------------------------------------------------------------------------
def _multi_process_env() -> bool:
  """The environments in which cheers_jax.distributed starts jax.distributed (see that module)."""
  env = os.environ
  return bool(env.get("CHEERS_COORDINATOR") or int(env.get("SLURM_NTASKS", "1")) > 1
              or env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID"))


def run_isolated(config_path: str, overrides: Sequence[str], layout: Layout, *, steps: int, warmup: int,
                 batch: BatchOptions, init: str, timeout: float) -> dict[str, Any]:
  """`measure_layout` in a fresh Python process (clean device memory and peak counters)."""
  payload = {"config": config_path, "overrides": list(overrides), "layout": layout.to_json(), "steps": steps,
             "warmup": warmup, "batch": dataclasses.asdict(batch), "init": init}
  env = dict(os.environ)
  roots = [str(Path(__file__).resolve().parents[1]), os.path.dirname(os.path.dirname(os.path.abspath(
      config_path.partition(":")[0])))]
  env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
  base = {"mesh": mesh_name(layout.mesh_dict), "remat": layout.remat, "attention": layout.attention,
          "batch_size": layout.batch_size}
  try:
    proc = subprocess.run([sys.executable, "-m", "cheers_jax.sweep", "--worker", json.dumps(payload)],
                          capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {**base, "status": "timeout", "error": f"no result within {timeout:.0f} s (--timeout)"}
  for line in proc.stdout.splitlines():
    if line.startswith(ROW_PREFIX):
      return json.loads(line[len(ROW_PREFIX):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
  text = " | ".join(tail)
  status = "oom" if ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()) else "crash"
  return {**base, "status": status, "error": short_error(f"exit {proc.returncode}: {text}", 500)}


def layouts_from(meshes: Sequence[Mapping[str, int]], remats: Sequence[str], attentions: Sequence[str],
                 batch_sizes: Sequence[int]) -> list[Layout]:
  return [Layout.make(m, r, a, b) for m in meshes for r in remats for a in attentions for b in batch_sizes]


def run_sweep(config_path: str, overrides: Sequence[str], layouts: Sequence[Layout], *, steps: int = 5,
              warmup: int = 1, batch: BatchOptions = BatchOptions(), init: str = "synthetic",
              isolate: str = "auto", timeout: float = 3600.0, log=print) -> list[dict[str, Any]]:
  """Measure every layout; returns one row per layout (see FIELDS)."""
  if isolate == "auto":
    isolate = "none" if _multi_process_env() else "subprocess"
  if isolate not in ("subprocess", "none"):
    raise SweepError(f"isolate={isolate!r}: use auto, subprocess or none")
  config = None
  if isolate == "none":
    from cheers_jax import distributed
    distributed.maybe_initialize()
    config = load_config(config_path, overrides)
  rows = []
  for i, layout in enumerate(layouts):
    log(f"[{i + 1}/{len(layouts)}] {layout.name} ...")
    if isolate == "subprocess":
      row = run_isolated(config_path, overrides, layout, steps=steps, warmup=warmup, batch=batch, init=init,
                         timeout=timeout)
    else:
      row = measure_layout(config, layout, steps=steps, warmup=warmup, batch=batch, init=init, cumulative_peak=i > 0)
    log("    " + _one_line(row))
    rows.append(row)
  return rows


def _one_line(row: Mapping[str, Any]) -> str:
  if row.get("status") != "ok":
    return f"{row.get('status')}: {row.get('error', '')}"
  return (f"ok: compile {row['compile_s']:.1f} s, {row['step_s']:.3f} s/step, {row['samples_per_s']:.2f} samples/s, "
          f"peak {_fmt(row.get('peak_mem_gib'), '.2f')} GiB ({row.get('mem_source')})")


# ---- reports ----------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return format(v, spec)


def best_row(rows: Sequence[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
  ok = [r for r in rows if r.get("status") == "ok" and r.get("samples_per_s")]
  return max(ok, key=lambda r: r["samples_per_s"]) if ok else None


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(FIELDS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  cols = (("layout", 34), ("status", 13), ("compile s", 9), ("step s", 8), ("samples/s", 9), ("tokens/s", 9),
          ("TFLOP/s/dev", 11), ("MFU", 6), ("mem GiB", 8))
  lines = [" ".join(f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w) in enumerate(cols))]
  for r in rows:
    name = f"{r['mesh']} {r['remat']} {r['attention']} B={r['batch_size']}"
    vals = [name, r.get("status", "?"), _fmt(r.get("compile_s"), ".1f"), _fmt(r.get("step_s"), ".3f"),
            _fmt(r.get("samples_per_s"), ".2f"), _fmt(r.get("tokens_per_s"), ".0f"),
            _fmt(r.get("tflops_per_device"), ".3f"), _fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f"),
            _fmt(r.get("peak_mem_gib"), ".2f")]
    lines.append(" ".join(f"{v:>{w}}" if i else f"{v:<{w}}" for i, (v, (_, w)) in enumerate(zip(vals, cols))))
    if r.get("status") != "ok" and r.get("error"):
      lines.append(f"    {r['error']}")
  return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> None:
  """Two panels: samples/s per layout and peak memory per device (failed layouts marked)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [f"{r['mesh']}\n{r['remat']}/{r['attention']}/B={r['batch_size']}" for r in rows]
  ok = [r.get("status") == "ok" for r in rows]
  speed = [r.get("samples_per_s") or 0.0 for r in rows]
  mem = [r.get("peak_mem_gib") or 0.0 for r in rows]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(rows) + 4), 4.5))
  best = best_row(rows)
  colours = ["tab:green" if (best is not None and r is best) else ("tab:blue" if k else "lightgrey")
             for r, k in zip(rows, ok)]
  for ax, values, ylabel in ((axes[0], speed, "samples / s"), (axes[1], mem, "peak memory / device (GiB)")):
    ax.bar(x, values, color=colours)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel(ylabel)
    for xi, r in zip(x, rows):
      if r.get("status") != "ok":
        ax.text(xi, 0, r.get("status", "?"), ha="center", va="bottom", rotation=90, fontsize=8, color="tab:red")
  sources = sorted({r.get("mem_source") for r in rows if r.get("mem_source")})
  axes[1].set_title(f"memory ({', '.join(sources) or 'n/a'})", fontsize=9)
  axes[0].set_title("throughput (green = best)", fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- CLI ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m cheers_jax.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=False, help="config file (configs/*.py[:arg]); override values with "
                 "--config.KEY=VALUE")
  p.add_argument("--meshes", help="';'-separated meshes of AXIS=SIZE (axes data, fsdp, tensor), e.g. "
                 "'data=8;fsdp=8;fsdp=4,tensor=2' (default: the config's mesh)")
  p.add_argument("--remat", help="comma-separated remat policies: none, full, dots, dots_no_batch "
                 "(default: the config's)")
  p.add_argument("--batch-sizes", help="comma-separated GLOBAL batch sizes (default: train.batch_size)")
  p.add_argument("--attention", help="comma-separated attention implementations: xla, cudnn (default: the config's)")
  p.add_argument("--steps", type=int, default=5, help="timed steps per layout (median; default 5)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after the compile (default 1)")
  p.add_argument("--seq-len", type=int, help="static sequence length (default: the smallest data.seq_buckets)")
  p.add_argument("--text-len", type=int, help="text tokens per sample (default 120 = the reference's 400-token "
                 "samples at 512x512, or what fits seq-len)")
  p.add_argument("--gen-fraction", type=float, default=0.5, help="share of generation samples (default 0.5)")
  p.add_argument("--image-slots", type=int, default=1, help="image slots per sample (default 1; the pipeline "
                 "uses data.max_images_per_sample)")
  p.add_argument("--init", choices=("synthetic", "config"), default="synthetic",
                 help="synthetic: cheap pseudo-random state (default); config: the real init_train_state")
  p.add_argument("--out", default="sweep_out", help="output folder for sweep.csv and sweep.png")
  p.add_argument("--isolate", choices=("auto", "subprocess", "none"), default="auto",
                 help="one subprocess per layout (auto: unless jax.distributed is in use)")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per layout in subprocess mode")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  return p


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separate --config.KEY=VALUE (and '--config.KEY VALUE') from the other arguments."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      if "=" not in a and i + 1 < len(argv):
        a, i = f"{a}={argv[i + 1]}", i + 1
      overrides.append(a)
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _worker(payload: str) -> int:
  p = json.loads(payload)
  config = load_config(p["config"], p["overrides"])
  row = measure_layout(config, Layout.from_json(p["layout"]), steps=int(p["steps"]), warmup=int(p["warmup"]),
                       batch=BatchOptions(**p["batch"]), init=p["init"])
  print(ROW_PREFIX + json.dumps(row), flush=True)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = split_overrides(argv)
  args = _parser().parse_args(rest)
  if args.worker:
    return _worker(args.worker)
  if not args.config:
    _parser().error("--config is required, e.g. --config configs/tiny.py")
  try:
    config = load_config(args.config, overrides)  # fail here, once, on a bad file or override
    from cheers_jax.model.config import ModelConfig
    ModelConfig.from_dict(config.model)
    meshes = parse_meshes(args.meshes) if args.meshes else [dict(config.mesh)]
    remats = _split_list(args.remat) if args.remat else [config.model.remat_policy]
    attentions = _split_list(args.attention) if args.attention else [config.model.attention]
    batch_sizes = _split_list(args.batch_sizes, int) if args.batch_sizes else [int(config.train.batch_size)]
    batch = BatchOptions(args.seq_len, args.text_len, args.gen_fraction, args.image_slots)
    batch.spec(config, batch_sizes[0])  # check the batch composition fits before any compile
  except (SweepError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.steps < 1 or args.warmup < 0:
    print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
    return 2
  layouts = layouts_from(meshes, remats, attentions, batch_sizes)
  rows = run_sweep(args.config, overrides, layouts, steps=args.steps, warmup=args.warmup, batch=batch,
                   init=args.init, isolate=args.isolate, timeout=args.timeout)
  if _multi_process_env():
    import jax
    if jax.process_index() != 0:
      return 0
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  write_csv(rows, out / "sweep.csv")
  plot(rows, out / "sweep.png", title=f"{args.config} {' '.join(overrides)}".strip())
  print("\n" + format_table(rows))
  best = best_row(rows)
  if best is None:
    print("\nno layout ran; see the errors above")
  else:
    print(f"\nbest layout: {best['mesh']} remat={best['remat']} attention={best['attention']} "
          f"batch={best['batch_size']}: {best['samples_per_s']:.2f} samples/s, {best['step_s']:.3f} s/step, "
          f"peak {_fmt(best.get('peak_mem_gib'), '.2f')} GiB/device")
    print(f"  -> --config.mesh.data={dict(best_mesh(best)).get('data', 1)} "
          f"--config.mesh.fsdp={dict(best_mesh(best)).get('fsdp', 1)} "
          f"--config.mesh.tensor={dict(best_mesh(best)).get('tensor', 1)} --config.model.remat_policy={best['remat']} "
          f"--config.model.attention={best['attention']}")
  print(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}")
  return 0 if best is not None else 1


def best_mesh(row: Mapping[str, Any]) -> dict[str, int]:
  mesh = {a: 1 for a in MESH_AXES}
  mesh.update(parse_meshes(row["mesh"])[0])
  return mesh


if __name__ == "__main__":
  sys.exit(main())
