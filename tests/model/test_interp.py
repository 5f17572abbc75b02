"""PyTorch-exact bicubic interpolation (cheers_jax.model.interp).

tests/model/data/bicubic_torch.npz was made with torch 2.13 (CPU) by:

    rng = np.random.default_rng(20240611)
    cases = [((1,3,4,4),(6,8)), ((1,4,32,32),(24,40)), ((2,2,3,3),(7,5)), ((1,3,8,8),(5,3)),
             ((1,2,5,7),(9,4))]
    for i, (shp, (oh, ow)) in enumerate(cases):
        x = rng.standard_normal(shp).astype(np.float32)
        y = F.interpolate(torch.from_numpy(x), size=(oh, ow), mode='bicubic', align_corners=False)
        out[f'case{i}_x'], out[f'case{i}_y'] = x, y.numpy()
"""

from __future__ import annotations

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheers_jax.model.interp import (
  bicubic_weight_matrix,
  interpolate_position_table,
  resize_bicubic_torch,
)
from tests import oracle

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ORACLE = str(oracle.ORACLE)
REF_NPZ = os.path.join(HERE, "data", "bicubic_torch.npz")


def _cases():
  d = np.load(REF_NPZ)
  n = len([k for k in d.files if k.endswith("_x")])
  return [(d[f"case{i}_x"], d[f"case{i}_y"]) for i in range(n)]


@pytest.mark.parametrize("idx", range(5))
def test_matches_torch_reference(idx):
  x, ref = _cases()[idx]
  out = np.asarray(resize_bicubic_torch(jnp.asarray(x), ref.shape[-2], ref.shape[-1]))
  assert out.shape == ref.shape and out.dtype == np.float32
  err = np.max(np.abs(out - ref)) / max(1.0, np.max(np.abs(ref)))
  assert err <= 1e-5, err


def test_jit_and_table_layout():
  x, ref = _cases()[1]  # (1, 4, 32, 32) -> (24, 40)
  d = x.shape[1]
  table = x[0].transpose(1, 2, 0).reshape(32 * 32, d)  # row-major grid of D-vectors
  f = jax.jit(interpolate_position_table, static_argnums=(1, 2))
  out = np.asarray(f(jnp.asarray(table), 24, 40))
  want = ref[0].transpose(1, 2, 0).reshape(24 * 40, d)
  assert out.shape == (24 * 40, d)
  assert np.max(np.abs(out - want)) <= 1e-5 * max(1.0, np.max(np.abs(want)))
  g = jax.jit(resize_bicubic_torch, static_argnums=(1, 2))
  np.testing.assert_allclose(np.asarray(g(x, 24, 40)), ref, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_weights_properties():
  for i, o in [(4, 6), (4, 8), (3, 7), (8, 5), (8, 3), (5, 5), (1, 4)]:
    w = bicubic_weight_matrix(i, o)
    assert w.shape == (o, i)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(bicubic_weight_matrix(6, 6), np.eye(6, dtype=np.float32))
  table = np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(interpolate_position_table(table, 4, 4)), table)
  with pytest.raises(ValueError):
    interpolate_position_table(np.zeros((15, 3), np.float32), 4, 4)


# ---------------------------------------------------------------- golden (reference model)


def _read_safetensors(path, names):
  """Minimal safetensors reader (numpy has no bf16: bf16 -> uint16 << 16 -> float32)."""
  with open(path, "rb") as f:
    (hlen,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(hlen))
    base = 8 + hlen
    out = {}
    for name in names:
      meta = header[name]
      s, e = meta["data_offsets"]
      f.seek(base + s)
      raw = f.read(e - s)
      dt = meta["dtype"]
      if dt == "BF16":
        arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
      elif dt == "F32":
        arr = np.frombuffer(raw, np.float32)
      elif dt == "F16":
        arr = np.frombuffer(raw, np.float16).astype(np.float32)
      else:
        raise ValueError(dt)
      out[name] = arr.reshape(meta["shape"]).copy()
  return out


def _load_ckpt(names):
  ck = os.path.join(ORACLE, "tiny_ckpt")
  with open(os.path.join(ck, "model.safetensors.index.json")) as f:
    wm = json.load(f)["weight_map"]
  out = {}
  for shard in sorted({wm[n] for n in names}):
    out.update(_read_safetensors(os.path.join(ck, shard), [n for n in names if wm[n] == shard]))
  return out


def test_siglip_interp_embeddings_golden():
  g = np.load(os.path.join(ORACLE, "golden.npz"))
  px, ref = g["siglip.interp.pixels"], g["siglip.interp.embeddings"]
  pre = "model.vision_representation.embeddings."
  p = _load_ckpt([pre + "patch_embedding.weight", pre + "patch_embedding.bias", pre + "position_embedding.weight"])
  w, b = p[pre + "patch_embedding.weight"], p[pre + "patch_embedding.bias"]
  table = p[pre + "position_embedding.weight"]
  dmod, c, ps, _ = w.shape
  bsz, _, hh, ww = px.shape
  nh, nw = hh // ps, ww // ps
  # patch conv (kernel = stride = ps) as an einsum over non-overlapping patches, row-major tokens
  patches = px.reshape(bsz, c, nh, ps, nw, ps)
  emb = jnp.einsum("bchpwq,dcpq->bhwd", patches, w, precision="highest") + b
  emb = emb.reshape(bsz, nh * nw, dmod)
  pos = jax.jit(interpolate_position_table, static_argnums=(1, 2))(table, nh, nw)
  out = np.asarray(emb + pos[None])
  assert out.shape == ref.shape == (1, 48, 64)
  err = np.max(np.abs(out - ref))
  assert err <= 1e-4 * max(1.0, np.max(np.abs(ref))), err
