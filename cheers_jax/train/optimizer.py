"""AdamW with warmup + constant/cosine schedule, global-norm clipping and trainable masks.

Only trainable parameters carry optimizer state: `partition` splits the params into a trainable
tree and a frozen tree (each with `None` where the other holds a leaf); gradients are taken w.r.t.
the trainable tree only (so XLA never computes the weight gradients of frozen modules) and the
optimizer is initialised on it, so frozen leaves get no moments (memory as if they did not exist).

Trainable sets (the paper's stage table, the reference's align.yaml / sft.yaml):
- `align`: und_projector, gen_projector, hi_projector, hi_gate, time_embed, embed_tokens (tied with
  the LM head; an untied `lm_head` is trainable too);
- `all_but_vae`: everything but `vae_model` (the SigLIP pooling head stays trainable but never gets a
  gradient, as in the reference);
- `all_but_vision_tokenizer`: everything but the pretrained vision tokenizer (`vae_model`,
  `vae_decoder_projector`, `vision_representation`): for a run that starts from pretrained parts and
  should keep them (the embedded default; no gradient flows below `und_projector`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

PyTree = Any

ALIGN_MODULES = ("und_projector", "gen_projector", "hi_projector", "hi_gate", "time_embed")
ALIGN_LEAVES = (("language_model", "embed_tokens"), ("language_model", "lm_head"))
FROZEN_ALWAYS = ("vae_model",)
TOKENIZER_MODULES = ("vae_model", "vae_decoder_projector", "vision_representation")
TRAINABLE_SETS = ("align", "all_but_vae", "all_but_vision_tokenizer")


def trainable_mask(params: PyTree, trainable: str) -> PyTree:
  """A tree of bools like `params` (plain nested dicts): True where the leaf is trained."""
  if trainable not in TRAINABLE_SETS:
    raise ValueError(f"unknown train.trainable '{trainable}'; choose one of {TRAINABLE_SETS}")
  flat = traverse_util.flatten_dict(_as_dict(params))
  mask = {}
  for path in flat:
    if path[0] in FROZEN_ALWAYS:
      mask[path] = False
    elif trainable == "all_but_vae":
      mask[path] = True
    elif trainable == "all_but_vision_tokenizer":
      mask[path] = path[0] not in TOKENIZER_MODULES
    else:
      mask[path] = path[0] in ALIGN_MODULES or tuple(path[:2]) in ALIGN_LEAVES
  return traverse_util.unflatten_dict(mask)


def _as_dict(tree: PyTree) -> PyTree:
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def partition(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
  """(trainable, frozen): the same tree twice, each with None where the other has the leaf."""
  # map over the mask first, so boxed (LogicallyPartitioned) leaves move as a whole
  params = _as_dict(params)
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `partition`."""
  return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=_is_leaf_or_none)


def _is_leaf_or_none(x) -> bool:
  return x is None or isinstance(x, nn.meta.AxisMetadata)


def warmup_steps(train_cfg) -> int:
  """ceil(warmup_ratio * steps), as HF's TrainingArguments.get_warmup_steps."""
  return int(math.ceil(float(train_cfg.warmup_ratio) * int(train_cfg.steps)))


def make_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to lr over `warmup_steps`, then constant or cosine decay to 0 at `steps`.

  Step 0 has lr 0 (HF's get_{constant,cosine}_schedule_with_warmup do the same).
  """
  lr, steps, warm = float(train_cfg.lr), int(train_cfg.steps), warmup_steps(train_cfg)
  if train_cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif train_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(1, steps - warm), alpha=0.0)
  else:
    raise ValueError(f"unknown train.schedule '{train_cfg.schedule}'; choose 'constant' or 'cosine'")
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def _decay_mask(params: PyTree) -> PyTree:
  # HF's Trainer decays matrices only (no biases, norm weights); irrelevant at the default wd = 0
  return jax.tree.map(lambda x: x.ndim > 1, params)


def parse_lr_multipliers(spec: str) -> dict[tuple[str, ...], float]:
  """'und_projector=10,language_model/embed_tokens=0.5' -> {('und_projector',): 10.0, ...}."""
  out = {}
  for item in filter(None, (part.strip() for part in str(spec or "").split(","))):
    name, sep, value = item.partition("=")
    try:
      factor = float(value)
    except ValueError:
      factor = None
    if not sep or not name.strip() or factor is None or not math.isfinite(factor) or factor < 0:
      raise ValueError(
        f"train.lr_multipliers: '{item}' is not MODULE=FACTOR (e.g. 'und_projector=10', "
        "a top-level module or a path such as 'language_model/embed_tokens', factor >= 0)"
      )
    out[tuple(name.strip().strip("/").split("/"))] = factor
  return out


def _dict_path(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def scale_by_module(multipliers: Mapping[tuple[str, ...], float]) -> optax.GradientTransformation:
  """Multiplies each leaf's update by the factor of the longest matching path prefix (per-module
  learning rates, as torch param groups: AdamW's weight decay is scaled with it)."""

  def factor(path: tuple[str, ...]) -> float:
    best = max((p for p in multipliers if path[: len(p)] == p), key=len, default=None)
    return 1.0 if best is None else multipliers[best]

  def init_fn(params):
    paths = [_dict_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for prefix in multipliers:
      if not any(path[: len(prefix)] == prefix for path in paths):
        top = sorted({path[0] for path in paths if path})
        raise ValueError(
          f"train.lr_multipliers names '{'/'.join(prefix)}', which matches no trainable "
          f"parameter; trainable modules: {', '.join(top)}"
        )
    return optax.EmptyState()

  def scale(path, u):
    f = factor(_dict_path(path))
    return u if f == 1.0 else u * jnp.asarray(f, u.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam_stored_in(
  dtype, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  """Adam's scaling (optax.scale_by_adam) with both moments STORED in `dtype` and updated in fp32.

  bfloat16 halves the optimizer state (the official code's AdamW keeps bf16 moments, since its
  parameters are bf16); the update itself is computed in fp32 from the rounded moments.
  """

  def init_fn(params):
    zeros = lambda p: jnp.zeros(p.shape, dtype)
    return optax.ScaleByAdamState(
      count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)
    )

  def update_fn(updates, state, params=None):
    del params
    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
    count = optax.safe_int32_increment(state.count)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    new = jax.tree.map(lambda g, m, v: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), updates, mu, nu)
    store = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
    return new, optax.ScaleByAdamState(count=count, mu=store(mu), nu=store(nu))

  return optax.GradientTransformation(init_fn, update_fn)


def adamw_stored_in(
  learning_rate, b1: float, b2: float, eps: float, weight_decay: float, mask, moment_dtype: str
) -> optax.GradientTransformation:
  """optax.adamw's chain with `scale_by_adam_stored_in(moment_dtype)` (same state layout)."""
  return optax.chain(
    scale_by_adam_stored_in(jnp.dtype(moment_dtype), b1, b2, eps),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) -> AdamW(schedule) [-> per-module lr factors]. Init it on the
  TRAINABLE tree (`partition`).

  The learning rate is an injected hyperparameter so the step can report the value it used
  (`current_lr`, the base rate; `train.lr_multipliers` scales modules relative to it).
  """
  schedule = make_schedule(train_cfg)
  # mask is a function of the params, not a schedule: keep it out of the injected hyperparameters
  hyper = dict(
    learning_rate=schedule,
    b1=float(train_cfg.b1),
    b2=float(train_cfg.b2),
    eps=float(train_cfg.eps),
    weight_decay=float(train_cfg.weight_decay),
    mask=_decay_mask,
  )
  moment_dtype = str(train_cfg.get("opt_state_dtype", "float32"))
  if moment_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"train.opt_state_dtype='{moment_dtype}': use float32 or bfloat16")
  if moment_dtype == "float32":
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(**hyper)
  else:
    adamw = optax.inject_hyperparams(adamw_stored_in, static_args=("mask", "moment_dtype"))(
      **hyper, moment_dtype=moment_dtype
    )
  clip = float(train_cfg.clip_norm)
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else [optax.identity()]
  multipliers = parse_lr_multipliers(train_cfg.get("lr_multipliers", ""))
  if multipliers:
    return optax.chain(*parts, adamw, scale_by_module(multipliers))
  return optax.chain(*parts, adamw)


def current_lr(opt_state) -> jax.Array:
  """The learning rate of the last `update` (inject_hyperparams stores the value it applied)."""
  return opt_state[1].hyperparams["learning_rate"]


def global_norm(tree: PyTree) -> jax.Array:
  return optax.global_norm(tree)
