"""The train state, its sharded initialisation, and the one jitted train step.

One step = draw the flow-matching noise x0 from a per-step key, split the global batch into
`grad_accum` micro-batches, sum their gradients with `lax.scan` (each micro-batch's loss is
normalised by the GLOBAL text-target count and image weight, so the sum is exactly the full-batch
loss), clip + AdamW on the trainable params only, and guard against non-finite values. Params and
optimizer state are fp32 and sharded by `sharding.param_shardings`; compute runs in `model.dtype`.
Metrics come back as device arrays: the step never syncs with the host.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from cheers_jax import sharding
from cheers_jax.model.cheers import Cheers, init_variables
from cheers_jax.model.config import ModelConfig
from cheers_jax.model.sequence import IGNORE_INDEX, KIND_GEN
from cheers_jax.train import optimizer as opt_lib
from cheers_jax.train.loss import cheers_loss

PyTree = Any
Array = jax.Array

# Batch arrays the step consumes; the leading axis is the batch (B) or the image slots (M).
ROW_KEYS = ("token_ids", "image_index", "image_mask", "positions", "targets", "valid")
IMAGE_KEYS = ("pixels", "t", "image_kind", "image_weight", "image_positions")
OPTIONAL_KEYS = ("x0",)  # pre-drawn noise (parity tests); otherwise drawn inside the step
HOST_ONLY_KEYS = ("num_skipped",)  # pipeline counters, summed on the host by the loop
METRIC_KEYS = ("loss", "loss_ar", "loss_fm", "grad_norm", "lr", "num_text_targets", "num_images",
               "skipped_nonfinite")


@struct.dataclass
class TrainState:
  step: Array          # int32 scalar: optimizer steps taken (skipped non-finite steps included)
  params: PyTree       # fp32 master params (all of them, frozen ones included)
  batch_stats: PyTree  # the VAE BatchNorm running statistics (never updated)
  opt_state: PyTree    # optax state over the TRAINABLE params only (see optimizer.partition)
  rng: Array           # uint32[2] base key; the step key is fold_in(rng, step)


def model_config(config) -> ModelConfig:
  return ModelConfig.from_dict(config.model)


# Re-entering training in one process (tests, notebooks, a resumed run) reuses the traced and
# compiled programs: jit caches per function object, so the functions are memoised on what they
# depend on (the model and train configs and the mesh).
_PROGRAMS: dict = {}


def _program_key(kind: str, config, mesh: Mesh, *extra) -> tuple:
  train = json.loads(config.train.to_json_best_effort()) if hasattr(config.train, "to_json_best_effort") \
      else dict(config.train)
  train.pop("nan_policy", None)  # read by the loop only
  return (kind, model_config(config), json.dumps(train, sort_keys=True, default=str), mesh, extra)


def _memoised(key: tuple, build: Callable[[], Any]) -> Any:
  if key not in _PROGRAMS:
    _PROGRAMS[key] = build()
  return _PROGRAMS[key]


def _image_size(config, cfg: ModelConfig) -> int:
  size = int(config.data.get("image_size", cfg.vision.image_size))
  if size != cfg.vision.image_size:
    raise ValueError(f"data.image_size={size} but model.vision.image_size={cfg.vision.image_size}: they must "
                     "match (the SigLIP position table is trained at one size)")
  return size


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
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                      opt_state=tx.init(trainable), rng=state_rng)
  return create


def abstract_train_state(config, mesh: Mesh) -> tuple[TrainState, TrainState]:
  """(unboxed ShapeDtypeStruct state, NamedSharding per leaf) without allocating anything."""
  def build():
    cfg = model_config(config)
    boxed = jax.eval_shape(_boxed_state_fn(config, cfg), jax.random.PRNGKey(0))
    return nn.unbox(boxed), sharding.param_shardings(boxed, mesh)
  return _memoised(_program_key("abstract", config, mesh), build)


def init_train_state(config, mesh: Mesh, rng: Optional[Array] = None, init_from: Optional[str] = None
                     ) -> tuple[TrainState, TrainState]:
  """A fresh TrainState created ALREADY SHARDED (eval_shape -> shardings -> jitted init).

  init_from: '' = random init; 'hf:DIR' = a Hugging Face checkpoint; 'orbax:DIR' = the params of the
  latest checkpoint in another workdir. The optimizer state always starts fresh at step 0.
  Returns (state, state_shardings).
  """
  cfg = model_config(config)
  _image_size(config, cfg)
  rng = jax.random.PRNGKey(int(config.seed)) if rng is None else rng
  init_from = config.get("init_from", "") if init_from is None else init_from
  abstract, shardings = abstract_train_state(config, mesh)
  if not init_from:
    create = _boxed_state_fn(config, cfg)
    init = _memoised(_program_key("init", config, mesh),
                     lambda: jax.jit(lambda r: nn.unbox(create(r)), out_shardings=shardings))
    return init(rng), shardings

  variable_shardings = {"params": shardings.params, "batch_stats": shardings.batch_stats}
  if init_from.startswith("hf:"):
    from cheers_jax.checkpoint.hf import load_hf_checkpoint
    loaded_cfg, variables = load_hf_checkpoint(init_from[3:], cfg=cfg, dtype=jnp.float32,
                                               shardings=variable_shardings)
    _check_same_architecture(cfg, loaded_cfg, init_from)
  elif init_from.startswith("orbax:"):
    from cheers_jax.train.checkpointing import load_variables
    variables = load_variables(init_from[6:], {"params": abstract.params, "batch_stats": abstract.batch_stats},
                               variable_shardings)
  else:
    raise ValueError(f"init_from='{init_from}': use '' (random), 'hf:DIR' or 'orbax:DIR'")
  state_rng = jax.random.split(rng)[1]  # as the random init's
  return _with_variables(config, state_rng, variables, shardings), shardings


def _check_same_architecture(cfg: ModelConfig, loaded: ModelConfig, where: str) -> None:
  keep = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention", "reference_bf16_casts",
          "max_seq_len")
  a = cfg.replace(**{k: getattr(loaded, k) for k in keep})
  if a != loaded:
    raise ValueError(f"{where}: the checkpoint's model differs from config.model:\n  checkpoint {loaded}\n"
                     f"  config     {cfg}\nset config.model to the checkpoint's shapes")


def _with_variables(config, rng: Array, variables: dict, shardings: TrainState) -> TrainState:
  """A step-0 state around loaded params (fresh optimizer state: zero moments)."""
  tx = opt_lib.make_optimizer(config.train)
  params = variables["params"]

  def rebuild(params, batch_stats, rng):
    mask = opt_lib.trainable_mask(params, config.train.trainable)
    trainable, _ = opt_lib.partition(params, mask)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(trainable), rng=rng)
  return jax.jit(rebuild, out_shardings=shardings)(params, variables["batch_stats"], rng)


# ---- latent statistics of a random VAE (train.calibrate_latent_norm) ----------------------------
LATENT_NORMS = ("vae_model", "vae_decoder_projector")  # modules holding the latent BN statistics


def calibrate_latent_norm(config, state: TrainState, shardings: TrainState, images: np.ndarray,
                          chunk: int = 32) -> TrainState:
  """Sets the latent BatchNorm running statistics of both VAE copies to the per-channel mean and
  variance of the frozen encoder's latents over `images` (n, H, W, 3) in [0, 1].

  A trained VAE ships such statistics (they make the latents ~unit variance). A randomly initialised
  one keeps mean 0 / var 1 while its latents have std ~0.15: flow matching's unit noise then drowns
  the image (x_t is 98 % noise by variance) and understanding tokens barely vary between images.
  """
  model = Cheers(model_config(config))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  encode = jax.jit(lambda v, x: model.apply(v, x, method=Cheers.encode_unnormalized))
  latents = np.concatenate([np.asarray(jax.device_get(encode(variables, images[i:i + chunk])), np.float64)
                            for i in range(0, len(images), chunk)])
  flat = latents.reshape(-1, latents.shape[-1])
  stats = {"running_mean": flat.mean(0).astype(np.float32), "running_var": flat.var(0).astype(np.float32)}
  batch_stats = dict(jax.device_get(state.batch_stats))
  for name in LATENT_NORMS:
    batch_stats[name] = {**batch_stats[name], "bn": dict(stats)}
  return state.replace(batch_stats=jax.device_put(batch_stats, shardings.batch_stats))


def calibration_images(config, count: int) -> np.ndarray:
  """The first `count` images of the training source, preprocessed as generation targets (n, S, S, 3)."""
  from cheers_jax.data import images as images_lib
  from cheers_jax.data import sources
  size = int(config.data.image_size)
  source = sources.make_source(config.data, int(config.seed))
  out = []
  for index in range(min(len(source), 8 * count)):  # a bounded scan: text-only samples carry no image
    example = source[index]
    if sources.is_marker(example):
      continue
    for image in example["images"]:
      try:
        image = images_lib.load_image(image) if isinstance(image, str) else image
        out.append(images_lib.preprocess_generation(image, size).pixel_values.transpose(1, 2, 0))
      except (OSError, ValueError):  # BadImageError is a ValueError
        continue  # the pipeline counts and reports bad images; calibration just uses the others
    if len(out) >= count:
      break
  if not out:
    raise ValueError("train.calibrate_latent_norm: the training source gave no readable image")
  return np.stack(out[:count]).astype(np.float32)


# ---- batch layout --------------------------------------------------------------------------------
def batch_shardings(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
  """Leading axis over (data, fsdp) where it divides evenly, else replicated."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for key, x in batch.items():
    if key in HOST_ONLY_KEYS:
      continue
    shape = np.shape(x)
    if len(shape) and shape[0] % shards == 0:
      out[key] = sharding.batch_sharding(mesh, len(shape))
    elif jax.process_count() > 1:  # a replicated array would need the same rows on every process
      raise ValueError(f"batch array '{key}' has {shape[0] if shape else 0} rows, not divisible by the "
                       f"{shards} data x fsdp shards; make train.batch_size a multiple of them")
    else:
      out[key] = sharding.replicated(mesh)
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
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in batch.items() if k in shardings}


def _split_micro(batch: dict, accum: int) -> dict:
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

  out = {k: rows(batch[k]) for k in ROW_KEYS}
  out.update({k: images(batch[k]) for k in IMAGE_KEYS + OPTIONAL_KEYS if k in batch})
  # re-base the cross references to the micro-batch: flat positions b*S + s and image slots b*K + i
  pos = out["image_positions"]
  out["image_positions"] = ((pos // s) // accum) * s + pos % s
  n_tok = batch["image_positions"].shape[1]
  idx = out["image_index"]
  slot, tok = idx // n_tok, idx % n_tok
  local = ((slot // slots) // accum) * slots + slot % slots
  out["image_index"] = jnp.where(idx >= 0, local * n_tok + tok, -1)
  return out


def fm_weights(image_kind: Array, image_weight: Array, fm_gen_only: bool) -> Array:
  """Per-image FM weights exactly as `cheers_loss` forms them."""
  w = image_weight.astype(jnp.float32)
  if fm_gen_only:
    w = w * (image_kind == KIND_GEN)
  return w


# ---- the step ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepOptions:
  grad_accum: int = 1
  fm_weight: float = 1.0
  fm_gen_only: bool = False
  ce_chunk: int = 1024

  @classmethod
  def from_config(cls, config) -> "StepOptions":
    t = config.train
    return cls(int(t.grad_accum), float(t.fm_weight), bool(t.fm_gen_only), int(t.ce_chunk))


def make_loss_and_grad(model: Cheers, config, mesh: Optional[Mesh] = None) -> Callable:
  """(params, batch_stats, batch, x0) -> (grads of the trainable params, sums of losses).

  Not jitted: the building block of the step, also useful on its own (tests, debugging).
  """
  opts = StepOptions.from_config(config)
  compute = jnp.dtype(model.cfg.dtype)

  def micro_loss(trainable, frozen, batch_stats, mb, x0, n_text, w_total):
    variables = {"params": opt_lib.combine(trainable, frozen), "batch_stats": batch_stats}
    out = model.apply(variables, mb, x0, method=Cheers.train_forward)
    kernel = model.apply(variables, method=Cheers.head_kernel)
    losses = cheers_loss(out["hidden"], kernel, mb["targets"], out["velocity"], out["u"], mb["image_kind"],
                         mb["image_weight"], fm_weight=opts.fm_weight, fm_gen_only=opts.fm_gen_only,
                         ce_chunk=opts.ce_chunk, logits_dtype=compute)
    # cheers_loss normalises by this micro-batch's counts: rescale to the global ones so the
    # micro-batch losses (and gradients) sum to the full batch's
    n_local = jnp.maximum(losses["num_text_targets"], 1).astype(jnp.float32)
    w_local = jnp.maximum(jnp.sum(fm_weights(mb["image_kind"], mb["image_weight"], opts.fm_gen_only)), 1.0)
    loss_ar = losses["loss_ar"] * n_local / jnp.maximum(n_text, 1).astype(jnp.float32)
    loss_fm = losses["loss_fm"] * w_local / jnp.maximum(w_total, 1.0)
    total = loss_ar + opts.fm_weight * loss_fm
    return total, {"loss": total, "loss_ar": loss_ar, "loss_fm": loss_fm}

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def loss_and_grad(params, batch_stats, batch, x0):
    mask = opt_lib.trainable_mask(params, config.train.trainable)
    trainable, frozen = opt_lib.partition(params, mask)
    n_text = jnp.sum(batch["targets"] != IGNORE_INDEX)
    w_total = jnp.sum(fm_weights(batch["image_kind"], batch["image_weight"], opts.fm_gen_only))
    if opts.grad_accum == 1:
      grads, sums = grad_fn(trainable, frozen, batch_stats, batch, x0, n_text, w_total)
    else:
      micro = _split_micro({**batch, "x0": x0}, opts.grad_accum)

      def body(carry, mb):
        g_sum, l_sum = carry
        mb = dict(mb)
        if mesh is not None:  # keep each micro-batch spread over all devices
          mb = {k: jax.lax.with_sharding_constraint(v, _leading_sharding(mesh, v)) for k, v in mb.items()}
        x0_mb = mb.pop("x0")
        g, l = grad_fn(trainable, frozen, batch_stats, mb, x0_mb, n_text, w_total)
        return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, l_sum, l)), None

      zeros_g = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
      zeros_l = {k: jnp.zeros((), jnp.float32) for k in ("loss", "loss_ar", "loss_fm")}
      (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_l), micro)
    sums = {**sums, "num_text_targets": n_text, "num_images": w_total}
    return grads, sums

  return loss_and_grad


def _leading_sharding(mesh: Mesh, x: Array) -> NamedSharding:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if x.ndim and x.shape[0] % shards == 0:
    return sharding.batch_sharding(mesh, x.ndim)
  return sharding.replicated(mesh)


def latent_shape(cfg: ModelConfig, pixels_shape: tuple[int, ...]) -> tuple[int, ...]:
  m, h, w, _ = pixels_shape
  return (m, h // 16, w // 16, cfg.vae.latent_channels)


def make_train_step(model: Cheers, config, mesh: Mesh, state_shardings: Optional[TrainState] = None,
                    *, donate: bool = True, return_grads: bool = False) -> Callable:
  """One jit-compiled `step(state, batch) -> (state, metrics)` with explicit shardings.

  batch: global arrays (see `device_batch`); an optional 'x0' (M, h, w, C) replaces the drawn noise.
  metrics: device scalars METRIC_KEYS; `skipped_nonfinite` is 1 when the loss or the gradient was
  NaN/Inf, in which case params and optimizer state are left unchanged (the loop stops or goes on
  according to train.nan_policy). return_grads=True adds a third output, the trainable gradients
  (None at frozen leaves), for tests.
  """
  if state_shardings is None:
    _, state_shardings = abstract_train_state(config, mesh)
  key = _program_key("step", config, mesh, model.cfg, donate, return_grads,
                     tuple(jax.tree.leaves(state_shardings)))
  return _memoised(key, lambda: _build_train_step(model, config, mesh, state_shardings, donate, return_grads))


def _build_train_step(model: Cheers, config, mesh: Mesh, state_shardings: TrainState, donate: bool,
                      return_grads: bool) -> Callable:
  tx = opt_lib.make_optimizer(config.train)
  loss_and_grad = make_loss_and_grad(model, config, mesh)
  cfg = model.cfg
  repl = sharding.replicated(mesh)

  def step(state: TrainState, batch: dict):
    with sharding.axis_rules_context(mesh):
      batch = dict(batch)
      x0 = batch.pop("x0", None)
      if x0 is None:
        key = jax.random.fold_in(state.rng, state.step)
        x0 = jax.random.normal(key, latent_shape(cfg, batch["pixels"].shape), jnp.float32)
      grads, sums = loss_and_grad(state.params, state.batch_stats, batch, x0)
      grad_norm = optax.global_norm(grads)
      finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
      mask = opt_lib.trainable_mask(state.params, config.train.trainable)
      trainable, frozen = opt_lib.partition(state.params, mask)
      updates, new_opt = tx.update(grads, state.opt_state, trainable)
      new_trainable = optax.apply_updates(trainable, updates)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      params = opt_lib.combine(keep(new_trainable, trainable), frozen)
      opt_state = keep(new_opt, state.opt_state)
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
      metrics = {**sums, "grad_norm": grad_norm, "lr": opt_lib.current_lr(new_opt).astype(jnp.float32),
                 "skipped_nonfinite": (~finite).astype(jnp.int32)}
      metrics = {k: metrics[k] for k in METRIC_KEYS}
      if return_grads:
        return new_state, metrics, grads
      return new_state, metrics

  out_shardings = (state_shardings, repl) + ((None,) if return_grads else ())
  jitted = jax.jit(step, in_shardings=(state_shardings, None), out_shardings=out_shardings,
                   donate_argnums=(0,) if donate else ())
  return jitted
