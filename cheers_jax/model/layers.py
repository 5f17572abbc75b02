"""Shared building blocks: dense layers with logical axes, norms, RoPE, one attention function, SwiGLU.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`); the mapping of
logical names to mesh axes lives in `cheers_jax/sharding.py` only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from cheers_jax.sharding import constrain, gathered

Array = jax.Array
DType = Any

NEG_INF = -1e30  # finite, so a fully masked row (never produced by our masks) cannot give NaN


def dtype_of(name_or_dtype) -> DType:
  return jnp.dtype(name_or_dtype) if isinstance(name_or_dtype, str) else name_or_dtype


def partitioned(init: Callable, axes: Sequence[Optional[str]]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(axes))


def torch_linear_init(fan_in_axis: int = -2) -> Callable:
  """Uniform(+-1/sqrt(fan_in)) like torch.nn.Linear (a sensible from-scratch init)."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = shape[fan_in_axis] if len(shape) >= 2 else shape[0]
    bound = 1.0 / max(1, fan_in) ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def acc32(op: Callable, lhs: Array, rhs: Array) -> Array:
  """`op(lhs, rhs, preferred_element_type=float32)`: a GEMM or conv with fp32 accumulation (as torch).

  With low-precision operands the backward takes the cotangent in the operands' dtype, so the backward
  GEMMs are bf16 x bf16 with fp32 accumulation inside, as bf16 autograd does. Plain autodiff would
  transpose through the fp32 result: every backward GEMM would take an f32 operand (twice the memory,
  no tensor-core rate). In fp32 this is `op` itself.
  """
  low = lhs.dtype
  if low == jnp.float32:
    return op(lhs, rhs, preferred_element_type=jnp.float32)

  @jax.custom_vjp
  def f(a, b):
    return op(a, b, preferred_element_type=jnp.float32)

  def fwd(a, b):
    return f(a, b), (a, b)

  def bwd(res, ct):
    _, vjp = jax.vjp(lambda a, b: op(a, b, preferred_element_type=low), *res)
    return vjp(ct.astype(low))

  f.defvjp(fwd, bwd)
  return f(lhs, rhs.astype(low))


class Dense(nn.Module):
  """y = x @ kernel (+ bias); kernel (in, out) with logical axes `axes`."""

  features: int
  axes: tuple[Optional[str], Optional[str]]
  use_bias: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Optional[Callable] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
      "kernel",
      partitioned(self.kernel_init or torch_linear_init(), self.axes),
      (x.shape[-1], self.features),
      self.param_dtype,
    )
    # fp32 accumulation and bias add, one rounding to the compute dtype (as torch's addmm)
    y = acc32(jnp.dot, x.astype(self.dtype), gathered(kernel.astype(self.dtype), self.axes))
    if self.use_bias:
      bias = self.param(
        "bias", partitioned(nn.initializers.zeros_init(), (self.axes[1],)), (self.features,), self.param_dtype
      )
      y = y + gathered(bias.astype(self.dtype), self.axes[1:]).astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""

  eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param(
      "weight", partitioned(nn.initializers.ones_init(), (self.axis_name,)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return gathered(weight.astype(self.dtype), (self.axis_name,)) * normed.astype(x.dtype).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with two-pass fp32 statistics (as torch), scale/bias named weight/bias."""

  eps: float = 1e-5
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    weight = self.param("weight", partitioned(nn.initializers.ones_init(), (self.axis_name,)), (d,), self.param_dtype)
    bias = self.param("bias", partitioned(nn.initializers.zeros_init(), (self.axis_name,)), (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    weight, bias = (gathered(v.astype(jnp.float32), (self.axis_name,)) for v in (weight, bias))
    return (y * weight + bias).astype(self.dtype)


# ---- rotary position embedding ---------------------------------------------------------------


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos/sin of shape positions.shape + (head_dim,), computed in fp32 (rotate-half layout).

  The inverse frequencies are rounded to bf16: the reference keeps them in a floating buffer that
  `model.to(torch.bfloat16)` (training and inference) rounds, and its golden set pins that.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  inv_freq = inv_freq.astype(jnp.bfloat16).astype(jnp.float32)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: (B, T, H, D); cos/sin: (B, T, D). Rotate-half, in x's dtype as the reference does."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


# ---- attention -------------------------------------------------------------------------------


def attention(q: Array, k: Array, v: Array, mask: Optional[Array] = None, *, impl: str = "xla") -> Array:
  """Scaled dot-product attention with grouped KV heads.

  q: (B, T, H, D); k, v: (B, S, KV, D) with H % KV == 0 (KV head j serves query heads j*H/KV ...);
  mask: bool, broadcastable to (B, T, S), True = attend. Softmax in fp32. Returns (B, T, H, D).
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  if impl == "cudnn":
    bias_mask = None if mask is None else jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="cudnn")
  if impl != "xla":
    raise ValueError(f"unknown attention implementation '{impl}' (use 'xla' or 'cudnn')")
  rep = h // kv
  qg = q.reshape(b, t, kv, rep, d)
  logits = acc32(functools.partial(jnp.einsum, "btgrd,bsgd->bgrts"), qg, k)
  logits = logits * (d**-0.5)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None]
    logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = acc32(functools.partial(jnp.einsum, "bgrts,bsgd->btgrd"), probs, v)
  return out.reshape(b, t, h, d).astype(q.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), no biases."""

  hidden: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(self.hidden, ("embed", "mlp"), name="gate_proj")(x)
    up = dense(self.hidden, ("embed", "mlp"), name="up_proj")(x)
    return dense(x.shape[-1], ("mlp", "embed"), name="down_proj")(nn.silu(gate) * up)


# ---- activation sharding ---------------------------------------------------------------------


def shard_batch(x: Array) -> Array:
  """Keep an activation split over the batch mesh axes (logical 'activation_batch'), other dims whole.

  Without it XLA's propagation may follow a weight that is sharded over fsdp and split an image or
  token tensor along its features instead, keeping the GLOBAL batch on every device.
  """
  return constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1))


# ---- remat -----------------------------------------------------------------------------------

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def maybe_remat(module_cls, policy: str, static_argnums=(), prevent_cse: bool = True):
  """prevent_cse=False only inside a scan (scan_layers): outside one, XLA's CSE merges the recomputation
  with the forward pass and keeps every activation (the VAE decoder's blocks at 512 px held 6.5 GiB per
  image on a v5e chip that way)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy '{policy}'; choose one of {sorted(REMAT_POLICIES)}")
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse, static_argnums=static_argnums)


def scan_layers(module_cls, length: int, in_axes: tuple, policy: str = "none", static_argnums=()):
  """nn.scan over `length` identical layers; params get a leading 'layers' axis."""
  return nn.scan(
    maybe_remat(module_cls, policy, static_argnums, prevent_cse=False),
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=in_axes,
    length=length,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
