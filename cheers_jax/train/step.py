"""The one jitted train step.

One step = draw the flow-matching noise x0 from a per-step key, split the global batch into
`grad_accum` micro-batches, sum their gradients with `lax.scan` (each micro-batch's loss is
normalised by the GLOBAL text-target count and image weight, so the sum is exactly the full-batch
loss), clip + AdamW on the trainable params only, and guard against non-finite values. Params and
optimizer state are fp32 and sharded by `sharding.param_shardings`; compute runs in `model.dtype`.
Metrics come back as device arrays: the step never syncs with the host. The state is
`cheers_jax.train.state`'s; the batch's placement on the devices is `cheers_jax.train.batching`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cheers_jax import sharding
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.config import ModelConfig
from cheers_jax.model.sequence import IGNORE_INDEX, KIND_GEN
from cheers_jax.train import batching
from cheers_jax.train import optimizer as opt_lib
from cheers_jax.train import state as state_lib
from cheers_jax.train.loss import cheers_loss

Array = jax.Array
METRIC_KEYS = ("loss", "loss_ar", "loss_fm", "grad_norm", "lr", "num_text_targets", "num_images", "skipped_nonfinite")


def fm_weights(image_kind: Array, image_weight: Array, fm_gen_only: bool) -> Array:
  """Per-image FM weights exactly as `cheers_loss` forms them."""
  w = image_weight.astype(jnp.float32)
  if fm_gen_only:
    w = w * (image_kind == KIND_GEN)
  return w


@dataclasses.dataclass(frozen=True)
class StepOptions:
  grad_accum: int = 1
  fm_weight: float = 1.0
  fm_gen_only: bool = False
  ce_chunk: int = 1024

  @classmethod
  def from_config(cls, config) -> "StepOptions":
    train = config.train
    return cls(int(train.grad_accum), float(train.fm_weight), bool(train.fm_gen_only), int(train.ce_chunk))


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
    losses = cheers_loss(
      out["hidden"],
      kernel,
      mb["targets"],
      out["velocity"],
      out["u"],
      mb["image_kind"],
      mb["image_weight"],
      fm_weight=opts.fm_weight,
      fm_gen_only=opts.fm_gen_only,
      ce_chunk=opts.ce_chunk,
      logits_dtype=compute,
    )
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
      micro = batching.split_micro_batches({**batch, "x0": x0}, opts.grad_accum)

      def body(carry, mb):
        g_sum, l_sum = carry
        mb = dict(mb)
        if mesh is not None:  # keep each micro-batch spread over all devices
          mb = {
            k: jax.lax.with_sharding_constraint(v, sharding.leading_axis_sharding(mesh, v.shape)) for k, v in mb.items()
          }
        x0_mb = mb.pop("x0")
        g, l = grad_fn(trainable, frozen, batch_stats, mb, x0_mb, n_text, w_total)
        return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, l_sum, l)), None

      zeros_g = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
      zeros_l = {k: jnp.zeros((), jnp.float32) for k in ("loss", "loss_ar", "loss_fm")}
      (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_l), micro)
    sums = {**sums, "num_text_targets": n_text, "num_images": w_total}
    return grads, sums

  return loss_and_grad


def latent_shape(cfg: ModelConfig, pixels_shape: tuple[int, ...]) -> tuple[int, ...]:
  m, h, w, _ = pixels_shape
  p = cfg.vision.patch_size  # one latent cell per ViT patch
  return (m, h // p, w // p, cfg.vae.latent_channels)


def make_train_step(
  model: Cheers,
  config,
  mesh: Mesh,
  state_shardings: Optional[state_lib.TrainState] = None,
  *,
  donate: bool = True,
  return_grads: bool = False,
) -> Callable:
  """One jit-compiled `step(state, batch) -> (state, metrics)` with explicit shardings.

  batch: global arrays (see `batching.device_batch`); an optional 'x0' (M, h, w, C) replaces the drawn noise.
  metrics: device scalars METRIC_KEYS; `skipped_nonfinite` is 1 when the loss or the gradient was
  NaN/Inf, in which case params and optimizer state are left unchanged (the loop stops or goes on
  according to train.nan_policy). return_grads=True adds a third output, the trainable gradients
  (None at frozen leaves), for tests.
  """
  if state_shardings is None:
    _, state_shardings = state_lib.abstract_train_state(config, mesh)
  key = state_lib.program_key(
    "step", config, mesh, model.cfg, donate, return_grads, tuple(jax.tree.leaves(state_shardings))
  )
  return state_lib.memoised(key, lambda: _build_train_step(model, config, mesh, state_shardings, donate, return_grads))


def _build_train_step(
  model: Cheers, config, mesh: Mesh, state_shardings: state_lib.TrainState, donate: bool, return_grads: bool
) -> Callable:
  tx = opt_lib.make_optimizer(config.train)
  loss_and_grad = make_loss_and_grad(model, config, mesh)
  cfg = model.cfg
  repl = sharding.replicated(mesh)

  def step(state: state_lib.TrainState, batch: dict):
    # train.activation_shardings: the model's activation constraints and gathered weights take effect
    with sharding.axis_rules_context(mesh if config.train.get("activation_shardings", False) else None):
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
      metrics = {
        **sums,
        "grad_norm": grad_norm,
        "lr": opt_lib.current_lr(new_opt).astype(jnp.float32),
        "skipped_nonfinite": (~finite).astype(jnp.int32),
      }
      metrics = {k: metrics[k] for k in METRIC_KEYS}
      if return_grads:
        return new_state, metrics, grads
      return new_state, metrics

  out_shardings = (state_shardings, repl) + ((None,) if return_grads else ())
  jitted = jax.jit(
    step, in_shardings=(state_shardings, None), out_shardings=out_shardings, donate_argnums=(0,) if donate else ()
  )
  return jitted
