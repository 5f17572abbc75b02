"""Qwen2.5 decoder (GQA, RoPE, RMSNorm, q/k/v biases) with an optional static-size KV cache.

The caller gives the attention mask explicitly, (B, T, S) with S = T without a cache or S = the
cache length with one; `omni_mask` builds the training/understanding mask of the reference.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from cheers_jax.model.config import TextConfig
from cheers_jax.model.layers import (
  Dense,
  RMSNorm,
  SwiGLU,
  acc32,
  apply_rope,
  attention,
  partitioned,
  rope_cos_sin,
  scan_layers,
)
from cheers_jax.sharding import constrain, gathered

Array = jax.Array


def _runs(flags: Array) -> Array:
  """Id of the contiguous run of True each position belongs to (1-based), 0 where False."""
  starts = flags & ~jnp.pad(flags[:, :-1], ((0, 0), (1, 0)))
  return jnp.cumsum(starts, axis=1) * flags


def omni_mask(image_mask: Array, valid: Array, segment_ids: Optional[Array] = None) -> Array:
  """The reference's mixed mask, (B, S, S) bool, True = attend.

  (causal | same image block) & same segment & both valid, then | (both pad & same pad run): text is
  causal, each contiguous run of image tokens is bidirectional, and padding only sees its own run.
  segment_ids (B, S): the samples of a packed row (1, 2, ... on their tokens, 0 on padding); no sample
  sees another. None: each contiguous run of valid tokens is one sample (the reference's one per row).
  """
  image_mask = image_mask.astype(bool)
  valid = valid.astype(bool)
  s = image_mask.shape[1]
  causal = jnp.tril(jnp.ones((s, s), bool))[None]
  img = _runs(image_mask)
  same_img = (img[:, :, None] == img[:, None, :]) & image_mask[:, :, None] & image_mask[:, None, :]
  seg = _runs(valid) if segment_ids is None else segment_ids
  same_valid = (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  pad = _runs(~valid)
  same_pad = (pad[:, :, None] == pad[:, None, :]) & ~valid[:, :, None] & ~valid[:, None, :]
  return ((causal | same_img) & same_valid) | same_pad


class Attention(nn.Module):
  cfg: TextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, cache_index=None):
    cfg = self.cfg
    b, t, _ = x.shape
    hd = cfg.head_dim
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(cfg.num_heads * hd, ("embed", "heads"), name="q_proj")(x).reshape(b, t, cfg.num_heads, hd)
    k = dense(cfg.num_kv_heads * hd, ("embed", "kv"), name="k_proj")(x).reshape(b, t, cfg.num_kv_heads, hd)
    v = dense(cfg.num_kv_heads * hd, ("embed", "kv"), name="v_proj")(x).reshape(b, t, cfg.num_kv_heads, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache_k is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), cache_index, axis=1)
    out = attention(q, k.astype(self.dtype), v.astype(self.dtype), mask, impl=self.impl)
    out = dense(cfg.hidden_size, ("heads", "embed"), use_bias=False, name="o_proj")(out.reshape(b, t, -1))
    return out, k, v


class DecoderLayer(nn.Module):
  cfg: TextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_k, cache_v, cache_index):
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, k, v = Attention(cfg, impl=self.impl, name="self_attn", **kw)(
      RMSNorm(cfg.rms_norm_eps, axis_name="embed", name="input_layernorm", **kw)(x),
      cos,
      sin,
      mask,
      cache_k,
      cache_v,
      cache_index,
    )
    x = x + h
    x = x + SwiGLU(cfg.intermediate_size, name="mlp", **kw)(
      RMSNorm(cfg.rms_norm_eps, axis_name="embed", name="post_attention_layernorm", **kw)(x)
    )
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, (k, v)


class Qwen2(nn.Module):
  """`language_model`: embed_tokens, scanned decoder layers, final norm; logits via the (tied) head."""

  cfg: TextConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  attention_impl: str = "xla"

  def setup(self):
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = self.param(
      "embed_tokens",
      partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
      (cfg.vocab_size, cfg.hidden_size),
      self.param_dtype,
    )
    self.layers = scan_layers(
      DecoderLayer,
      cfg.num_layers,
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
      policy=self.remat_policy,
    )(cfg, impl=self.attention_impl, **kw)
    self.norm = RMSNorm(cfg.rms_norm_eps, axis_name="embed", **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param(
        "lm_head",
        partitioned(nn.initializers.normal(0.02), ("embed", "vocab")),
        (cfg.hidden_size, cfg.vocab_size),
        self.param_dtype,
      )

  def embed(self, ids: Array) -> Array:
    return jnp.take(self.embed_tokens, ids, axis=0).astype(self.dtype)

  def head_kernel(self) -> Array:
    """(hidden, vocab) output projection, in the compute dtype, gathered for use (see sharding.gathered)."""
    kernel = self.embed_tokens.T if self.cfg.tie_word_embeddings else self.lm_head
    return gathered(kernel.astype(self.dtype), ("embed", "vocab"))

  def logits(self, hidden: Array) -> Array:
    return acc32(jnp.dot, hidden.astype(self.dtype), self.head_kernel())

  def __call__(
    self,
    embeds: Array,
    positions: Array,
    mask: Array,
    cache: Optional[dict] = None,
    cache_index: Optional[Array] = None,
  ):
    """embeds (B, T, D), positions (B, T), mask (B, T, S) bool.

    Without a cache: returns (final-norm hidden, {'k','v'} of this call, each (L, B, T, KV, hd)).
    With a cache {'k','v'} of (L, B, S, KV, hd): writes this call's keys/values at `cache_index`
    and attends over the whole cache; returns (hidden, updated cache).
    """
    cfg = self.cfg
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    if cache is None:
      x, (k, v) = self.layers(embeds.astype(self.dtype), cos, sin, mask, None, None, None)
    else:
      x, (k, v) = self.layers(embeds.astype(self.dtype), cos, sin, mask, cache["k"], cache["v"], cache_index)
    return self.norm(x), {"k": k, "v": v}


def init_cache(cfg: TextConfig, batch: int, length: int, dtype=jnp.bfloat16) -> dict:
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
