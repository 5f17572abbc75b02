"""PyTorch-exact bicubic resizing (``F.interpolate(mode='bicubic', align_corners=False)``).

``jax.image.resize(method='bicubic')`` uses the Keys kernel with a = -0.5 and antialiases when
downscaling, so it does not match PyTorch. PyTorch's CPU/CUDA bicubic kernel is:

* cubic convolution with A = -0.75;
* source coordinate ``src = (dst + 0.5) * scale - 0.5`` with ``scale = in / out`` (when a size is
  given), *not* clamped at 0 for the cubic mode;
* ``i0 = min(floor(src), in - 1)``, ``t = clamp(src - i0, 0, 1)``; the four taps ``i0-1 .. i0+2``
  are clamped to ``[0, in - 1]`` (border replication), no antialiasing.

The resize is separable, so it is expressed as two small dense weight matrices (built with numpy
at trace time, static sizes) applied with einsum in float32: ``out = Wh @ x @ Ww^T``.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

_A = np.float32(-0.75)
_1, _2, _3, _4, _5, _8 = (np.float32(v) for v in (1, 2, 3, 4, 5, 8))


def _cubic_conv1(x: np.ndarray) -> np.ndarray:  # |x| <= 1
  return ((_A + _2) * x - (_A + _3)) * x * x + _1


def _cubic_conv2(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
  return ((_A * x - _5 * _A) * x + _8 * _A) * x - _4 * _A


@functools.lru_cache(maxsize=None)
def bicubic_weight_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix W with ``y = W @ x`` == PyTorch 1-D bicubic resize
  (align_corners=False, no antialias, size given explicitly).

  The source index and the four coefficients are computed in float32 with the same expressions
  as PyTorch's kernel (its opmath type for float inputs), which keeps the match at ~1e-6."""
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"sizes must be positive, got in={in_size} out={out_size}")
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32)
  src = scale * (dst + f32(0.5)) - f32(0.5)  # no clamp at 0 for cubic
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(f32)
  t2 = f32(1.0) - t
  coeffs = [_cubic_conv2(t + f32(1.0)), _cubic_conv1(t), _cubic_conv1(t2), _cubic_conv2(t2 + f32(1.0))]
  w = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for k in range(4):
    idx = np.clip(i0 - 1 + k, 0, in_size - 1)
    np.add.at(w, (rows, idx), coeffs[k].astype(np.float64))
  w = w.astype(np.float32)
  w.flags.writeable = False  # cached: shared between callers
  return w


def resize_bicubic_torch(x, out_h: int, out_w: int):
  """Resize the last two axes of ``x`` (e.g. NCHW) to ``(out_h, out_w)`` exactly like
  ``torch.nn.functional.interpolate(x, size=(out_h, out_w), mode='bicubic',
  align_corners=False)``. Computed in float32, returned in ``x.dtype``. Sizes must be static."""
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"expected at least 2 dims, got shape {x.shape}")
  in_h, in_w = int(x.shape[-2]), int(x.shape[-1])
  wh = jnp.asarray(bicubic_weight_matrix(in_h, int(out_h)))
  ww = jnp.asarray(bicubic_weight_matrix(in_w, int(out_w)))
  xf = x.astype(jnp.float32)
  hp = "highest"
  y = jnp.einsum("oh,...hw->...ow", wh, xf, precision=hp)
  y = jnp.einsum("...ow,pw->...op", y, ww, precision=hp)
  return y.astype(x.dtype)


def interpolate_position_table(table, new_h: int, new_w: int):
  """SigLIP ``interpolate_pos_encoding``: ``table`` (N, D) is a row-major sqrt(N) x sqrt(N) grid;
  returns the bicubically resized (new_h * new_w, D) table, row-major, in ``table.dtype``."""
  table = jnp.asarray(table)
  n, d = int(table.shape[0]), int(table.shape[1])
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"position table length {n} is not a perfect square")
  if (g, g) == (int(new_h), int(new_w)):
    return table
  wh = jnp.asarray(bicubic_weight_matrix(g, int(new_h)))
  ww = jnp.asarray(bicubic_weight_matrix(g, int(new_w)))
  grid = table.astype(jnp.float32).reshape(g, g, d)
  hp = "highest"
  y = jnp.einsum("oh,hwd->owd", wh, grid, precision=hp)
  y = jnp.einsum("pw,owd->opd", ww, y, precision=hp)
  return y.reshape(int(new_h) * int(new_w), d).astype(table.dtype)
