"""The Cheers objective: L_AR + lambda * L_FM, exactly as the reference computes it.

- L_AR: sum of token cross-entropies over targets != -100 / their count over the whole batch. The
  (positions x 151,936) logits are never materialised whole: the CE is computed over chunks of the
  labelled positions only, with a written-out gradient that recomputes each chunk's logits instead of
  storing them.
- L_FM: mean squared error between the stage-2 velocity and u = (z1 - x0) * (t < 1) over all images,
  tokens and channels (understanding images, t = 1, have a zero target). `fm_gen_only` restricts it to
  generation images (the paper's variant).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from cheers_jax import sharding
from cheers_jax.sharding import constrain
from cheers_jax.model.sequence import IGNORE_INDEX, KIND_GEN

Array = jax.Array
KERNEL_AXES = ("embed", "vocab")  # the LM head's logical axes (as the parameter's, sharded at rest)


def token_cross_entropy(
  hidden: Array, kernel: Array, targets: Array, chunk: int = 1024, dtype=jnp.float32, groups: int | None = None
) -> tuple[Array, Array]:
  """Per-position CE (0 where target == -100) of logits = hidden @ kernel, in fp32.

  hidden (B, S, D), kernel (D, V), targets (B, S). Returns (ce (B, S), lse (B, S); lse is 0 at
  unlabelled positions). The rows are cut into `groups` blocks (default: the active mesh's data shards,
  `sharding.batch_groups`), so each device sorts and scores only its own rows: a global sort would move
  every labelled state to every device and make each compute the LM head for the whole batch. Within a
  block the labelled positions are moved to the front (a stable sort) and processed in chunks; chunks past
  the fullest block's last labelled position are skipped with `lax.cond`, forward and backward, so the
  cost follows the number of text targets, not B*S (most positions of a Cheers batch are image tokens or
  prompts).
  """
  b, s, d = hidden.shape
  g = sharding.batch_groups(b) if groups is None else groups
  if b % g:
    raise ValueError(f"{b} rows cannot be split into {g} CE groups")
  n = (b // g) * s
  flat_h = hidden.reshape(g, n, d)
  flat_t = targets.reshape(g, n)
  order = jnp.argsort(flat_t == IGNORE_INDEX, axis=1, stable=True)  # labelled first, within each block
  n_labelled = jnp.max(jnp.sum(flat_t != IGNORE_INDEX, axis=1))
  chunk = min(chunk, n)
  pad = (-n) % chunk
  sorted_h = jnp.pad(jnp.take_along_axis(flat_h, order[:, :, None], axis=1), ((0, 0), (0, pad), (0, 0)))
  sorted_t = jnp.pad(jnp.take_along_axis(flat_t, order, axis=1), ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
  sorted_h = constrain(sorted_h, ("activation_batch", None, None))
  sorted_t = constrain(sorted_t, ("activation_batch", None))
  to_chunks = lambda x: jnp.swapaxes(x.reshape(g, -1, chunk, *x.shape[2:]), 0, 1)  # (C, G, chunk, ...)
  ce, lse = _chunked_ce(to_chunks(sorted_h), kernel.astype(dtype), to_chunks(sorted_t), n_labelled)
  rows = jnp.arange(g)[:, None]
  unsort = lambda x: (
    jnp.zeros((g, n), jnp.float32).at[rows, order].set(jnp.swapaxes(x, 0, 1).reshape(g, -1)[:, :n]).reshape(b, s)
  )
  return unsort(ce), unsort(lse)


def _chunk_logits(h: Array, kernel: Array) -> Array:
  return jnp.dot(h.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _chunked_ce(h: Array, kernel: Array, t: Array, n_labelled: Array) -> tuple[Array, Array]:
  """h (C, G, chunk, D) sorted states of G row blocks, kernel (D, V) in the compute dtype, t (C, G, chunk)
  sorted targets -> (ce, lse) (C, G, chunk). Chunks from `n_labelled` on hold no target in any block and
  are skipped (`lax.cond`).

  The gradient is written out (softmax - onehot, per chunk, the kernel's gradient summed in a carry):
  autodiff through the chunk loop kept one kernel-sized residual PER CHUNK (bf16[chunks, 1536, 151936]:
  5.7 GiB at 13 chunks, the largest buffer of the 8-device step)."""
  return _ce_forward(h, kernel, t, n_labelled)


def _ce_forward(h, kernel, t, n_labelled):
  block = h.shape[1:3]

  def compute(h_c, t_c):
    logits = _chunk_logits(h_c, kernel)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.clip(t_c, 0, None)[..., None], axis=-1)[..., 0]
    return jnp.where(t_c != IGNORE_INDEX, lse - picked, 0.0), jnp.where(t_c != IGNORE_INDEX, lse, 0.0)

  def one(args):
    start, h_c, t_c = args
    zeros = jnp.zeros(block, jnp.float32)
    return jax.lax.cond(start < n_labelled, compute, lambda *_: (zeros, zeros), h_c, t_c)

  starts = jnp.arange(h.shape[0]) * h.shape[2]
  return jax.lax.map(one, (starts, h, t))


def _ce_fwd(h, kernel, t, n_labelled):
  ce, lse = _ce_forward(h, kernel, t, n_labelled)
  return (ce, lse), (h, kernel, t, n_labelled, lse)


def _ce_bwd(res, cts):
  """d ce / d logits = softmax - onehot(target), d lse / d logits = softmax (at labelled positions);
  the logits' gradient enters the GEMMs in the compute dtype, with fp32 accumulation (as acc32). Each
  chunk's kernel gradient is reduce-scattered into a carry split like the (embed, vocab) parameter: a
  carry per row block summed at the end made XLA all-gather all of them (f32[8, 1536, 151936], 7 GiB
  per device at fsdp=8); with the few chunks of a shard-local CE this is about one reduction per step."""
  h, kernel, t, n_labelled, lse = res
  g_ce, g_lse = cts
  groups, chunk, d = h.shape[1], h.shape[2], h.shape[3]
  cell = (jnp.arange(groups)[:, None], jnp.arange(chunk)[None, :])

  def grads(dk, h_c, t_c, lse_c, gce_c, glse_c):
    valid = t_c != IGNORE_INDEX
    p = jnp.exp(_chunk_logits(h_c, kernel) - lse_c[..., None])
    g = p * jnp.where(valid, gce_c + glse_c, 0.0)[..., None]
    g = g.at[cell + (jnp.clip(t_c, 0, None),)].add(-jnp.where(valid, gce_c, 0.0))
    g = g.astype(kernel.dtype)
    dh = jnp.dot(g, kernel.T, preferred_element_type=jnp.float32)
    dk_c = jnp.einsum("gcd,gcv->dv", h_c.astype(kernel.dtype), g, preferred_element_type=jnp.float32)
    return dk + constrain(dk_c, KERNEL_AXES), dh

  def body(dk, xs):
    start, h_c, t_c, lse_c, gce_c, glse_c = xs
    skip = lambda dk, *_: (dk, jnp.zeros((groups, chunk, d), jnp.float32))
    return jax.lax.cond(start < n_labelled, grads, skip, dk, h_c, t_c, lse_c, gce_c, glse_c)

  starts = jnp.arange(h.shape[0]) * chunk
  dk0 = constrain(jnp.zeros(kernel.shape, jnp.float32), KERNEL_AXES)
  dk, dh = jax.lax.scan(body, dk0, (starts, h, t, lse, g_ce, g_lse))
  return dh.astype(h.dtype), dk.astype(kernel.dtype), None, None


_chunked_ce.defvjp(_ce_fwd, _ce_bwd)


def cheers_loss(
  hidden: Array,
  head_kernel: Array,
  targets: Array,
  velocity: Array,
  u: Array,
  image_kind: Array,
  image_weight: Array | None = None,
  fm_weight: float = 1.0,
  fm_gen_only: bool = False,
  ce_chunk: int = 1024,
  logits_dtype=jnp.float32,
) -> dict:
  """hidden (B,S,D) final-norm LLM states; targets (B,S) rebuilt next-token targets; velocity, u
  (n_img, h, w, C); image_kind (n_img,); image_weight (n_img,) 1 for real images, 0 for padding slots.
  """
  ce, _ = token_cross_entropy(hidden, head_kernel, targets, ce_chunk, logits_dtype)
  n_text = jnp.sum(targets != IGNORE_INDEX)
  loss_ar = jnp.sum(ce) / jnp.maximum(n_text, 1)

  weight = jnp.ones(image_kind.shape, jnp.float32) if image_weight is None else image_weight.astype(jnp.float32)
  if fm_gen_only:
    weight = weight * (image_kind == KIND_GEN)
  per_image = jnp.mean(jnp.square(velocity.astype(jnp.float32) - u.astype(jnp.float32)), axis=(1, 2, 3))
  loss_fm = jnp.sum(per_image * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  return {
    "loss": loss_ar + fm_weight * loss_fm,
    "loss_ar": loss_ar,
    "loss_fm": loss_fm,
    "token_ce": ce,
    "num_text_targets": n_text,
  }
