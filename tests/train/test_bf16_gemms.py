"""bf16 compute means bf16 GEMM operands in both passes (fp32 accumulation inside the GEMM)."""

from __future__ import annotations

import re

import jax

from cheers_jax import config as config_lib
from cheers_jax import sharding
from cheers_jax.model.cheers import Cheers
from cheers_jax.train import state as state_lib
from cheers_jax.train import step as step_lib
from cheers_jax.train import synthetic
from tests.scale.common import SMALL_VOCAB, TINY

_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b.*:\s*\((.*?)\)\s*->")


def gemm_operand_types(hlo_text: str) -> list[tuple[str, list[str]]]:
  """(op, operand element types) of every dot_general and convolution in StableHLO text."""
  ops = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m:
      ops.append((m.group(1), re.findall(r"x([a-z][a-z0-9]*)>", m.group(2))))
  return ops


def test_bf16_train_step_has_no_f32_gemm_operand():
  """The whole train step of the tiny model in bf16, as lowered before XLA's passes: no dot or conv,
  forward or backward, takes an f32 operand (the loss's logits and softmax stay fp32 by accumulation)."""
  # the published geometry (patch 16, a 3-level VAE), as the convolution count below assumes
  config = config_lib.load(
    TINY,
    [
      SMALL_VOCAB,
      "--config.model.dtype=bfloat16",
      "--config.model.vision.patch_size=16",
      "--config.model.vae.ch_mult=(1,1,2,2)",
    ],
  )
  mesh = sharding.make_mesh_on_first_devices({"fsdp": 1}, jax.devices()[:1])
  abstract, shardings = state_lib.abstract_train_state(config, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  step_fn = step_lib.make_train_step(Cheers(state_lib.model_config(config)), config, mesh, shardings)
  text = step_fn.lower(state, synthetic.abstract_batch(synthetic.batch_spec(config, 4, seq_len=96), mesh)).as_text()
  ops = gemm_operand_types(text)
  dots = [t for op, t in ops if op == "dot_general"]
  assert len(dots) > 100 and sum(op == "convolution" for op, _ in ops) > 50, len(ops)  # forward and backward
  f32 = [(op, t) for op, t in ops if "f32" in t]
  assert not f32, f"{len(f32)} of {len(ops)} GEMMs take an f32 operand: {f32[:5]}"
  assert all(t == ["bf16", "bf16"] for t in dots), {tuple(t) for t in dots}


def test_gemm_operand_parser():
  line = (
    "%3 = stablehlo.dot_general %1, %2, contracting_dims = [1] x [0] : "
    "(tensor<8x96xbf16>, tensor<96x4xf32>) -> tensor<8x4xf32>"
  )
  assert gemm_operand_types(line) == [("dot_general", ["bf16", "f32"])]


def test_acc32_gradients_match_fp32_within_bf16_rounding():
  """dot, einsum and conv through acc32: bf16 gradients are the fp32 ones to bf16 rounding; fp32 is exact."""
  import functools
  import jax.numpy as jnp
  import numpy as np
  from cheers_jax.model.layers import acc32

  conv = functools.partial(
    jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  cases = [  # (op, lhs, rhs, cotangent)
    (jnp.dot, (8, 4), (4, 6), (8, 6)),
    (functools.partial(jnp.einsum, "btd,bsd->bts"), (2, 5, 4), (2, 7, 4), (2, 5, 7)),
    (conv, (2, 3, 3, 4), (3, 3, 4, 6), (2, 3, 3, 6)),
  ]
  for i, (op, ls, rs, cs) in enumerate(cases):
    a, b, c = (jax.random.normal(key, s) for key, s in zip(jax.random.split(jax.random.PRNGKey(i), 3), (ls, rs, cs)))
    loss = lambda a, b, dt: jnp.sum(acc32(op, a.astype(dt), b.astype(dt)) * c)
    plain = jax.grad(lambda a, b: jnp.sum(op(a, b, preferred_element_type=jnp.float32) * c), (0, 1))(a, b)
    exact = jax.grad(loss, (0, 1))(a, b, jnp.float32)
    got = jax.grad(loss, (0, 1))(a, b, jnp.bfloat16)
    for g, e, r in zip(got, exact, plain):
      np.testing.assert_array_equal(np.asarray(e), np.asarray(r))
      assert g.dtype == jnp.float32 and g.shape == r.shape
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=0.03 * float(jnp.max(jnp.abs(r))))
