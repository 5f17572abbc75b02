"""Load and save the published (Hugging Face / PyTorch) Cheers checkpoint layout.

Our variables are {'params', 'batch_stats'} with scanned layer stacks and JAX layouts; the HF
checkpoint has one tensor per layer under `model.<module>.…` in torch layouts. `hf_name_map` derives
the HF name of every leaf from a short list of regex rules; loading streams tensor by tensor from
memory-mapped safetensors so no full host copy of the model is ever built.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cheers_jax.checkpoint import safetensors_io as st
from cheers_jax.errors import UserError
from cheers_jax.model.cheers import init_variables
from cheers_jax.model.config import ConfigError, ModelConfig

PathLike = Union[str, Path]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default "5GB"
_MAX_LISTED = 20

# ModelConfig fields that change no tensor: a caller's cfg may override these on load.
NUMERIC_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention", "reference_bf16_casts")


class CheckpointError(UserError):
  """A checkpoint does not match the model (names, shapes, files); the message says which."""


# ---- names ---------------------------------------------------------------------------------------
# Applied in order to our path without its collection ('params/' or 'batch_stats/'); '{i}' marks a
# scanned stack's layer index. Whatever no rule touches keeps its name ('/' -> '.').
_RULES: tuple[tuple[str, str], ...] = (
  # VAE: down_{l}_block_{i} -> down.{l}.block.{i}, resampling convs sit one level deeper
  (r"/(down|up)_(\d+)_block_(\d+)/", r"/\1/\2/block/\3/"),
  (r"/down_(\d+)_downsample/", r"/down/\1/downsample/conv/"),
  (r"/up_(\d+)_upsample/", r"/up/\1/upsample/conv/"),
  # SigLIP
  (r"^vision_representation/embeddings/(kernel|bias)$", r"vision_representation/embeddings/patch_embedding/\1"),
  (r"^vision_representation/embeddings/position_embedding$", r"\g<0>/weight"),
  (r"^vision_representation/layers/", "vision_representation/encoder/layers/{i}/"),
  (r"^vision_representation/head/(in_proj_kernel|in_proj_bias|out_proj/)", r"vision_representation/head/attention/\1"),
  # small MLPs that are nn.Sequential in torch
  (r"^und_projector/fc1/", "und_projector/mlp/0/"),
  (r"^und_projector/fc2/", "und_projector/mlp/2/"),
  (r"^time_embed/mlp_(\d)_(\d)/", r"time_embed/mlp_\1/\2/"),
  (r"^hi_gate/gate_(\d)/", r"hi_gate/gate/\1/"),
  # DiT projectors: scanned blocks = diffusion_head_a.{i}, final layer = diffusion_head_b
  (r"_projector/blocks/adaLN_modulation/", "_projector/diffusion_head_a/{i}/adaLN_modulation/1/"),
  (r"_projector/blocks/([qkvo]_proj)/", r"_projector/diffusion_head_a/{i}/attn/\1/"),
  (r"_projector/blocks/", "_projector/diffusion_head_a/{i}/"),
  (r"_projector/final_layer/adaLN_modulation/", "_projector/diffusion_head_b/adaLN_modulation/1/"),
  (r"_projector/final_layer/", "_projector/diffusion_head_b/"),
  # Qwen2
  (r"^language_model/embed_tokens$", "language_model/embed_tokens/weight"),
  (r"^language_model/layers/", "language_model/layers/{i}/"),
  (r"kernel$", "weight"),
)
_RULES_RE = tuple((re.compile(p), r) for p, r in _RULES)


@dataclasses.dataclass(frozen=True)
class HFEntry:
  """Where one of our leaves lives in the HF checkpoint."""

  name: str  # HF tensor name; contains '{i}' for a scanned stack
  transform: str  # 'none' | 'linear' (transpose) | 'conv' (HWIO <-> OIHW)
  num_layers: Optional[int]  # length of the leading layer axis of a scanned stack, else None

  def names(self) -> list[str]:
    if self.num_layers is None:
      return [self.name]
    return [self.name.format(i=i) for i in range(self.num_layers)]


def _leaf_transform(path: str, ndim: int) -> str:
  leaf = path.rsplit("/", 1)[-1]
  if leaf in ("kernel", "in_proj_kernel", "lm_head"):
    if ndim == 2:
      return "linear"
    if ndim == 4:
      return "conv"
    raise CheckpointError(f"don't know the torch layout of {path} with {ndim} dims")
  return "none"


def hf_name_of(path: str) -> str:
  """Our flat path ('params/…' or 'batch_stats/…') -> HF name (with '{i}' for scanned stacks)."""
  _, rest = path.split("/", 1)
  if rest == "language_model/lm_head":  # untied head: the one top-level tensor
    return LM_HEAD
  for pattern, repl in _RULES_RE:
    rest = pattern.sub(repl, rest)
  return "model." + rest.replace("/", ".")


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/a/b': shape} of a (possibly boxed, possibly abstract) variables tree."""
  flat = traverse_util.flatten_dict(nn.unbox(_to_dict(tree)), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def _to_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def hf_name_map(variables_shape_tree: Any) -> dict[str, HFEntry]:
  """Our flat path -> HFEntry (name template, transform, layer count) for every leaf."""
  out = {}
  for path, shape in _flat_shapes(variables_shape_tree).items():
    name = hf_name_of(path)
    stacked = "{i}" in name
    out[path] = HFEntry(name, _leaf_transform(path, len(shape) - stacked), shape[0] if stacked else None)
  return out


def hf_tensor(variables: Any, name: str) -> np.ndarray:
  """The HF tensor `name` (torch layout) taken from our variables tree (or a same-shaped tree, e.g.
  gradients wrapped as {'params': grads}). Raises KeyError when no leaf maps to it."""
  flat = traverse_util.flatten_dict(nn.unbox(_to_dict(variables)), sep="/")
  for path, entry in hf_name_map(variables).items():
    names = entry.names()
    if name in names:
      x = np.asarray(flat[path])
      if entry.num_layers is not None:
        x = x[names.index(name)]
      return _to_torch(x, entry.transform)
  raise KeyError(f"no parameter maps to the HF tensor '{name}'")


def to_torch_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  if transform == "linear":
    return shape[::-1]
  if transform == "conv":
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  return tuple(shape)


def _from_torch(x: np.ndarray, transform: str) -> np.ndarray:
  """Torch layout -> ours, as a view (no copy)."""
  if transform == "linear":
    return x.T
  if transform == "conv":
    return x.transpose(2, 3, 1, 0)
  return x


def _to_torch(x: np.ndarray, transform: str) -> np.ndarray:
  if transform == "linear":
    return x.T
  if transform == "conv":
    return x.transpose(3, 2, 0, 1)
  return x


def _num_batches_tracked(paths: Iterable[str]) -> list[str]:
  """HF BatchNorm counters: one per `bn` whose running stats we keep in batch_stats."""
  return [
    hf_name_of(p).rsplit(".", 1)[0] + ".num_batches_tracked"
    for p in paths
    if p.startswith("batch_stats/") and p.endswith("/running_mean")
  ]


def _tied(flat_shapes: Mapping[str, Any]) -> bool:
  return "params/language_model/lm_head" not in flat_shapes


def hf_tensor_shapes(variables_shape_tree: Any, store_lm_head: bool = True) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name -> torch shape, as `save_hf_checkpoint` writes them.

  Includes the BatchNorm `num_batches_tracked` counters (shape ()) and, when the embeddings are tied
  and `store_lm_head`, `lm_head.weight` (a copy of embed_tokens).
  """
  shapes = _flat_shapes(variables_shape_tree)
  out = {}
  for path, entry in hf_name_map(variables_shape_tree).items():
    per_layer = shapes[path][1:] if entry.num_layers is not None else shapes[path]
    for name in entry.names():
      out[name] = to_torch_shape(per_layer, entry.transform)
  for name in _num_batches_tracked(shapes):
    out[name] = ()
  if _tied(shapes) and store_lm_head:
    out[LM_HEAD] = shapes["params/language_model/embed_tokens"]
  return out


def module_param_counts(variables_shape_tree: Any) -> dict[str, int]:
  """Number of values per top-level module (params and BatchNorm statistics together)."""
  counts: dict[str, int] = {}
  for path, shape in _flat_shapes(variables_shape_tree).items():
    module = path.split("/")[1]
    counts[module] = counts.get(module, 0) + math.prod(shape)
  return counts


@functools.lru_cache(maxsize=8)
def abstract_variables(cfg: ModelConfig) -> dict:
  """Unboxed ShapeDtypeStruct tree {'params', 'batch_stats'} of the model `cfg` describes."""
  return nn.unbox(jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0))))


# ---- config --------------------------------------------------------------------------------------
def read_hf_config(ckpt_dir: PathLike) -> ModelConfig:
  path = Path(ckpt_dir) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{path} not found: an HF checkpoint directory needs its config.json")
  try:
    return ModelConfig.from_hf_dict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from e


def _merge_numerics(file_cfg: ModelConfig, cfg: Optional[ModelConfig]) -> ModelConfig:
  """The checkpoint decides the architecture; `cfg` only contributes NUMERIC_FIELDS."""
  if cfg is None:
    return file_cfg
  merged = file_cfg.replace(**{f: getattr(cfg, f) for f in NUMERIC_FIELDS})
  mine, theirs = _flat_cfg(cfg), _flat_cfg(merged)
  diffs = [f"{k}={mine[k]!r} (checkpoint: {theirs[k]!r})" for k in mine if mine[k] != theirs[k]]
  if diffs:
    warnings.warn(
      "the given cfg differs from the checkpoint's config.json in "
      + ", ".join(diffs)
      + "; using the checkpoint's values",
      stacklevel=4,
    )
  return merged


def _flat_cfg(cfg: ModelConfig) -> dict[str, Any]:
  return traverse_util.flatten_dict(cfg.to_dict(), sep=".")


# ---- loading -------------------------------------------------------------------------------------
def _listing(label: str, names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  more = f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return f"{len(names)} {label}: {shown}{more}"


def open_tensor_files(ckpt_dir: PathLike) -> dict[str, st.SafetensorsFile]:
  """HF tensor name -> the open file holding it. Follows `model.safetensors.index.json` (or the one
  `*.safetensors.index.json`) when there is one, else reads `model.safetensors`, else every
  `*.safetensors` of the directory (a part such as the FLUX.2 VAE ships as `ae.safetensors`)."""
  ckpt_dir = Path(ckpt_dir)
  index_path, single = ckpt_dir / INDEX_FILE, ckpt_dir / SINGLE_FILE
  if not index_path.is_file() and ckpt_dir.is_dir():
    indexes = sorted(ckpt_dir.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
      raise CheckpointError(
        f"{ckpt_dir}: several safetensors indexes ({', '.join(p.name for p in indexes)}); "
        "keep the one that belongs to these weights"
      )
    index_path = indexes[0] if indexes else index_path
  if index_path.is_file():
    try:
      weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index_path} is not a valid index (needs a 'weight_map'): {e}") from e
    paths = None
  else:
    weight_map = None
    paths = [single] if single.is_file() else sorted(ckpt_dir.glob("*.safetensors")) if ckpt_dir.is_dir() else []
    if not paths:
      found = sorted(p.name for p in ckpt_dir.iterdir()) if ckpt_dir.is_dir() else "directory does not exist"
      raise CheckpointError(
        f"{ckpt_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} (nor any *.safetensors) found ({found})"
      )

  def open_file(path: Path) -> st.SafetensorsFile:
    try:
      return st.SafetensorsFile(path)
    except st.SafetensorsFormatError as e:
      raise CheckpointError(str(e)) from e

  if weight_map is None:
    out: dict[str, st.SafetensorsFile] = {}
    for path in paths:
      f = open_file(path)
      twice = [n for n in f.keys() if n in out]
      if twice:
        raise CheckpointError(
          f"{ckpt_dir}: {_listing('tensors', twice)} are stored both in "
          f"{out[twice[0]].path.name} and {path.name}; without an index the files must "
          "not overlap"
        )
      out.update({name: f for name in f.keys()})
    return out
  by_file: dict[str, list[str]] = {}
  for name, fname in weight_map.items():
    by_file.setdefault(fname, []).append(name)
  absent = [
    f"'{f}' ({len(n)} tensors, e.g. '{n[0]}')" for f, n in sorted(by_file.items()) if not (ckpt_dir / f).is_file()
  ]
  if absent:
    raise CheckpointError(f"{index_path} references shard files that are missing: {', '.join(absent)}")
  out = {}
  for fname, names in by_file.items():
    f = open_file(ckpt_dir / fname)
    lost = [n for n in names if n not in f]
    if lost:
      raise CheckpointError(f"{index_path} maps {_listing('tensors', lost)} to '{fname}', which does not hold them")
    out.update({n: f for n in names})
  return out


def shardings_by_path(shardings: Any) -> Callable[[str], Optional[jax.sharding.Sharding]]:
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return lambda path: shardings
  shardings = nn.unbox(shardings)  # a tree mirroring the boxed variables works too
  leaves = jax.tree_util.tree_flatten_with_path(
    shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding) or x is None
  )[0]
  flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): s for p, s in leaves}

  def get(path: str) -> Optional[jax.sharding.Sharding]:
    if path not in flat:
      raise CheckpointError(f"the shardings tree has no entry for '{path}'")
    return flat[path]

  return get


def leaf_reader(
  entry: HFEntry, files: Mapping[str, st.SafetensorsFile], dtype: np.dtype
) -> Callable[[tuple], np.ndarray]:
  """index (tuple of slices, in our layout) -> a fresh host array of just that part."""
  views = [_from_torch(files[n].get(n), entry.transform) for n in entry.names()]  # memmap views

  def read(index: tuple = ()) -> np.ndarray:
    index = tuple(index)
    if entry.num_layers is None:
      return np.array(views[0][index], dtype=dtype)  # np.array copies: the result owns its memory
    layers = range(entry.num_layers)[index[0] if index else slice(None)]
    rest = index[1:]
    first = views[0][rest]
    out = np.empty((len(layers),) + first.shape, dtype)
    for j, l in enumerate(layers):
      out[j] = views[l][rest]
    return out

  return read


def _check_tied_head(files: Mapping[str, st.SafetensorsFile]) -> None:
  embed, head = files[EMBED].get(EMBED), files[LM_HEAD].get(LM_HEAD)
  rows = sorted({0, embed.shape[0] // 2, embed.shape[0] - 1})
  if not np.array_equal(embed[rows].astype(np.float32), head[rows].astype(np.float32)):
    warnings.warn(
      f"{LM_HEAD} differs from {EMBED} (rows {rows}) although tie_word_embeddings is true; "
      "using the embeddings as the head and ignoring lm_head.weight",
      stacklevel=4,
    )


def check_tensors(
  files: Mapping[str, st.SafetensorsFile],
  required: Mapping[str, tuple[int, ...]],
  optional: Mapping[str, Optional[tuple[int, ...]]],
  where: str,
  model: str,
) -> None:
  """Raises one CheckpointError listing every missing / unexpected tensor, else every tensor whose
  shape differs from `required` (or from `optional`'s shape, where one is given) or whose dtype is not
  floating. Reads headers only. `where` names the source ('checkpoint DIR'), `model` what it must fit."""
  missing = sorted(set(required) - set(files))
  unexpected = sorted(set(files) - set(required) - set(optional))
  if missing or unexpected:
    parts = ([_listing("missing tensors", missing)] if missing else []) + (
      [_listing("unexpected tensors", unexpected)] if unexpected else []
    )
    raise CheckpointError(f"{where} does not match {model}:\n  " + "\n  ".join(parts))
  checked = dict(required)
  checked.update({n: s for n, s in optional.items() if s is not None and n in files})
  bad = []
  for name, shape in checked.items():
    info = files[name].tensors[name]
    if info.shape != tuple(shape):
      bad.append(f"'{name}' has shape {info.shape} in {files[name].path.name}, the model expects {tuple(shape)}")
    elif not (np.issubdtype(info.dtype, np.floating) or info.dtype == np.dtype(jnp.bfloat16)):
      bad.append(f"'{name}' has non-float dtype {info.dtype} in {files[name].path.name}")
  if bad:
    raise CheckpointError(
      f"{where}: {len(bad)} tensors do not fit the model:\n  "
      + "\n  ".join(bad[:_MAX_LISTED])
      + (f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")
    )


def place_leaves(
  readers: Mapping[str, Callable[[tuple], np.ndarray]], shapes: Mapping[str, tuple[int, ...]], shardings: Any
) -> dict[str, jax.Array]:
  """{path: array}: each leaf built from its reader (index -> host array), one leaf (or one shard of
  it, when `shardings` gives it one) in host memory at a time. `shardings` as in load_hf_checkpoint."""
  sharding_of = shardings_by_path(shardings)
  flat = {}
  for path, read in readers.items():
    sharding = sharding_of(path)
    if sharding is None:
      flat[path] = jnp.asarray(read(()))
    else:
      flat[path] = jax.make_array_from_callback(shapes[path], sharding, read)
  return flat


def open_hf_checkpoint(
  ckpt_dir: PathLike, cfg: Optional[ModelConfig] = None
) -> tuple[ModelConfig, dict[str, st.SafetensorsFile]]:
  """(config, {HF name: open file}) of a Cheers checkpoint whose tensors have been checked against its
  config.json (headers only: nothing is read yet). `cfg` as in load_hf_checkpoint."""
  ckpt_dir = Path(ckpt_dir)
  if not (ckpt_dir / CONFIG_FILE).is_file():
    read_hf_config(ckpt_dir)  # the error naming the missing config.json
  files = open_tensor_files(ckpt_dir)  # before the config's values: is it a checkpoint at all?
  cfg = _merge_numerics(read_hf_config(ckpt_dir), cfg)
  abstract = abstract_variables(cfg)
  shapes = _flat_shapes(abstract)
  expected = hf_tensor_shapes(abstract, store_lm_head=False)
  optional: dict[str, Optional[tuple[int, ...]]] = dict.fromkeys(_num_batches_tracked(shapes))  # ignored
  tied = _tied(shapes)
  if tied:
    optional[LM_HEAD] = shapes["params/language_model/embed_tokens"]
  required = {n: s for n, s in expected.items() if n not in optional}
  check_tensors(files, required, optional, f"checkpoint {ckpt_dir}", "the model its config.json describes")
  if tied and LM_HEAD in files:
    _check_tied_head(files)
  return cfg, files


def load_hf_checkpoint(
  ckpt_dir: PathLike, cfg: Optional[ModelConfig] = None, dtype: Any = jnp.float32, shardings: Any = None
) -> tuple[ModelConfig, dict]:
  """Reads an HF-layout Cheers checkpoint into {'params', 'batch_stats'} (unboxed arrays).

  Args:
    ckpt_dir: directory with config.json and model.safetensors(.index.json + shards).
    cfg: optional; only its NUMERIC_FIELDS are used (the architecture comes from config.json).
    dtype: dtype of every returned array.
    shardings: None (default placement), one Sharding for all leaves, or a tree like the variables
      with a Sharding per leaf; each leaf is then built shard by shard from the memory-mapped file.
  Returns:
    (config, variables).
  """
  cfg, files = open_hf_checkpoint(ckpt_dir, cfg)
  abstract = abstract_variables(cfg)
  np_dtype = np.dtype(dtype)
  shapes = _flat_shapes(abstract)
  name_map = hf_name_map(abstract)
  readers = {path: leaf_reader(entry, files, np_dtype) for path, entry in name_map.items()}
  return cfg, traverse_util.unflatten_dict(place_leaves(readers, shapes, shardings), sep="/")


# ---- saving --------------------------------------------------------------------------------------
def save_hf_checkpoint(
  variables: Any,
  cfg: ModelConfig,
  out_dir: PathLike,
  dtype: Any = "bfloat16",
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  store_lm_head: bool = True,
) -> dict:
  """Writes config.json, sharded safetensors and the index in the published layout.

  Args:
    variables: {'params', 'batch_stats'} (boxed or not) matching `cfg`; each leaf must be fully
      addressable from this process (it is fetched to host one leaf at a time).
    dtype: storage dtype of the floating tensors ('bfloat16', 'float32', ...; None keeps each leaf's).
    store_lm_head: with tied embeddings, also write `lm_head.weight` (a copy of embed_tokens) as the
      published checkpoint does; an untied head is always written.
  Returns:
    the index dict that was written.
  """
  out_dir = Path(out_dir)
  flat = traverse_util.flatten_dict(nn.unbox(_to_dict(variables)), sep="/")
  want = _flat_shapes(abstract_variables(cfg))
  have = {k: tuple(v.shape) for k, v in flat.items()}
  if have != want:
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    raise CheckpointError(
      "variables do not match cfg: "
      + "; ".join(f"{k}: have {have.get(k)}, cfg wants {want.get(k)}" for k in diff[:_MAX_LISTED])
      + (f"; ... and {len(diff) - _MAX_LISTED} more" if len(diff) > _MAX_LISTED else "")
    )

  host_cache: dict[str, np.ndarray] = {}

  def host(path: str) -> np.ndarray:
    # keep only the leaf being written: its layers are consecutive in the file
    if path not in host_cache:
      host_cache.clear()
      host_cache[path] = np.asarray(jax.device_get(flat[path]))
    return host_cache[path]

  def produce(path: str, layer: Optional[int], transform: str, out: np.dtype) -> np.ndarray:
    x = host(path)
    x = x[layer] if layer is not None else x
    return np.asarray(_to_torch(x, transform), dtype=out, order="C")

  tensors: dict[str, st.LazyTensor] = {}
  for path, entry in hf_name_map(flat).items():
    out = np.dtype(dtype) if dtype is not None else np.dtype(flat[path].dtype)
    per_layer = have[path][1:] if entry.num_layers is not None else have[path]
    for i, name in enumerate(entry.names()):
      layer = i if entry.num_layers is not None else None
      tensors[name] = st.LazyTensor(
        to_torch_shape(per_layer, entry.transform), out, functools.partial(produce, path, layer, entry.transform, out)
      )
  for name in _num_batches_tracked(flat):
    tensors[name] = st.LazyTensor((), np.dtype(np.int64), lambda: np.zeros((), np.int64))
  if _tied(flat) and store_lm_head:
    path = "params/language_model/embed_tokens"
    out = np.dtype(dtype) if dtype is not None else np.dtype(flat[path].dtype)
    tensors[LM_HEAD] = st.LazyTensor(have[path], out, functools.partial(produce, path, None, "none", out))

  out_dir.mkdir(parents=True, exist_ok=True)
  hf_cfg = cfg.to_hf_dict()
  if dtype is not None:
    hf_cfg["torch_dtype"] = np.dtype(dtype).name
  (out_dir / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2) + "\n")
  return st.save_sharded(tensors, out_dir, max_shard_bytes, metadata={"format": "pt"})
