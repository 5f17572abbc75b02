"""SigLIP2 vision transformer and the understanding projector (LayerNorm -> 2x2 unshuffle -> MLP)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from cheers_jax.model.config import VisionConfig
from cheers_jax.model.interp import interpolate_position_table
from cheers_jax.model.layers import Dense, LayerNorm, acc32, attention, partitioned, scan_layers
from cheers_jax.sharding import constrain, gathered

Array = jax.Array


class PatchEmbeddings(nn.Module):
  """Patch conv (valid, stride = patch) flattened row-major + learned position table.

  The table is bicubically interpolated (PyTorch semantics) when the patch grid differs from the
  table's square grid: where the reference runs at all, this is exactly where it interpolates.
  """

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    cfg = self.cfg
    p = cfg.patch_size
    fan_in = 3 * p * p
    bound = 1.0 / fan_in**0.5
    kernel = self.param(
      "kernel",
      partitioned(
        lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound), (None, None, None, "vision_embed")
      ),
      (p, p, 3, cfg.hidden_size),
      self.param_dtype,
    )
    bias = self.param(
      "bias", partitioned(nn.initializers.zeros_init(), ("vision_embed",)), (cfg.hidden_size,), self.param_dtype
    )
    table = self.param(
      "position_embedding",
      partitioned(nn.initializers.normal(0.02), (None, "vision_embed")),
      (cfg.grid**2, cfg.hidden_size),
      self.param_dtype,
    )
    b, h, w, _ = pixels.shape
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=(p, p), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = acc32(conv, pixels.astype(self.dtype), gathered(kernel.astype(self.dtype), (None, None, None, "vision_embed")))
    gh, gw = h // p, w // p
    x = (x + gathered(bias, ("vision_embed",))).astype(self.dtype).reshape(b, gh * gw, cfg.hidden_size)
    if (gh, gw) != (cfg.grid, cfg.grid):
      table = interpolate_position_table(table.astype(jnp.float32), gh, gw)
    return x + gathered(table.astype(self.dtype), (None, "vision_embed"))[None]


class SelfAttention(nn.Module):
  """Multi-head attention with biases; q/k/v/out named as the checkpoint."""

  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, n, d = x.shape
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    hd = d // self.num_heads
    q, k, v = (
      dense(d, ("vision_embed", "vision_heads"), name=f"{c}_proj")(x).reshape(b, n, self.num_heads, hd) for c in "qkv"
    )
    out = attention(q, k, v).reshape(b, n, d)
    return dense(d, ("vision_heads", "vision_embed"), name="out_proj")(out)


class MLP(nn.Module):
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.gelu(dense(self.hidden, ("vision_embed", "vision_mlp"), name="fc1")(x), approximate=True)
    return dense(x.shape[-1], ("vision_mlp", "vision_embed"), name="fc2")(h)


class EncoderLayer(nn.Module):
  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, _) -> tuple[Array, None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = functools.partial(LayerNorm, eps=self.cfg.layer_norm_eps, axis_name="vision_embed", **kw)
    x = x + SelfAttention(self.cfg.num_heads, name="self_attn", **kw)(ln(name="layer_norm1")(x))
    x = x + MLP(self.cfg.intermediate_size, name="mlp", **kw)(ln(name="layer_norm2")(x))
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, None


class PoolingHead(nn.Module):
  """Multihead attention pooling (MAP). In the checkpoint and computed by the reference, unused by Cheers."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, d = x.shape
    probe = self.param(
      "probe", partitioned(nn.initializers.normal(1.0), (None, None, "vision_embed")), (1, 1, d), self.param_dtype
    )
    in_proj = self.param(
      "in_proj_kernel",
      partitioned(nn.initializers.xavier_uniform(), ("vision_embed", None)),
      (d, 3 * d),
      self.param_dtype,
    )
    in_bias = self.param("in_proj_bias", partitioned(nn.initializers.zeros_init(), (None,)), (3 * d,), self.param_dtype)
    hd = d // cfg.num_heads
    wq, wk, wv = jnp.split(in_proj.astype(self.dtype), 3, axis=1)
    bq, bk, bv = jnp.split(in_bias.astype(self.dtype), 3)
    q = (jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d)) @ wq + bq).reshape(b, 1, cfg.num_heads, hd)
    k = (x.astype(self.dtype) @ wk + bk).reshape(b, n, cfg.num_heads, hd)
    v = (x.astype(self.dtype) @ wv + bv).reshape(b, n, cfg.num_heads, hd)
    h = attention(q, k, v).reshape(b, 1, d)
    h = Dense(d, ("vision_heads", "vision_embed"), name="out_proj", **kw)(h)
    h = h + MLP(cfg.intermediate_size, name="mlp", **kw)(
      LayerNorm(cfg.layer_norm_eps, axis_name="vision_embed", name="layernorm", **kw)(h)
    )
    return h[:, 0]


class SigLIP(nn.Module):
  """`vision_representation`: embeddings -> pre-LN encoder (scanned) -> post_layernorm."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"

  def setup(self):
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = PatchEmbeddings(cfg, **kw)
    self.layers = scan_layers(EncoderLayer, cfg.num_layers, (nn.broadcast,), self.remat_policy)(cfg, **kw)
    self.post_layernorm = LayerNorm(cfg.layer_norm_eps, axis_name="vision_embed", **kw)
    if cfg.use_head:
      self.head = PoolingHead(cfg, **kw)

  def encode(self, pixels: Array) -> Array:
    """(B, H, W, 3) -> last_hidden_state (B, H/p * W/p, D)."""
    x, _ = self.layers(self.embeddings(pixels), None)
    return self.post_layernorm(x)

  def pool(self, last_hidden_state: Array) -> Array:
    return self.head(last_hidden_state)

  def __call__(self, pixels: Array) -> tuple[Array, Array | None]:
    hidden = self.encode(pixels)
    return hidden, (self.head(hidden) if self.cfg.use_head else None)


def pixel_unshuffle(x: Array, grid_h: int, grid_w: int) -> Array:
  """(B, gh*gw, D) row-major -> (B, gh/2*gw/2, 4D), channel (kh*2 + kw)*D + d."""
  b, _, d = x.shape
  x = x.reshape(b, grid_h // 2, 2, grid_w // 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (grid_h // 2) * (grid_w // 2), 4 * d)


def pixel_shuffle(x: Array, grid_h: int, grid_w: int) -> Array:
  """Inverse of `pixel_unshuffle`: (B, h*w, 4D) on an (h, w) grid -> (B, 2h*2w, D)."""
  b, _, d4 = x.shape
  d = d4 // 4
  x = x.reshape(b, grid_h, grid_w, 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * 2 * grid_w * 2, d)


class UndProjector(nn.Module):
  """LayerNorm(eps 1e-5) -> 2x2 pixel-unshuffle -> Linear(4D,4D) -> GELU(erf) -> Linear(4D, text)."""

  out_features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bf16_input: bool = False  # the reference casts its input to bf16

  @nn.compact
  def __call__(self, x: Array, grid_h: int, grid_w: int) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.bf16_input:
      x = x.astype(jnp.bfloat16)
    x = LayerNorm(1e-5, axis_name="vision_embed", name="layernorm", **kw)(x)
    x = pixel_unshuffle(x, grid_h, grid_w)
    x = nn.gelu(Dense(x.shape[-1], ("vision_mlp", "mlp"), name="fc1", **kw)(x), approximate=False)
    return Dense(self.out_features, ("mlp", "embed"), name="fc2", **kw)(x)
