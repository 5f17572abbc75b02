"""The cascaded flow-matching head: time embedder, AdaLN-Zero DiT blocks, gen/hi projectors, HiGate."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from cheers_jax.model.layers import (
  Dense,
  LayerNorm,
  RMSNorm,
  SwiGLU,
  apply_rope,
  attention,
  rope_cos_sin,
  scan_layers,
  shard_batch,
)

Array = jax.Array


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """[cos(t f), sin(t f)] (cos first), f_i = exp(-ln(max_period) i / (dim/2)); t is NOT scaled."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbedder(nn.Module):
  """Two MLPs (Linear-SiLU-Linear) on the shared sinusoidal features: emb1 (text), emb2 (vision)."""

  text_width: int
  vision_width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> tuple[Array, Array]:
    """t: (n,) -> (n, 1, text_width), (n, 1, vision_width)."""
    feats = timestep_features(t.reshape(-1)).astype(self.dtype)
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    outs = []
    for i, width, axis in ((1, self.text_width, "embed"), (2, self.vision_width, "vision_embed")):
      h = nn.silu(dense(width, (None, axis), name=f"mlp_{i}_0")(feats))
      outs.append(dense(width, (axis, axis), name=f"mlp_{i}_2")(h)[:, None, :])
    return outs[0], outs[1]


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x * (1 + scale) + shift in fp32, cast back to x's dtype."""
  out = x.astype(jnp.float32) * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
  return out.astype(x.dtype)


class DiTBlock(nn.Module):
  """AdaLN-Zero block: RMSNorm, GQA attention (no biases, RoPE theta 1e4, no mask), SwiGLU 4x.

  Always used under nn.scan, so it returns (x, None).
  """

  width: int
  num_heads: int
  num_kv_heads: int
  embed_axis: str = "embed"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond, cos, sin):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, d = x.shape
    hd = d // self.num_heads
    ax = self.embed_axis
    dense = functools.partial(Dense, use_bias=False, **kw)
    mod = Dense(6 * d, (ax, "modulation"), name="adaLN_modulation", kernel_init=nn.initializers.zeros_init(), **kw)(
      nn.silu(cond)
    )
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

    h = modulate(RMSNorm(1e-6, axis_name=ax, name="input_layernorm", **kw)(x), shift_msa, scale_msa)
    q = dense(self.num_heads * hd, (ax, "heads"), name="q_proj")(h).reshape(b, n, self.num_heads, hd)
    k = dense(self.num_kv_heads * hd, (ax, "kv"), name="k_proj")(h).reshape(b, n, self.num_kv_heads, hd)
    v = dense(self.num_kv_heads * hd, (ax, "kv"), name="v_proj")(h).reshape(b, n, self.num_kv_heads, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    h = attention(q, k, v).reshape(b, n, d)
    h = dense(d, ("heads", ax), name="o_proj")(h)
    x = x + gate_msa * h

    h = modulate(RMSNorm(1e-6, axis_name=ax, name="post_attention_layernorm", **kw)(x), shift_mlp, scale_mlp)
    x = x + gate_mlp * SwiGLU(4 * d, name="mlp", **kw)(h)
    return shard_batch(x), None  # (carry, output) for nn.scan


class FinalLayer(nn.Module):
  out_features: int
  embed_axis: str = "embed"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    mod = Dense(
      2 * d, (self.embed_axis, "modulation"), name="adaLN_modulation", kernel_init=nn.initializers.zeros_init(), **kw
    )(nn.silu(cond))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(RMSNorm(1e-6, axis_name=self.embed_axis, name="norm_final", **kw)(x), shift, scale)
    return Dense(self.out_features, (self.embed_axis, None), name="linear", **kw)(x)


class DiTProjector(nn.Module):
  """`gen_projector` / `hi_projector`: scanned DiT blocks + final layer.

  repeat_positions: RoPE positions [0..L/2-1, 0..L/2-1] (the hi_projector's rule) instead of 0..L-1.
  """

  width: int
  num_heads: int
  num_kv_heads: int
  num_layers: int
  out_features: int
  rope_theta: float = 1e4
  repeat_positions: bool = False
  embed_axis: str = "embed"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    """x (n, L, width), cond (n, 1, width) -> (n, L, out_features)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, length, _ = x.shape
    if self.repeat_positions:
      pos = jnp.tile(jnp.arange(length // 2), 2)
    else:
      pos = jnp.arange(length)
    cos, sin = rope_cos_sin(jnp.broadcast_to(pos, (n, length)), self.width // self.num_heads, self.rope_theta)
    blocks = scan_layers(DiTBlock, self.num_layers, (nn.broadcast,) * 3, self.remat_policy)(
      self.width, self.num_heads, self.num_kv_heads, self.embed_axis, name="blocks", **kw
    )
    x, _ = blocks(x.astype(self.dtype), cond.astype(self.dtype), cos, sin)
    return FinalLayer(self.out_features, self.embed_axis, name="final_layer", **kw)(x, cond.astype(self.dtype))


class HiGate(nn.Module):
  """LayerNorm(low + g * high), g = Linear-SiLU-Linear(low) (no sigmoid: g may be negative)."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, low: Array, high: Array) -> tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = low.shape[-1]
    g = nn.silu(Dense(d, ("vision_embed", "vision_mlp"), name="gate_0", **kw)(low))
    g = Dense(1, ("vision_mlp", None), name="gate_2", kernel_init=nn.initializers.zeros_init(), **kw)(g)
    out = LayerNorm(1e-5, axis_name="vision_embed", name="layer_norm", **kw)(low + g * high.astype(self.dtype))
    return out, g
