"""FLUX.2-style VAE: encoder, decoder, 2x2 patchify and BatchNorm running-statistics normalisation.

Images are NHWC in [0, 1]; latents are (B, h, w, 4*z_channels) with h = H/16. The patchify channel
order is c*4 + pi*2 + pj, as the reference's `c (i pi) (j pj) -> (c pi pj) i j`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from cheers_jax.model.config import VAEConfig
from cheers_jax.model.layers import acc32, attention, maybe_remat, partitioned, shard_batch
from cheers_jax.sharding import gathered

Array = jax.Array


def patchify(x: Array) -> Array:
  """(B, 2h, 2w, c) -> (B, h, w, c*4), channel = c*4 + pi*2 + pj."""
  b, hh, ww, c = x.shape
  x = x.reshape(b, hh // 2, 2, ww // 2, 2, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # b, i, j, c, pi, pj
  return x.reshape(b, hh // 2, ww // 2, c * 4)


def unpatchify(z: Array) -> Array:
  """Inverse of `patchify`."""
  b, h, w, c4 = z.shape
  z = z.reshape(b, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)  # b, i, pi, j, pj, c
  return z.reshape(b, h * 2, w * 2, c4 // 4)


class GroupNorm(nn.Module):
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    weight = self.param("weight", partitioned(nn.initializers.ones_init(), ("conv_out",)), (c,), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros_init(), ("conv_out",)), (c,), self.param_dtype)
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
    axes = tuple(range(1, x32.ndim - 2)) + (x32.ndim - 1,)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * gathered(weight, ("conv_out",)) + gathered(bias, ("conv_out",))).astype(self.dtype)


class Conv(nn.Module):
  """Conv2d NHWC with an HWIO kernel; padding as explicit pairs like torch."""

  features: int
  kernel: int = 3
  stride: int = 1
  padding: Any = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1] * self.kernel * self.kernel
    bound = 1.0 / fan_in**0.5
    init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)
    kernel = self.param(
      "kernel",
      partitioned(init, (None, None, "conv_in", "conv_out")),
      (self.kernel, self.kernel, x.shape[-1], self.features),
      self.param_dtype,
    )
    bias = self.param(
      "bias", partitioned(nn.initializers.zeros_init(), ("conv_out",)), (self.features,), self.param_dtype
    )
    pad = self.padding
    if isinstance(pad, int):
      pad = ((pad, pad), (pad, pad))
    conv = functools.partial(
      jax.lax.conv_general_dilated,
      window_strides=(self.stride, self.stride),
      padding=pad,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = acc32(conv, x.astype(self.dtype), gathered(kernel.astype(self.dtype), (None, None, "conv_in", "conv_out")))
    return (y + gathered(bias, ("conv_out",))).astype(self.dtype)


class ResnetBlock(nn.Module):
  out_channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.swish(GroupNorm(name="norm1", **kw)(x))
    h = Conv(self.out_channels, name="conv1", **kw)(h)
    h = nn.swish(GroupNorm(name="norm2", **kw)(h))
    h = Conv(self.out_channels, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, kernel=1, padding=0, name="nin_shortcut", **kw)(x)
    return shard_batch(x + h)


class AttnBlock(nn.Module):
  """Single-head self-attention over all h*w positions (head dim = channels)."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    hn = GroupNorm(name="norm", **kw)(x)
    q, k, v = (Conv(c, kernel=1, padding=0, name=n, **kw)(hn).reshape(b, h * w, 1, c) for n in "qkv")
    out = attention(q, k, v).reshape(b, h, w, c)
    return x + Conv(c, kernel=1, padding=0, name="proj_out", **kw)(out)


class MidBlock(nn.Module):
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResnetBlock(c, name="block_1", **kw)(x)
    x = AttnBlock(name="attn_1", **kw)(x)
    return ResnetBlock(c, name="block_2", **kw)(x)


class Encoder(nn.Module):
  cfg: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Conv(cfg.ch, name="conv_in", **kw)(x)
    for level, mult in enumerate(cfg.ch_mult):
      for i in range(cfg.num_res_blocks):
        h = ResnetBlock(cfg.ch * mult, name=f"down_{level}_block_{i}", **kw)(h)
      if level != len(cfg.ch_mult) - 1:
        # torch pads (0,1,0,1) then convolves with stride 2 and no padding
        h = Conv(h.shape[-1], stride=2, padding=((0, 1), (0, 1)), name=f"down_{level}_downsample", **kw)(h)
    h = MidBlock(name="mid", **kw)(h)
    h = nn.swish(GroupNorm(name="norm_out", **kw)(h))
    h = Conv(2 * cfg.z_channels, name="conv_out", **kw)(h)
    return Conv(2 * cfg.z_channels, kernel=1, padding=0, name="quant_conv", **kw)(h)


class Decoder(nn.Module):
  """remat_policy: rematerialise each resnet block (the trainable decoder projector's activations at
  512 px are the step's largest)."""

  cfg: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = maybe_remat(ResnetBlock, self.remat_policy)
    z = Conv(cfg.z_channels, kernel=1, padding=0, name="post_quant_conv", **kw)(shard_batch(z))
    h = Conv(cfg.ch * cfg.ch_mult[-1], name="conv_in", **kw)(z)
    h = maybe_remat(MidBlock, self.remat_policy)(name="mid", **kw)(h)
    for level in reversed(range(len(cfg.ch_mult))):
      for i in range(cfg.num_res_blocks + 1):
        h = block(cfg.ch * cfg.ch_mult[level], name=f"up_{level}_block_{i}", **kw)(h)
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
        h = shard_batch(Conv(h.shape[-1], name=f"up_{level}_upsample", **kw)(h))
    h = nn.swish(GroupNorm(name="norm_out", **kw)(h))
    return Conv(cfg.out_ch, name="conv_out", **kw)(h)


class LatentNorm(nn.Module):
  """BatchNorm2d(affine=False) in eval mode: running statistics only (collection 'batch_stats')."""

  channels: int
  eps: float = 1e-4

  def setup(self):
    self.running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (self.channels,), jnp.float32)
    self.running_var = self.variable("batch_stats", "running_var", jnp.ones, (self.channels,), jnp.float32)

  def _std(self) -> Array:
    return jnp.sqrt(self.running_var.value + self.eps)

  def normalize(self, z: Array) -> Array:
    return ((z.astype(jnp.float32) - self.running_mean.value) / self._std()).astype(z.dtype)

  def denormalize(self, z: Array) -> Array:
    return (z.astype(jnp.float32) * self._std() + self.running_mean.value).astype(z.dtype)


class VAE(nn.Module):
  """`vae_model`: frozen encoder (+ decoder for the final T2I image)."""

  cfg: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(self.cfg, **kw)
    self.decoder = Decoder(self.cfg, **kw)
    self.bn = LatentNorm(self.cfg.latent_channels, self.cfg.bn_eps)

  def encode(self, pixels: Array) -> Array:
    """(B, H, W, 3) in [0,1] -> normalised latent (B, H/16, W/16, 4z) (the moments' mean)."""
    return self.bn.normalize(self.encode_unnormalized(pixels))

  def encode_unnormalized(self, pixels: Array) -> Array:
    """The patchified moments' mean before the BN statistics (what those statistics describe)."""
    moments = self.encoder(pixels)
    return patchify(moments[..., : self.cfg.z_channels])

  def decode(self, z: Array) -> Array:
    return self.decoder(unpatchify(self.bn.denormalize(z)))

  def __call__(self, pixels: Array) -> Array:
    return self.decode(self.encode(pixels))


class DecoderProjector(nn.Module):
  """`vae_decoder_projector`: a second, trainable decoder with its own BN statistics."""

  cfg: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"

  def setup(self):
    self.decoder = Decoder(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, remat_policy=self.remat_policy)
    self.bn = LatentNorm(self.cfg.latent_channels, self.cfg.bn_eps)

  def __call__(self, z: Array) -> Array:
    return self.decoder(unpatchify(self.bn.denormalize(z)))
