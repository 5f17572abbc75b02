"""The run config: its schema (`base_config`), the one loader (`load`) and the key checks.

A config is an ml_collections ConfigDict. `load(path_or_name, overrides)` serves every tool (train,
sweep, aot, bench):
- a NAME is one of the configurations shipped here (`NAMED`: `tiny`, `cheers_1p5b`, the ones the
  package's own tools default to), so `--config tiny` works from any directory and in an installed
  package; the repository's top-level config folder re-exports them next to the training-stage
  recipes, which build on `cheers_1p5b`;
- a PATH is a Python file with `get_config()` (`FILE:ARG` calls `get_config(ARG)`), e.g. the recipes
  in the repository's top-level config folder; the folder above the file's folder is put on sys.path,
  so such a file may import its siblings as a package;
- overrides are `--config.KEY=VALUE` (or `KEY=VALUE`) strings, converted to the type of the value they
  replace. A key must exist, except below `model.` (ModelConfig.from_dict checks those keys).
A misspelt key, here or in a config file, is a ConfigError naming the closest valid key.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import os
import sys
from typing import Any, Iterable, Sequence

import ml_collections

from cheers_jax import package_data
from cheers_jax.data import packing
from cheers_jax.demo.shapes import PLACEMENTS
from cheers_jax.errors import ConfigError, unknown_key
from cheers_jax.model.config import ModelConfig

# Sections whose keys `check_known_keys` leaves to others: model to ModelConfig.from_dict, data to the
# pipeline (it accepts optional extras such as data.num_threads, set in a config file).
OPEN_SECTIONS = ("model", "data")
EXTRA_TOP_KEYS = ("export_hf",)  # optional: read with config.get()
NAN_POLICIES = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
  """Every key a run config has, with its default (the published model's shapes, batch 512)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # --workdir on the command line wins

  # Keys of cheers_jax.model.config.ModelConfig (nested text / vision / vae).
  c.model = ml_collections.ConfigDict(
    dict(
      text={},
      vision={},
      vae={},
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="none",
      attention="xla",
      reference_bf16_casts=False,
      max_seq_len=4096,
    )
  )
  # '' = random init; 'hf:DIR' = a Hugging Face checkpoint dir; 'orbax:DIR' = params from an orbax workdir;
  # 'parts:vae=DIR,siglip=DIR,llm=DIR' (any subset) = pretrained parts, the rest random (checkpoint/parts.py).
  c.init_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic | jsonl | tfds
  c.data.jsonl_path = ""  # official conversation format (one JSON object per line)
  c.data.image_root = ""  # folder the JSONL image paths are relative to
  # Several sources by weight (replaces source/jsonl_path when given): entries {'path': JSONL file, glob or
  # folder of prepared shards (python -m cheers_jax.data.prepare), 'weight': 1.0, 'image_root': ''}, or paths.
  # The weights mix the sources within each kind; data.mix still sets the und : gen : text ratio on top.
  c.data.sources = ()
  c.data.tfds_name = ""  # e.g. 'my_captions' (image + caption/label features)
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""
  c.data.tfds_image_key = "image"
  c.data.tfds_text_key = "caption"  # a text feature, or a ClassLabel feature (its names are used)
  c.data.tfds_tasks = ("t2i", "i2t")  # which samples a TFDS example becomes
  c.data.image_size = 512  # must equal model.vision.image_size
  c.data.seq_buckets = (512, 1024, 2048, 4096)  # static sequence lengths (few compiles)
  c.data.max_images_per_sample = 2  # image slots per sample in a batch (editing = 2)
  # Packed rows (cheers_jax/data/packing.py): train.batch_size rows of pack_len tokens (0 = the largest bucket)
  # and pack_images image slots (0 = automatic), each holding as many whole samples as fit.
  c.data.packing = False
  c.data.pack_len = 0
  c.data.pack_images = 0
  c.data.mix = ml_collections.ConfigDict(dict(und=3.0, gen=6.0, text=1.0))  # sampling ratios
  # A first phase: the stream's first `first_samples` samples (global) follow `first_mix` instead (0 = none).
  c.data.first_samples = 0
  c.data.first_mix = ml_collections.ConfigDict(dict(und=0.0, gen=1.0, text=0.0))
  c.data.cfg_data_rate = 0.2  # CFG dropout for generation samples
  c.data.worker_count = 0  # grain worker processes (0 = in-process)
  c.data.shuffle = True
  c.data.synthetic_size = 20000  # examples in the synthetic source
  # where the synthetic source's generation images put their shape: 'random' (as its captioned images) or
  # 'centred' (one size, in the middle: the prompt names only colour and shape; cheers_jax/demo/shapes.py)
  c.data.shapes_gen_placement = "random"

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 512  # global batch (samples per optimizer step)
  c.train.grad_accum = 1  # micro-batches per step (batch_size % grad_accum == 0)
  c.train.lr = 1e-4
  c.train.schedule = "constant"  # constant | cosine
  c.train.warmup_ratio = 0.02
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.opt_state_dtype = "float32"  # Adam moments: float32 | bfloat16 (halves the optimizer state)
  # Pin activations batch-sharded and weights gathered for use (sharding.constrain / gathered): without it
  # per-device memory GREW with fsdp (tests/train/test_fsdp_memory.py: 0.085 -> 0.088 GiB at fsdp=4 vs
  # 0.085 -> 0.077 with it). Set False for multi-PROCESS runs on XLA:CPU: its thunk runtime then ran two
  # processes' collectives in different orders (gloo size mismatch; tests/scale/test_distributed.py).
  c.train.activation_shardings = True
  c.train.clip_norm = 1.0
  c.train.trainable = "all_but_vae"  # align | all_but_vae | all_but_vision_tokenizer (VAE encoder: always frozen)
  c.train.lr_multipliers = ""  # per-module lr factors: 'und_projector=10,language_model/embed_tokens=0.5'
  c.train.calibrate_latent_norm = 0  # random init only: set the VAE's latent BN stats from N training images
  c.train.fm_weight = 1.0  # lambda
  c.train.fm_gen_only = False  # True: FM loss on generation images only (paper variant)
  c.train.ce_chunk = 1024  # sequence chunk of the chunked cross-entropy
  c.train.nan_policy = "stop"  # stop | skip

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
  c.log_every = 10
  c.sample_every = 0  # steps between sample grids (0 = only at the end)
  c.sample_prompts = ("a red circle", "a blue square")
  c.sample_steps = 20
  c.sample_cfg = 4.0
  return c


# ---- the shipped configurations ---------------------------------------------------------------------
# The embedded default's pretrained parts (VAE, SigLIP), package data made by `python -m cheers_jax.train.tiny_parts`.
TINY_PARTS = str(package_data.TINY_PARTS)


def cheers_1p5b():
  """The published Cheers model (Qwen2.5-1.5B + SigLIP2 so400m-like + FLUX.2-style VAE, 512x512).

  Every shape is the config class default (cheers_jax.model.config); used with init_from='hf:DIR' to
  evaluate or fine-tune the released weights.
  """
  c = base_config()
  c.data.image_size = 512
  c.train.batch_size = 512
  c.checkpoint.every_steps = 1000
  c.mesh.fsdp = -1
  # Memory (python -m cheers_jax.aot --target h100, 512x512, seq 400, half generation, README "Scaling"):
  # remat 'full' recomputes each layer's activations (SigLIP, LLM, DiT heads, VAE decoder blocks) and
  # bf16 Adam moments (as the official code's bf16 AdamW) halve the optimizer state; together they fit
  # batch 8 on one 80 GB H100 (38 GiB) and batch 16 (49 GiB).
  c.model.remat_policy = "full"
  c.train.opt_state_dtype = "bfloat16"
  return c


def tiny():
  """The embedded default: a tiny Cheers learns to caption and draw coloured shapes (`cheers_jax.demo`).

  python -m cheers_jax.train --config tiny --workdir /tmp/cheers_tiny   # ~5 min on 2 CPU cores

  From the project's own pretrained parts (VAE and ViT, package data, `train.tiny_parts`), frozen; a random
  2-layer LLM (hidden 64); 32-px images, patch 8 (4 image tokens). und 1 : gen 1 from the first step,
  lambda (fm_weight) 2, CFG dropout 0.1, batch 16, lr 3e-3 cosine. T2I prompts are in capitals
  ('A RED CIRCLE', `demo.shapes.prompt_text`). Tiny-only data choice: the generation examples draw their
  shape centred at one size (`data.shapes_gen_placement`; captioned images stay anywhere at any size), as
  the prompt names only colour and shape: with the placement random, the best velocity at small t is a
  blur over positions the tiny head cannot resolve, and it drew blobs. Samples: 8 Euler steps, CFG 2.
  Compute in bf16 with fp32 params, the project's policy (fp32 was 1.5x slower per step on the 2-core VM).
  Why each choice, and every variant measured at each seed: docs/tiny_recipe.md.
  """
  c = base_config()
  c.init_from = "parts:vae={0}/vae,siglip={0}/siglip".format(TINY_PARTS)
  c.model.text = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
  c.model.vision = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=32, patch_size=8)
  c.model.vae = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, resolution=32)
  # compute in bf16 (the base default: fp32 params and loss): on the 2-core AVX512-BF16 VM a step takes 0.38 s
  # against 0.59 in fp32, and seed 0 captioned better (shape 81 vs 75 %) (docs/tiny_recipe.md)
  c.data.image_size = 32
  c.data.seq_buckets = (96,)
  c.data.max_images_per_sample = 1
  c.data.mix = dict(und=1.0, gen=1.0, text=0.0)
  c.data.synthetic_size = 4096
  c.data.shapes_gen_placement = "centred"  # tiny-only: see the docstring
  c.data.cfg_data_rate = 0.1
  c.train.steps = 500
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.schedule = "cosine"
  c.train.warmup_ratio = 0.05
  c.train.trainable = "all_but_vision_tokenizer"  # keep the pretrained parts (see above)
  c.train.fm_weight = 2.0
  c.train.fm_gen_only = True
  c.train.calibrate_latent_norm = 0  # the VAE part ships its latent BatchNorm statistics
  c.train.ce_chunk = 128  # ~240 text targets per batch of 16: two chunks
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint.every_steps = 250
  c.log_every = 10
  c.sample_steps = 8
  c.sample_cfg = 2.0
  return c


NAMED = {"tiny": tiny, "cheers_1p5b": cheers_1p5b}


def check_known_keys(config) -> None:
  """Every key outside OPEN_SECTIONS must be one of `base_config()`'s (a misspelt key is an error)."""
  schema = base_config()
  for section in ("", "train", "checkpoint", "mesh"):
    have = config if not section else config.get(section)
    want = schema if not section else schema.get(section)
    if have is None or want is None:
      continue
    for key in have.keys():
      if key not in want and not (not section and key in EXTRA_TOP_KEYS):
        raise ConfigError(unknown_key(f"{section}.{key}" if section else key, key, want.keys()))


# Numeric keys and their ranges: (key, lowest, lowest allowed?, highest, highest allowed?, what it means).
# None = unbounded. NaN and infinities are always refused.
_RANGES = (
  ("seed", 0, True, None, True, ""),
  ("train.steps", 1, True, None, True, "optimizer steps"),
  ("train.batch_size", 1, True, None, True, "global batch"),
  ("train.grad_accum", 1, True, None, True, "micro-batches per step"),
  ("train.lr", 0, False, None, True, "peak learning rate"),
  ("train.warmup_ratio", 0, True, 1, True, "share of the steps"),
  ("train.weight_decay", 0, True, None, True, ""),
  ("train.b1", 0, True, 1, False, "Adam beta1"),
  ("train.b2", 0, True, 1, False, "Adam beta2"),
  ("train.eps", 0, False, None, True, "Adam epsilon"),
  ("train.clip_norm", 0, True, None, True, "0 turns clipping off"),
  ("train.calibrate_latent_norm", 0, True, None, True, "0 turns it off"),
  ("train.fm_weight", 0, True, None, True, "lambda"),
  ("train.ce_chunk", 1, True, None, True, ""),
  ("checkpoint.every_steps", 1, True, None, True, ""),
  ("checkpoint.keep", 0, True, None, True, "0 keeps every checkpoint"),
  ("log_every", 1, True, None, True, ""),
  ("sample_every", 0, True, None, True, "0 = only at the end"),
  ("sample_steps", 1, True, None, True, ""),
  ("sample_cfg", 0, True, None, True, "1 turns guidance off"),
  ("data.image_size", 1, True, None, True, ""),
  ("data.max_images_per_sample", 1, True, None, True, ""),
  ("data.pack_len", 0, True, None, True, "0 = the largest bucket"),
  ("data.pack_images", 0, True, None, True, "0 = automatic"),
  ("data.cfg_data_rate", 0, True, 1, True, "a probability"),
  ("data.worker_count", 0, True, None, True, "0 = in-process"),
  ("data.synthetic_size", 1, True, None, True, ""),
  ("data.first_samples", 0, True, None, True, "0 = no first phase"),
  ("data.num_threads", 1, True, None, True, ""),
  ("data.prefetch", 1, True, None, True, ""),
)


def _lookup(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if node is None or not hasattr(node, "get"):
      return None
    node = node.get(part)
  return node


def _number(key: str, value, what: str = "a number") -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"{key}={value!r}: give {what}")
  if not math.isfinite(value):
    raise ConfigError(f"{key}={value!r}: give a finite number")
  return value


def check_values(config) -> None:
  """Every numeric value is a finite number in its range (`_RANGES`), with the key named: a negative
  step count or learning rate, a zero batch, a NaN are refused before anything starts."""
  for key, low, low_ok, high, high_ok, note in _RANGES:
    value = _lookup(config, key)
    if value is None:
      continue
    want_int = isinstance(_lookup(base_config(), key), int) or key in ("data.num_threads", "data.prefetch")
    _number(key, value, "an integer" if want_int else "a number")
    bad = (
      (low is not None and (value < low or (value == low and not low_ok)))
      or (high is not None and (value > high or (value == high and not high_ok)))
      or (want_int and int(value) != value)
    )
    if bad:
      rng = " and ".join(
        ([f"{'>=' if low_ok else '>'} {low}"] if low is not None else [])
        + ([f"{'<=' if high_ok else '<'} {high}"] if high is not None else [])
      )
      raise ConfigError(
        f"{key}={value!r}: must be {'an integer' if want_int else 'a number'} {rng}" + (f" ({note})" if note else "")
      )
  for axis, size in dict(config.get("mesh") or {}).items():
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size >= 1):
      raise ConfigError(f"mesh.{axis}={size!r}: give a device count >= 1, or -1 for the rest of the devices")
  data = config.get("data")
  if data is not None:
    buckets = data.get("seq_buckets")
    if buckets is not None:
      if (
        not buckets
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets)
        or list(buckets) != sorted(set(buckets))
      ):
        raise ConfigError(f"data.seq_buckets={tuple(buckets)!r}: give strictly increasing token counts >= 1")
    for key in ("mix", "first_mix"):
      mix = data.get(key)
      if mix is None or (key == "first_mix" and not data.get("first_samples", 0)):
        continue
      weights = {name: _number(f"data.{key}.{name}", w) for name, w in dict(mix).items()}
      for name, w in weights.items():
        if w < 0:
          raise ConfigError(f"data.{key}.{name}={w!r}: a sampling weight must be >= 0")
      if not any(w > 0 for w in weights.values()):
        raise ConfigError(
          f"data.{key} {weights}: every weight is 0, so nothing would be drawn; give at least one "
          "kind (und, gen, text) a positive weight"
        )


def check_consistency(config) -> None:
  """Checks across keys and of the enumerated values: the model section is a valid ModelConfig, the
  data's image size is the model's, the batch splits into micro-batches, the NaN policy is known, a packed
  row holds the longest bucket and the sample with the most images (data.packing)."""
  cfg = model_config(config)
  train = config.get("train")
  if train is not None:
    if train.get("nan_policy", "stop") not in NAN_POLICIES:
      raise ConfigError(f"train.nan_policy='{train.nan_policy}': choose one of {NAN_POLICIES}")
    if int(train.batch_size) % int(train.grad_accum):
      raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by train.grad_accum={train.grad_accum}")
  data = config.get("data")
  if data is not None and data.get("shapes_gen_placement") is not None:
    if data.shapes_gen_placement not in PLACEMENTS:
      raise ConfigError(f"data.shapes_gen_placement='{data.shapes_gen_placement}': choose one of {PLACEMENTS}")
  if data is not None and data.get("image_size") is not None and int(data.image_size) != cfg.vision.image_size:
    raise ConfigError(
      f"data.image_size={data.image_size} but model.vision.image_size={cfg.vision.image_size}: "
      "they must match (the SigLIP position table is trained at one size); set both"
    )
  if data is not None and data.get("seq_buckets") is not None:
    packing.resolve(data, cfg.tokens_per_image, rows=1)


def model_config(config) -> ModelConfig:
  """The run config's model section as a ModelConfig: THE conversion, cached (one object per distinct section)."""
  model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  return _model_config(json.dumps(model, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _model_config(model_json: str) -> ModelConfig:
  return ModelConfig.from_dict(json.loads(model_json))


# ---- loading -------------------------------------------------------------------------------------
def is_path(text: str) -> bool:
  """A config file (FILE.py[:ARG], a path with a separator, or an existing file), not a shipped config's name.

  A shipped name wins over a same-named file or folder in the working directory (a run's workdir is often
  named after its config): write ./NAME for such a file."""
  file = text.partition(":")[0]
  if file.endswith(".py") or os.sep in file or "/" in file:
    return True
  return text not in NAMED and os.path.isfile(file)


def _from_file(text: str) -> ml_collections.ConfigDict:
  file, _, arg = text.partition(":")
  if not os.path.isfile(file):
    raise ConfigError(f"config file {file!r} not found")
  root = os.path.dirname(os.path.dirname(os.path.abspath(file)))
  if root not in sys.path:  # a config file may import its siblings through its folder's package
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_cheers_config_{abs(hash(os.path.abspath(file)))}", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config")
    return get_config(arg) if arg else get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 -- a broken config file is the user's to fix
    raise ConfigError(f"config file {file!r}: {type(e).__name__}: {e}") from e


def load(path_or_name: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """A locked ConfigDict from a shipped config name or a config file, with overrides applied."""
  text = str(path_or_name)
  if is_path(text):
    config = _from_file(text)
  elif text in NAMED:
    config = NAMED[text]()
  else:
    raise ConfigError(unknown_key(text, text, NAMED, noun="config name") + " (or give the path of a config file)")
  apply_overrides(config, overrides)
  check_known_keys(config)
  check_values(config)
  check_consistency(config)
  config.lock()
  return config


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
    raise ValueError(f"expected a boolean, got {raw!r}")
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
  """'--config.a.b=v' (or 'a.b=v'). Keys must exist, except below `model.`."""
  for item in overrides:
    text = item[len("--config.") :] if item.startswith("--config.") else item
    key, eq, raw = text.partition("=")
    if not eq:
      raise ConfigError(f"override {item!r}: use --config.KEY=VALUE")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
      if part not in node:
        raise ConfigError(f"override {item!r}: " + unknown_key(".".join(parts[: i + 1]), part, node.keys()))
      node = node[part]
    last = parts[-1]
    try:
      if last in node:
        value = _coerce(raw, node[last])
      elif parts[0] == "model":  # e.g. model.text.vocab_size: validated by ModelConfig.from_dict
        value = _literal(raw)
      else:
        raise ConfigError(f"override {item!r}: " + unknown_key(key, last, node.keys()))
    except ValueError as e:
      if isinstance(e, ConfigError):
        raise
      raise ConfigError(f"override {item!r}: {e}") from e
    if hasattr(node, "unlocked"):
      with node.unlocked():
        node[last] = value
    else:
      node[last] = value
