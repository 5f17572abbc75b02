"""The train state: what it holds, its sharded initialisation (random, or `init_from` a checkpoint),
and the latent calibration of a random VAE.

The state is created ALREADY SHARDED: `jax.eval_shape` gives the boxed abstract state, whose logical
axis names `sharding.param_shardings` maps to NamedShardings, and a jitted init writes each leaf in
place (big_vision / lm1b). Params and optimizer state are fp32.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from cheers_jax import sharding
from cheers_jax.config import model_config
from cheers_jax.checkpoint import orbax as orbax_lib
from cheers_jax.checkpoint.hf import load_hf_checkpoint, read_hf_config
from cheers_jax.checkpoint.parts import load_parts_spec, parse_parts_spec
from cheers_jax.data import pipeline, sources
from cheers_jax.errors import ConfigError
from cheers_jax.model.cheers import Cheers, init_variables
from cheers_jax.model.config import ModelConfig, describe_differences, differences
from cheers_jax.model.sequence import KIND_PREPENDED
from cheers_jax.train import optimizer as opt_lib

PyTree = Any
Array = jax.Array


@struct.dataclass
class TrainState:
  step: Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
  params: PyTree  # fp32 master params (all of them, frozen ones included)
  batch_stats: PyTree  # the VAE BatchNorm running statistics (never updated)
  opt_state: PyTree  # optax state over the TRAINABLE params only (see optimizer.partition)
  rng: Array  # uint32[2] base key; the step key is fold_in(rng, step)


# Re-entering training in one process (tests, notebooks, a resumed run) reuses the traced and
# compiled programs: jit caches per function object, so the functions are memoised on what they
# depend on (the model and train configurations and the mesh).
_PROGRAMS: dict = {}


def program_key(kind: str, config, mesh: Mesh, *extra) -> tuple:
  train = (
    json.loads(config.train.to_json_best_effort())
    if hasattr(config.train, "to_json_best_effort")
    else dict(config.train)
  )
  train.pop("nan_policy", None)  # read by the loop only
  return (kind, model_config(config), json.dumps(train, sort_keys=True, default=str), mesh, extra)


def memoised(key: tuple, build: Callable[[], Any]) -> Any:
  if key not in _PROGRAMS:
    _PROGRAMS[key] = build()
  return _PROGRAMS[key]


# ---- state construction ------------------------------------------------------------------------
def _boxed_state_fn(config, cfg: ModelConfig) -> Callable[[Array], TrainState]:
  """rng -> TrainState whose params (and their Adam moments) are still LogicallyPartitioned."""
  tx = opt_lib.make_optimizer(config.train)

  def create(rng: Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = init_variables(cfg, init_rng)
    params = variables["params"]
    mask = opt_lib.trainable_mask(nn.unbox(params), config.train.trainable)
    trainable, _ = opt_lib.partition(params, mask)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(trainable),
      rng=state_rng,
    )

  return create


def abstract_train_state(config, mesh: Mesh) -> tuple[TrainState, TrainState]:
  """(unboxed ShapeDtypeStruct state, NamedSharding per leaf) without allocating anything."""

  def build():
    cfg = model_config(config)
    boxed = jax.eval_shape(_boxed_state_fn(config, cfg), jax.random.PRNGKey(0))
    return nn.unbox(boxed), sharding.param_shardings(boxed, mesh)

  return memoised(program_key("abstract", config, mesh), build)


def init_train_state(
  config, mesh: Mesh, rng: Optional[Array] = None, init_from: Optional[str] = None
) -> tuple[TrainState, TrainState]:
  """A fresh TrainState created ALREADY SHARDED (eval_shape -> shardings -> jitted init).

  init_from: '' = random init; 'hf:DIR' = a Hugging Face checkpoint; 'orbax:DIR' = the params of the
  latest checkpoint in another workdir; 'parts:vae=DIR,siglip=DIR,llm=DIR' (any subset) = pretrained
  parts, the rest as the random init (checkpoint/parts.py). The optimizer state always starts fresh at step 0.
  Returns (state, state_shardings).
  """
  cfg = model_config(config)
  rng = jax.random.PRNGKey(int(config.seed)) if rng is None else rng
  init_from = config.get("init_from", "") if init_from is None else init_from
  abstract, shardings = abstract_train_state(config, mesh)
  if not init_from:
    create = _boxed_state_fn(config, cfg)
    init = memoised(
      program_key("init", config, mesh), lambda: jax.jit(lambda r: nn.unbox(create(r)), out_shardings=shardings)
    )
    return init(rng), shardings

  variable_shardings = {"params": shardings.params, "batch_stats": shardings.batch_stats}
  if init_from.startswith("hf:"):
    _check_same_architecture(cfg, read_hf_config(init_from[3:]), init_from)  # before any tensor is read
    loaded_cfg, variables = load_hf_checkpoint(init_from[3:], cfg=cfg, dtype=jnp.float32, shardings=variable_shardings)
    _check_same_architecture(cfg, loaded_cfg, init_from)
  elif init_from.startswith("parts:"):
    variables = load_parts_spec(init_from[6:], cfg, jax.random.split(rng)[0], shardings=variable_shardings)
  elif init_from.startswith("orbax:"):
    variables = orbax_lib.load_run_variables(
      init_from[6:], {"params": abstract.params, "batch_stats": abstract.batch_stats}, variable_shardings
    )
  else:
    raise ConfigError(
      f"init_from='{init_from}': use '' (random), 'hf:DIR', 'orbax:DIR' or 'parts:vae=DIR,siglip=DIR,llm=DIR'"
    )
  state_rng = jax.random.split(rng)[1]  # as the random init's
  return _with_variables(config, state_rng, variables, shardings), shardings


def vae_is_random(init_from: str) -> bool:
  """Whether `init_from` leaves the VAE (and its latent BN statistics) at the random init."""
  if init_from.startswith("parts:"):
    return "vae" not in parse_parts_spec(init_from[6:])
  return not init_from


# ModelConfig fields that do not change the stored arrays (numerics, layout in memory, truncation)
NOT_ARCHITECTURE = (
  "dtype",
  "param_dtype",
  "scan_layers",
  "remat_policy",
  "attention",
  "reference_bf16_casts",
  "max_seq_len",
)


def _check_same_architecture(cfg: ModelConfig, loaded: ModelConfig, where: str) -> None:
  diffs = differences(cfg, loaded, ignore=NOT_ARCHITECTURE)
  if diffs:
    fix = " ".join(f"--config.model.{k}={vb!r}".replace("'", "") for k, _, vb in diffs[:4])
    raise ConfigError(
      f"{where}: the checkpoint's model differs from config.model in {len(diffs)} field(s): "
      f"{describe_differences(diffs, 'config', 'checkpoint')}; set config.model to the "
      f"checkpoint's shapes (e.g. {fix})"
    )


def _with_variables(config, rng: Array, variables: dict, shardings: TrainState) -> TrainState:
  """A step-0 state around loaded params (fresh optimizer state: zero moments)."""
  tx = opt_lib.make_optimizer(config.train)
  params = variables["params"]

  def rebuild(params, batch_stats, rng):
    mask = opt_lib.trainable_mask(params, config.train.trainable)
    trainable, _ = opt_lib.partition(params, mask)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(trainable), rng=rng
    )

  return jax.jit(rebuild, out_shardings=shardings)(params, variables["batch_stats"], rng)


# ---- latent statistics of a random VAE (train.calibrate_latent_norm) ----------------------------
LATENT_NORMS = ("vae_model", "vae_decoder_projector")  # modules holding the latent BN statistics


def calibrate_latent_norm(
  config, state: TrainState, shardings: TrainState, images: np.ndarray, chunk: int = 32
) -> TrainState:
  """Sets the latent BatchNorm running statistics of both VAE copies to the per-channel mean and
  variance of the frozen encoder's latents over `images` (n, H, W, 3) in [0, 1].

  A trained VAE ships such statistics (they make the latents ~unit variance). A randomly initialised
  one keeps mean 0 / var 1 while its latents have std ~0.15: flow matching's unit noise then drowns
  the image (x_t is 98 % noise by variance) and understanding tokens barely vary between images.
  """
  model = Cheers(model_config(config))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  encode = jax.jit(lambda v, x: model.apply(v, x, method=Cheers.encode_unnormalized))
  latents = np.concatenate(
    [
      np.asarray(jax.device_get(encode(variables, images[i : i + chunk])), np.float64)
      for i in range(0, len(images), chunk)
    ]
  )
  flat = latents.reshape(-1, latents.shape[-1])
  stats = {"running_mean": flat.mean(0).astype(np.float32), "running_var": flat.var(0).astype(np.float32)}
  batch_stats = dict(jax.device_get(state.batch_stats))
  for name in LATENT_NORMS:
    batch_stats[name] = {**batch_stats[name], "bn": dict(stats)}
  return state.replace(batch_stats=jax.device_put(batch_stats, shardings.batch_stats))


def calibration_images(config, count: int, source: Any = None) -> np.ndarray:
  """Up to `count` training images, exactly as the pipeline prepares them, from the first samples (in
  source order) of the kinds data.mix draws that the pipeline ACCEPTS (a sample it would skip, too long
  or with a bad image, gives none; a text-only sample's dummy is not an image): (n, S, S, 3), n <= count
  (fewer when the first 8 x count such samples hold fewer). No image at all is a ConfigError saying why."""
  source = sources.make_source(config.data, int(config.seed)) if source is None else source
  prepare = pipeline.PrepareExample(pipeline.spec_from_config(config))
  drawn = [
    c for c, name in enumerate(sources.CATEGORIES) if name != "text" and float(config.data.mix.get(name, 0.0)) > 0
  ]
  candidates = np.flatnonzero(np.isin(np.asarray(source.categories()), drawn))[: 8 * count]  # a bounded scan
  out, skips = [], collections.Counter()
  for index in candidates:
    prepared = prepare(int(index), source[int(index)])
    if "skip" in prepared:
      skips[prepared["skip"]] += 1
      continue
    out += [px for px, kind in zip(prepared["pixels"], prepared["image_kind"]) if kind != KIND_PREPENDED]
    if len(out) >= count:
      break
  if not out:
    why = ", ".join(f"{reason}: {n}" for reason, n in skips.items()) or "none has an image"
    raise ConfigError(
      f"train.calibrate_latent_norm={count}: the first {len(candidates)} samples with images "
      f"gave no image the pipeline accepts ({why}); fix the data or set it to 0"
    )
  return np.stack(out[:count])
