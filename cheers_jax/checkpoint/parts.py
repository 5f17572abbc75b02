"""Pretrained parts -> Cheers: the FLUX.2 VAE, SigLIP2 and Qwen2.5, each in its published layout.

The paper's stage 1 starts from three pretrained parts, not from a Cheers checkpoint. As the official
training script does (`--model.vae_weights`, `--model.siglip2_weights`,
`--model.language_model_weights_path`):
- every VAE tensor `k` goes to both `vae_model.k` and `vae_decoder_projector.k` (the projector holds
  only a decoder and the latent BatchNorm, so it takes the `decoder.*` and `bn.*` tensors);
- SigLIP2's `vision_model.*` goes to `vision_representation.*`; the text tower is ignored;
- Qwen2.5's `model.*` goes to `language_model.*`; its embedding rows fill the first rows of Cheers'
  table (a larger Cheers vocabulary keeps random rows after them). A tied Cheers reads no `lm_head`
  (as the official code, whose copy of it lands in the tied table and is overwritten by the embedding
  rows); an untied one takes the part's `lm_head.weight`, or, when a tied part stores none, its
  embeddings (the official code would leave that head random);
and every other module (projectors, CFM head, time embedding, gate) keeps the normal random init.

Part directories hold `*.safetensors` (with or without an index) and, for SigLIP2 and Qwen2.5, their
Hugging Face `config.json`, which must agree with the model config. The VAE (BFL layout:
`encoder.down.N.block.M...`, `bn.running_mean`, ...) has no published config; a `config.json` with the
Cheers VAE keys (`ch`, `ch_mult`, ...) is checked when present.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cheers_jax import config as config_lib
from cheers_jax.checkpoint import safetensors_io as st
from cheers_jax.checkpoint.hf import (
  CONFIG_FILE,
  DEFAULT_MAX_SHARD_BYTES,
  LM_HEAD,
  CheckpointError,
  HFEntry,
  _flat_shapes,
  abstract_variables,
  check_tensors,
  hf_name_map,
  hf_tensor_shapes,
  leaf_reader,
  open_hf_checkpoint,
  open_tensor_files,
  place_leaves,
  save_hf_checkpoint,
  shardings_by_path,
)
from cheers_jax.model.cheers import init_variables
from cheers_jax.model.config import ConfigError, ModelConfig

PathLike = Union[str, Path]
PARTS = ("vae", "siglip", "llm")
PART_TITLES = {"vae": "FLUX.2 VAE", "siglip": "SigLIP2", "llm": "Qwen2.5"}
VAE_FILE = "ae.safetensors"  # the name BFL ships the FLUX.2 autoencoder under
LLM_EMBED = "model.embed_tokens.weight"
SIGLIP_PREFIX = "vision_model."
COUNTER = ".num_batches_tracked"

# Cheers HF name prefix -> (part, the prefix of the same tensor in the part). Both VAE copies read the
# one VAE; `vae_model` comes first, so it is the copy `split_hf_checkpoint` writes out.
_ROUTES = (
  ("model.vae_model.", "vae", ""),
  ("model.vae_decoder_projector.", "vae", ""),
  ("model.vision_representation.", "siglip", SIGLIP_PREFIX),
  ("model.language_model.", "llm", "model."),
)

# (key in the part's HF config.json, our field, the HF config class's default when the file omits it)
_LLM_FIELDS = (
  ("hidden_size", "hidden_size", 4096),
  ("intermediate_size", "intermediate_size", 22016),
  ("num_hidden_layers", "num_layers", 32),
  ("num_attention_heads", "num_heads", 32),
  ("num_key_value_heads", "num_kv_heads", 32),
  ("rope_theta", "rope_theta", 10000.0),
  ("rms_norm_eps", "rms_norm_eps", 1e-6),
)
_SIGLIP_FIELDS = (
  ("hidden_size", "hidden_size", 768),
  ("intermediate_size", "intermediate_size", 3072),
  ("num_hidden_layers", "num_layers", 12),
  ("num_attention_heads", "num_heads", 12),
  ("patch_size", "patch_size", 16),
  ("image_size", "image_size", 224),
  ("layer_norm_eps", "layer_norm_eps", 1e-6),
)
_VAE_FIELDS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch")  # checked if present


# ---- names ---------------------------------------------------------------------------------------
def part_tensor_name(cheers_name: str) -> Optional[tuple[str, str]]:
  """Cheers HF tensor name (or '{i}' template) -> (part, the part's name for it); None for modules
  that no part provides (they stay random)."""
  if cheers_name == LM_HEAD:
    return "llm", LM_HEAD
  for prefix, part, part_prefix in _ROUTES:
    if cheers_name.startswith(prefix):
      return part, part_prefix + cheers_name[len(prefix) :]
  return None


def cheers_source_name(part: str, part_name: str) -> str:
  """The part tensor's name in a Cheers checkpoint (the `vae_model` copy for the VAE)."""
  for prefix, p, part_prefix in _ROUTES:
    if p == part and part_name.startswith(part_prefix):
      return prefix + part_name[len(part_prefix) :]
  if part == "llm" and part_name == LM_HEAD:
    return LM_HEAD
  raise KeyError(f"'{part_name}' is not a {part} tensor Cheers holds")


def part_layouts(cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
  """{part: {tensor name in the part's layout: torch shape}} of the parts `cfg` is built from; the
  BatchNorm counter (`bn.num_batches_tracked`, shape ()) included. The LLM has `lm_head.weight` only
  when Cheers' head is untied (a tied part stores none, as Qwen2.5-1.5B)."""
  out: dict[str, dict[str, tuple[int, ...]]] = {p: {} for p in PARTS}
  for name, shape in hf_tensor_shapes(abstract_variables(cfg), store_lm_head=False).items():
    routed = part_tensor_name(name)
    if routed is not None:
      part, part_name = routed
      if out[part].setdefault(part_name, shape) != shape:
        raise CheckpointError(f"the two VAE copies disagree on '{part_name}': {out[part][part_name]} vs {shape}")
  return out


# ---- part config.json ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
  try:
    value = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} is not a JSON object")
  return value


def _disagreements(values: Mapping[str, Any], fields, ours: Any, ours_label: str) -> list[str]:
  out = []
  for key, field, default in fields:
    value = values.get(key, default)
    if value is None:  # only compared when given
      continue
    mine = getattr(ours, field)
    if (tuple(value) if isinstance(value, list) else value) != mine:
      out.append(f"{key}={value!r} but the model config has {ours_label}.{field}={mine!r}")
  return out


def check_part_config(part: str, part_dir: PathLike, cfg: ModelConfig) -> None:
  """Raises a CheckpointError naming every config.json field of the part that disagrees with `cfg`
  (both values). Fields the file omits take the Hugging Face class default, as transformers reads them."""
  path = Path(part_dir) / CONFIG_FILE
  if not path.is_file():
    if part == "vae":
      return  # the FLUX.2 VAE is published without one
    raise CheckpointError(
      f"{part} part {part_dir}: {CONFIG_FILE} not found (the {PART_TITLES[part]} layout "
      "ships one; it is checked against the model config)"
    )
  hf = _read_json(path)
  if part == "llm":
    bad = _disagreements(hf, _LLM_FIELDS, cfg.text, "text")
    vocab = hf.get("vocab_size", 151936)
    if vocab > cfg.text.vocab_size:
      bad.append(
        f"vocab_size={vocab} is larger than the model config's text.vocab_size={cfg.text.vocab_size} "
        "(the part's embedding rows are copied into the first rows)"
      )
  elif part == "siglip":
    vision = hf.get("vision_config", hf)  # a SiglipModel config nests it; a vision-only one does not
    bad = _disagreements(vision, _SIGLIP_FIELDS, cfg.vision, "vision")
  else:
    bad = _disagreements(hf, [(k, k, None) for k in _VAE_FIELDS], cfg.vae, "vae")
  if bad:
    raise CheckpointError(f"{part} part {path} disagrees with the model config: " + "; ".join(bad))


def part_config(part: str, cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
  """The config.json a part of `cfg`'s shapes ships with (Hugging Face layout for SigLIP2 / Qwen2.5;
  the Cheers VAE keys for the VAE)."""
  if part == "vae":
    v = cfg.vae
    return {
      "resolution": v.resolution,
      "in_channels": v.in_channels,
      "ch": v.ch,
      "out_ch": v.out_ch,
      "ch_mult": list(v.ch_mult),
      "num_res_blocks": v.num_res_blocks,
      "z_channels": v.z_channels,
    }
  if part == "siglip":
    v = cfg.vision
    return {
      "architectures": ["SiglipModel"],
      "model_type": "siglip",
      "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": "gelu_pytorch_tanh",
        "attention_dropout": 0.0,
      },
    }
  t = cfg.text
  return {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": t.hidden_size,
    "intermediate_size": t.intermediate_size,
    "num_hidden_layers": t.num_layers,
    "num_attention_heads": t.num_heads,
    "num_key_value_heads": t.num_kv_heads,
    "vocab_size": t.vocab_size,
    "rope_theta": t.rope_theta,
    "rms_norm_eps": t.rms_norm_eps,
    "tie_word_embeddings": t.tie_word_embeddings,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "torch_dtype": torch_dtype,
  }


# ---- opening and checking a part -----------------------------------------------------------------
def _is_vocab_tensor(part: str, name: str) -> bool:
  return part == "llm" and name in (LLM_EMBED, LM_HEAD)


def open_part(part: str, part_dir: PathLike, cfg: ModelConfig) -> dict[str, st.SafetensorsFile]:
  """{tensor name: open file} of the part tensors `cfg` uses, after checking the part's config.json
  and every name and shape against `cfg` (headers only)."""
  if part not in PARTS:
    raise CheckpointError(f"unknown part '{part}': the parts are {', '.join(PARTS)}")
  part_dir = Path(part_dir)
  if not part_dir.is_dir():
    raise CheckpointError(f"{part} part {part_dir}: no such directory (want the {PART_TITLES[part]} weights)")
  check_part_config(part, part_dir, cfg)
  files = open_tensor_files(part_dir)
  if part == "siglip":  # the text tower (and logit scale / bias) is not part of Cheers
    ignored = "\0" if cfg.vision.use_head else SIGLIP_PREFIX + "head."
    files = {n: f for n, f in files.items() if n.startswith(SIGLIP_PREFIX) and not n.startswith(ignored)}
  layout = part_layouts(cfg)[part]
  optional: dict[str, Optional[tuple[int, ...]]] = {n: None for n in layout if n.endswith(COUNTER)}
  required = {n: s for n, s in layout.items() if n not in optional}
  if part == "llm" and LM_HEAD in files and LM_HEAD not in required:
    optional[LM_HEAD] = None  # a tied Cheers has no head of its own to fill
  if part == "llm" and LM_HEAD in required and LM_HEAD not in files:
    del required[LM_HEAD]  # an untied Cheers takes a tied part's embeddings as its head
  for name in (LLM_EMBED, LM_HEAD):
    # fewer vocabulary rows than Cheers is fine: they fill the first rows, the rest stay random
    if _is_vocab_tensor(part, name) and name in required and name in files:
      have, want = files[name].tensors[name].shape, required[name]
      if len(have) == len(want) and have[1:] == want[1:] and have[0] <= want[0]:
        required[name] = have
  check_tensors(files, required, optional, f"{part} part {part_dir}", "the model config")
  return files


# ---- loading -------------------------------------------------------------------------------------
def _our_shape(torch_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  if transform == "linear":
    return tuple(torch_shape[::-1])
  if transform == "none":
    return tuple(torch_shape)
  raise ValueError(f"no vocabulary tensor has the '{transform}' layout")


def _index_key(index: tuple, shape: tuple[int, ...]) -> tuple:
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _corner_reader(base: jax.Array, read_part, part_shape: tuple[int, ...], dtype: np.dtype):
  """index -> `base`'s values there, with the part's array written over the corner at the origin it
  covers (the part's vocabulary rows of an embedding table or head)."""
  by_index = {_index_key(s.index, base.shape): s.data for s in base.addressable_shards}

  def read(index: tuple = ()) -> np.ndarray:
    key = _index_key(index, base.shape)
    out = np.array(by_index[key], dtype)  # the callback asks for this process's shards only
    if all(a < n for (a, _), n in zip(key, part_shape)):
      stops = [min(b, n) for (_, b), n in zip(key, part_shape)]
      out[tuple(slice(0, s - a) for (a, _), s in zip(key, stops))] = read_part(
        tuple(slice(a, s) for (a, _), s in zip(key, stops))
      )
    return out

  return read


@functools.lru_cache(maxsize=4)
def _random_init_program(cfg: ModelConfig, out_shardings: Optional[tuple], only: Optional[tuple]) -> Any:
  flat_shardings = None if out_shardings is None else dict(out_shardings)

  def init(rng):
    flat = traverse_util.flatten_dict(nn.unbox(init_variables(cfg, rng)), sep="/")
    return flat if only is None else {p: flat[p] for p in only}

  return jax.jit(init, out_shardings=flat_shardings) if flat_shardings is not None else jax.jit(init)


def random_variables(
  cfg: ModelConfig, rng: jax.Array, shardings: Any = None, only: Optional[Iterable[str]] = None
) -> dict[str, jax.Array]:
  """{flat path: array} of `init_variables(cfg, rng)`, created with `shardings` (as load_hf_checkpoint's);
  the jitted program is kept for the next call with the same model, shardings and `only`.

  only: the paths to draw (default: all). Each leaf's value does not depend on which others are drawn
  (flax folds the module path into the key); the rest is never computed, which cuts the compile (the tiny
  model with its VAE and ViT parts loaded: 16 s -> 5 s on 2 CPU cores).
  """
  only = None if only is None else tuple(sorted(only))
  if shardings is None:
    return _random_init_program(cfg, None, only)(rng)
  sharding_of = shardings_by_path(shardings)
  paths = _flat_shapes(abstract_variables(cfg)) if only is None else only
  return _random_init_program(cfg, tuple((p, sharding_of(p)) for p in paths), only)(rng)


def load_parts(
  parts: Mapping[str, PathLike], cfg: ModelConfig, rng: jax.Array, dtype: Any = np.float32, shardings: Any = None
) -> dict:
  """{'params', 'batch_stats'} for `cfg`: the given parts' tensors, every other leaf as
  `init_variables(cfg, rng)` draws it.

  Args:
    parts: {'vae' | 'siglip' | 'llm': directory}, any subset (empty: all random).
    rng: the init key (training passes its random init's, so the unloaded leaves match a random start).
    dtype: dtype of every returned array.
    shardings: as in load_hf_checkpoint: None, one Sharding, or a tree like the variables; part leaves
      stream from the memory-mapped files shard by shard, random ones are created already sharded.
  """
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise CheckpointError(f"unknown part(s) {', '.join(unknown)}: the parts are {', '.join(PARTS)}")
  opened = {part: open_part(part, d, cfg) for part, d in parts.items()}  # every check before any read
  np_dtype = np.dtype(dtype)
  abstract = abstract_variables(cfg)
  shapes = _flat_shapes(abstract)

  from_part: dict[str, tuple[str, HFEntry]] = {}  # our path -> (part, entry named in the part's layout)
  corners: dict[str, tuple[int, ...]] = {}  # our path -> the part's (smaller) shape, in our layout
  for path, entry in hf_name_map(abstract).items():
    routed = part_tensor_name(entry.name)
    if routed is None or routed[0] not in opened:
      continue
    part, name = routed
    files = opened[part]
    if name == LM_HEAD and name not in files:
      name = LLM_EMBED  # a tied part: its embeddings are its head
    from_part[path] = part, HFEntry(name, entry.transform, entry.num_layers)
    if _is_vocab_tensor(part, name):  # the only tensors open_part lets be smaller than the model's
      part_shape = _our_shape(files[name].tensors[name].shape, entry.transform)
      if part_shape != shapes[path]:
        corners[path] = part_shape

  # Only the leaves no part holds are drawn (and those a smaller vocabulary tensor fills in part)
  random = random_variables(cfg, rng, shardings, only=[p for p in shapes if p not in from_part or p in corners])
  readers = {}
  for path, (part, entry) in from_part.items():
    read_part = leaf_reader(entry, opened[part], np_dtype)
    readers[path] = (
      _corner_reader(random.pop(path), read_part, corners[path], np_dtype) if path in corners else read_part
    )
  flat = place_leaves(readers, shapes, shardings)
  flat.update({p: x if x.dtype == np_dtype else x.astype(np_dtype) for p, x in random.items()})
  return traverse_util.unflatten_dict(flat, sep="/")


def parse_parts_spec(spec: str) -> dict[str, str]:
  """'vae=DIR,siglip=DIR,llm=DIR' (any subset) -> {part: DIR}."""
  out: dict[str, str] = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    part, eq, path = item.partition("=")
    part = part.strip()
    if not eq or not path.strip():
      raise ConfigError(
        f"init_from=parts:{spec}: '{item}' is not PART=DIR (e.g. parts:vae=/w/flux2_vae,"
        "siglip=/w/siglip2,llm=/w/qwen2.5)"
      )
    if part not in PARTS:
      raise ConfigError(f"init_from=parts:{spec}: unknown part '{part}'; the parts are {', '.join(PARTS)}")
    if part in out:
      raise ConfigError(f"init_from=parts:{spec}: part '{part}' given twice")
    out[part] = path.strip()
  if not out:
    raise ConfigError("init_from=parts: names no part; use parts:vae=DIR,siglip=DIR,llm=DIR (any subset)")
  return out


def load_parts_spec(
  spec: str, cfg: ModelConfig, rng: jax.Array, dtype: Any = np.float32, shardings: Any = None
) -> dict:
  """load_parts from the text of `init_from=parts:SPEC`."""
  return load_parts(parse_parts_spec(spec), cfg, rng, dtype, shardings)


def random_init_rng(seed: int) -> jax.Array:
  """The key the training state's random init draws the params from for `config.seed`."""
  return jax.random.split(jax.random.PRNGKey(seed))[0]


# ---- assemble / split ----------------------------------------------------------------------------
def read_model_config(path_or_name: PathLike) -> ModelConfig:
  """A ModelConfig from a Cheers config.json (or a directory holding one), else from a run config
  (a shipped name such as `tiny`, or a config file: its model section) through `cheers_jax.config.load`."""
  path = Path(path_or_name)
  if path.is_dir():
    path = path / CONFIG_FILE
  if path.suffix == ".json":
    if not path.is_file():
      raise ConfigError(f"config {path} not found (give a config name or file, or a Cheers config.json)")
    try:
      return ModelConfig.from_hf_dict(_read_json(path))
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from e
  return config_lib.model_config(config_lib.load(str(path_or_name)))


def assemble_hf_checkpoint(
  parts: Mapping[str, PathLike],
  cfg: ModelConfig,
  out_dir: PathLike,
  seed: int = 0,
  dtype: Any = "bfloat16",
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict:
  """Writes a Cheers HF checkpoint (config.json, shards, index) built from `parts`, every other module
  random as training's init with `config.seed = seed` draws it, stored in `dtype` (bit-exact for parts
  stored in it). Holds the model once in fp32 host memory (~10 GB at full size). Returns the index."""
  cfg = cfg.replace(param_dtype="float32")
  variables = load_parts(parts, cfg, random_init_rng(seed), dtype=np.float32)
  return save_hf_checkpoint(variables, cfg, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


def split_hf_checkpoint(
  ckpt_dir: PathLike, out_dir: PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> dict[str, Path]:
  """Writes the parts a Cheers checkpoint holds, in their published layouts, bit for bit:
  `vae/ae.safetensors` (+ config.json with the Cheers VAE keys), `siglip/model.safetensors` (SigLIP2
  vision tower, `vision_model.*`), `llm/` (Qwen2.5 `model.*`, sharded with its index). The VAE part is
  the `vae_model` copy: a trained Cheers' projector decoder has moved away from it, and a part has one
  VAE. Returns {part: directory}."""
  cfg, files = open_hf_checkpoint(ckpt_dir)
  out_dir = Path(out_dir)
  written = {}
  for part, layout in part_layouts(cfg).items():
    tensors = {}
    for name in layout:
      source = cheers_source_name(part, name)
      if source not in files:
        continue  # a counter the checkpoint does not store
      info = files[source].tensors[source]
      tensors[name] = st.LazyTensor(info.shape, info.dtype, lambda s=source: files[s].get(s))
    part_dir = out_dir / part
    part_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = "bfloat16" if any(t.dtype == np.dtype(jnp.bfloat16) for t in tensors.values()) else "float32"
    (part_dir / CONFIG_FILE).write_text(json.dumps(part_config(part, cfg, torch_dtype), indent=2) + "\n")
    meta = {"format": "pt"}
    if part == "llm":
      st.save_sharded(tensors, part_dir, max_shard_bytes, metadata=meta)
    else:
      st.save_file(tensors, part_dir / (VAE_FILE if part == "vae" else "model.safetensors"), meta)
    written[part] = part_dir
  return written
