"""The whole Cheers model: tokenizer path, LLM, LM head and the cascaded flow-matching head.

`Cheers` is a linen module whose methods are the model's stages (call them with
`model.apply(variables, ..., method=Cheers.stage)`); the `forward_*` functions compose the stages
exactly as the reference's forward passes do. Layouts: images NHWC, float in [0, 1] or uint8 (training
batches: `unit_pixels` divides them by 255 on the device), latents
(n, h, w, 4*z) with h = H/16, sequences as built by `cheers_jax.model.sequence.assemble`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from cheers_jax.model.cfm_head import DiTProjector, HiGate, TimeEmbedder
from cheers_jax.model.config import ModelConfig
from cheers_jax.model.layers import dtype_of, shard_batch
from cheers_jax.model.qwen2 import Qwen2, omni_mask
from cheers_jax.model.siglip import SigLIP, UndProjector, pixel_shuffle
from cheers_jax.model.vae import VAE, DecoderProjector
from cheers_jax.sharding import constrain

Array = jax.Array

# uint8 -> [0, 1] exactly as the reference rescales (float64 x * (1/255), rounded to float32). A table, not
# a division: XLA compiles x / 255 as x * float32(1/255), which differs in the last bit for 126 of the 256
# values, and the oracle parity is exact.
UNIT_PIXEL_TABLE = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)


def unit_pixels(pixels: Array) -> Array:
  """Images as float32 in [0, 1]: uint8 ones (the batch contract's) divided by 255, float ones unchanged."""
  if pixels.dtype == jnp.uint8:
    return jnp.asarray(UNIT_PIXEL_TABLE)[pixels.astype(jnp.int32)]
  return pixels


def gather_in_rows(values: Array, index: Array, rows: int) -> Array:
  """values[index] where values (rows*L, ...) is in per-row blocks of L and every index of row r
  (index (rows, M)) lies in r's block [r*L, (r+1)*L), or is negative (then row r's first entry).

  Gathering within each row is what keeps a batch sharded over rows local: a flat `jnp.take` over the
  whole batch makes XLA gather every device's values onto every device.
  """
  block = values.shape[0] // rows
  blocks = values.reshape(rows, block, *values.shape[1:])
  local = jnp.clip(index - jnp.arange(rows, dtype=index.dtype)[:, None] * block, 0, block - 1)
  return jnp.take_along_axis(blocks, local.reshape(*local.shape, *([1] * (values.ndim - 1))), axis=1)


class Cheers(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    t, v = cfg.text, cfg.vision
    self.vae_model = VAE(cfg.vae, **kw)
    self.vae_decoder_projector = DecoderProjector(cfg.vae, remat_policy=cfg.remat_policy, **kw)
    self.vision_representation = SigLIP(v, remat_policy=cfg.remat_policy, **kw)
    self.und_projector = UndProjector(t.hidden_size, bf16_input=cfg.reference_bf16_casts, **kw)
    self.time_embed = TimeEmbedder(t.hidden_size, v.hidden_size, **kw)
    self.gen_projector = DiTProjector(
      t.hidden_size,
      t.num_heads,
      t.num_kv_heads,
      cfg.gen_layers,
      4 * v.hidden_size,
      rope_theta=cfg.dit_rope_theta,
      embed_axis="embed",
      remat_policy=cfg.remat_policy,
      **kw,
    )
    self.hi_gate = HiGate(**kw)
    # the reference gives the hi_projector the TEXT config's KV heads
    self.hi_projector = DiTProjector(
      v.hidden_size,
      v.num_heads,
      t.num_kv_heads,
      cfg.hi_layers,
      cfg.vae.ch,
      rope_theta=cfg.dit_rope_theta,
      repeat_positions=True,
      embed_axis="vision_embed",
      remat_policy=cfg.remat_policy,
      **kw,
    )
    self.language_model = Qwen2(t, remat_policy=cfg.remat_policy, attention_impl=cfg.attention, **kw)

  # ---- stages --------------------------------------------------------------------------------
  def encode(self, pixels: Array) -> Array:
    """Frozen VAE encoder: (n, H, W, 3) in [0,1] or uint8 -> normalised latent z1 (n, H/16, W/16, 4z)."""
    return self.vae_model.encode(unit_pixels(pixels))

  def encode_unnormalized(self, pixels: Array) -> Array:
    """The encoder's patchified latent before the BN running statistics (for calibrating them)."""
    return self.vae_model.encode_unnormalized(unit_pixels(pixels))

  def decode(self, z: Array) -> Array:
    """`vae_model.decode` (the final T2I image; unclamped)."""
    return self.vae_model.decode(z)

  def decode_projector(self, z: Array) -> Array:
    """`vae_decoder_projector`: the trainable decoder used on x_t inside the model."""
    return self.vae_decoder_projector(z)

  def siglip(self, pixels: Array) -> tuple[Array, Optional[Array]]:
    """SigLIP last_hidden_state (post-LN) and the (unused) pooled output."""
    return self.vision_representation(pixels)

  def siglip_embeddings(self, pixels: Array) -> Array:
    return self.vision_representation.embeddings(pixels)

  def project(self, features: Array, grid_h: int, grid_w: int) -> Array:
    return self.und_projector(features, grid_h, grid_w)

  def image_tokens(self, x_t: Array) -> dict:
    """The tokenizer path of a task latent: decoder projector -> SigLIP -> und projector."""
    if self.cfg.reference_bf16_casts:
      x_t = x_t.astype(jnp.bfloat16)
    pixel_hat = shard_batch(self.vae_decoder_projector(shard_batch(x_t)))
    p = self.cfg.vision.patch_size
    gh, gw = pixel_hat.shape[1] // p, pixel_hat.shape[2] // p
    features = shard_batch(self.vision_representation.encode(pixel_hat))
    tokens = shard_batch(self.und_projector(features, gh, gw))
    return {"tokens": tokens, "pixel_hat": pixel_hat, "features": features}

  def times(self, t: Array) -> tuple[Array, Array]:
    """t (n,) -> (t_emb1 (n,1,text), t_emb2 (n,1,vision))."""
    return self.time_embed(t)

  def embed(self, ids: Array) -> Array:
    return self.language_model.embed(ids)

  def llm(self, embeds, positions, mask, cache=None, cache_index=None):
    return self.language_model(embeds, positions, mask, cache, cache_index)

  def logits(self, hidden: Array) -> Array:
    return self.language_model.logits(hidden)

  def head_kernel(self) -> Array:
    return self.language_model.head_kernel()

  def velocity(self, image_hidden: Array, t_emb1: Array, t_emb2: Array, pixel_hat: Array) -> dict:
    """CFM head: LLM states of an image's N tokens -> velocity (n, h, w, 4z).

    gen_projector (positions 0..N-1) -> pixel-shuffle -> HiGate with the SigLIP *embeddings* of the
    decoded x_t -> hi_projector (positions [0..L/2-1]*2).
    """
    p = self.cfg.vision.patch_size
    gh, gw = pixel_hat.shape[1] // p, pixel_hat.shape[2] // p
    gen_out = shard_batch(self.gen_projector(shard_batch(image_hidden), t_emb1))
    low = pixel_shuffle(gen_out, gh // 2, gw // 2)
    high = shard_batch(self.vision_representation.embeddings(pixel_hat))
    hi_input, gate = self.hi_gate(low, high)
    v = shard_batch(self.hi_projector(shard_batch(hi_input), t_emb2))
    n = v.shape[0]
    return {
      "velocity": v.reshape(n, gh, gw, v.shape[-1]),
      "gen_out": gen_out,
      "hi_low": low,
      "hi_input": hi_input,
      "gate": gate[..., 0],
    }

  # ---- composed passes (one `apply` each, so gradients flow through all of them) ------------
  def flow_inputs(self, pixels: Array, t: Array, x0: Array) -> dict:
    """Encode images (frozen, no gradient), build x_t = t z1 + (1-t) x0 and u = (z1 - x0)(t < 1)."""
    z1 = jax.lax.stop_gradient(self.encode(pixels).astype(jnp.float32))
    tt = self.quantise_t(t)[:, None, None, None]
    x_t = tt * z1 + (1 - tt) * x0.astype(jnp.float32)
    u = (z1 - x0.astype(jnp.float32)) * (tt < 1).astype(jnp.float32)
    return {"z1": z1, "x_t": x_t, "u": u}

  def quantise_t(self, t: Array) -> Array:
    """The reference casts t to the pixel dtype (bf16 in bf16 runs); mirror that."""
    return t.astype(dtype_of(self.cfg.dtype)).astype(jnp.float32)

  def sequence_embeddings(
    self, token_ids: Array, image_index: Array, image_tokens: Array, valid: Array, images_per_row: bool = False
  ) -> Array:
    """Text embeddings with image slots filled from image_tokens (n_img, N, D) via image_index;
    padding positions are zero vectors, as the reference pads. images_per_row: the batch follows the
    pipeline's contract (slot b*K + i holds an image of row b), so the fill gathers within rows."""
    flat = image_tokens.reshape(-1, image_tokens.shape[-1]).astype(dtype_of(self.cfg.dtype))
    text = self.embed(token_ids)
    if images_per_row:
      img = gather_in_rows(flat, image_index, token_ids.shape[0])
    else:
      img = jnp.take(flat, jnp.clip(image_index, 0, flat.shape[0] - 1), axis=0)
    embeds = jnp.where((image_index >= 0)[..., None], img, text)
    embeds = jnp.where(valid[..., None], embeds, jnp.zeros_like(embeds))
    return constrain(embeds, ("activation_batch", "activation_length", "activation_embed"))

  def multimodal(self, batch: dict, x0: Array, images_per_row: bool = False) -> dict:
    """Understanding / training forward up to the LLM states (Cheers.forward without labels).

    batch: token_ids, image_index, image_mask, valid, positions (B, S), optional segment_ids (B, S) (the
    samples of packed rows, see `omni_mask`); pixels (n_img, H, W, 3); t (n_img,). images_per_row: see
    `sequence_embeddings`.
    """
    flow = self.flow_inputs(shard_batch(batch["pixels"]), batch["t"], x0)
    tok = self.image_tokens(flow["x_t"])
    embeds = self.sequence_embeddings(
      batch["token_ids"], batch["image_index"], tok["tokens"], batch["valid"], images_per_row
    )
    mask = omni_mask(batch["image_mask"], batch["valid"], batch.get("segment_ids"))
    hidden, kv = self.llm(embeds, batch["positions"], mask)
    t1, t2 = self.times(self.quantise_t(batch["t"]))
    return {**flow, **tok, "embeds": embeds, "mask": mask, "hidden": hidden, "kv": kv, "t_emb1": t1, "t_emb2": t2}

  def train_forward(self, batch: dict, x0: Array) -> dict:
    """Everything the loss needs: LLM states, velocities of every image, FM targets.

    batch additionally holds image_positions (n_img, N): flat b*S+s positions of each image's tokens.
    The batch follows the pipeline's contract (cheers_jax/data/pipeline.py): slot b*K + i holds an
    image of row b, so every image gather stays within its row (and its device).
    """
    out = self.multimodal(batch, x0, images_per_row=True)
    hidden = out["hidden"]
    b, s, d = hidden.shape
    m, n = batch["image_positions"].shape
    image_hidden = gather_in_rows(hidden.reshape(b * s, d), batch["image_positions"].reshape(b, m // b * n), b).reshape(
      m, n, d
    )
    head = self.velocity(image_hidden, out["t_emb1"], out["t_emb2"], out["pixel_hat"])
    return {**out, **head}

  def prefill(self, batch: dict, x0: Array, cache: dict) -> dict:
    """Run a prompt (with its images) into a KV cache of static length; returns hidden and cache."""
    flow = self.flow_inputs(batch["pixels"], batch["t"], x0)
    tok = self.image_tokens(flow["x_t"])
    embeds = self.sequence_embeddings(batch["token_ids"], batch["image_index"], tok["tokens"], batch["valid"])
    s, length = embeds.shape[1], cache["k"].shape[2]
    mask = omni_mask(batch["image_mask"], batch["valid"])
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, length - s)))
    hidden, cache = self.llm(embeds, batch["positions"], mask, cache, 0)
    return {"hidden": hidden, "cache": cache}

  def drift(self, x_t: Array, t: Array, cache: dict, cache_index, positions: Array, kv_mask: Array) -> dict:
    """One velocity evaluation of the sampler (the reference's `_drift_fn`).

    The N image tokens of x_t are written at `cache_index` and attend to every cache entry that
    `kv_mask` (B, S_cache) allows and to each other; positions (B, N) continue the prompt.
    """
    tok = self.image_tokens(x_t)
    n = tok["tokens"].shape[1]
    mask = jnp.broadcast_to(kv_mask[:, None, :], (kv_mask.shape[0], n, kv_mask.shape[1]))
    hidden, cache = self.llm(tok["tokens"], positions, mask, cache, cache_index)
    t1, t2 = self.times(self.quantise_t(t))
    head = self.velocity(hidden, t1, t2, tok["pixel_hat"])
    return {**tok, **head, "hidden": hidden, "cache": cache}

  def __call__(self, pixels: Array, ids: Array):
    """Touches every parameter once (used by `init`)."""
    z = self.encode(pixels)
    out = self.image_tokens(z)
    pooled = self.siglip(pixels)[1]
    t1, t2 = self.times(jnp.ones((pixels.shape[0],), jnp.float32))
    s = ids.shape[1]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (ids.shape[0], s, s))
    hidden, _ = self.llm(self.embed(ids), jnp.broadcast_to(jnp.arange(s), ids.shape), mask)
    logits = self.logits(hidden[:, :1])
    vel = self.velocity(out["tokens"], t1, t2, out["pixel_hat"])["velocity"]
    return self.decode(vel), logits, pooled


def init_variables(cfg: ModelConfig, rng: Array, image_size: Optional[int] = None) -> dict:
  """Random variables {'params', 'batch_stats'} for `cfg` (use under jax.eval_shape for shapes only)."""
  size = image_size or cfg.vision.image_size
  pixels = jnp.zeros((1, size, size, 3), jnp.float32)
  ids = jnp.zeros((1, 2), jnp.int32)
  return Cheers(cfg).init(rng, pixels, ids)
