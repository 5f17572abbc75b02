"""Easy-to-get-wrong details, pinned against the oracle's golden numbers (and, where the golden
cannot tell, against hand-computed expectations)."""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from cheers_jax.model import cfm_head, qwen2, sequence, siglip, vae
from tests.oracle import instance_params, load_golden, rel_error

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _checkpoint(instance):
  from cheers_jax.checkpoint.hf import load_hf_checkpoint

  cfg, variables = load_hf_checkpoint(instance / "tiny_ckpt")
  return cfg.replace(dtype="float32", reference_bf16_casts=False), variables


def _apply(instance, fn, *args):
  from cheers_jax.model.cheers import Cheers

  cfg, variables = _checkpoint(instance)
  return np.asarray(Cheers(cfg).apply(variables, *args, method=fn))


@pytest.mark.parametrize("instance", instance_params())
def test_omni_mask_matches_golden(instance):
  g = load_golden(instance)
  n = json.load(open(instance / "golden_manifest.json"))["instance"]["tokens_per_image"]
  for name in ("und", "train", "train3"):
    layout = sequence.assemble(g[f"{name}.input_ids"], n, attention_mask=g.get(f"{name}.attention_mask"))
    mask = np.asarray(qwen2.omni_mask(jnp.asarray(layout.image_mask), jnp.asarray(layout.valid)))
    np.testing.assert_array_equal(mask.astype(np.int8), g[f"{name}.omni_mask"], err_msg=name)


def test_omni_mask_rules_by_hand():
  # [t t I I t I I t P P]: two image blocks, text causal, pads attend only to their own run
  image_mask = np.array([[0, 0, 1, 1, 0, 1, 1, 0, 0, 0]])
  valid = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], bool)
  m = np.asarray(qwen2.omni_mask(jnp.asarray(image_mask), jnp.asarray(valid)))[0]
  assert m[2, 3] and m[3, 2]  # bidirectional inside a block
  assert not m[2, 5] and m[5, 2]  # blocks see earlier blocks causally only
  assert m[5, 6] and m[6, 5]
  assert not m[4, 5] and m[7, 6]  # text is causal
  assert not m[8, 7] and not m[7, 8]  # no valid <-> pad attention
  assert m[8, 9] and m[9, 8]  # pads see their own run, so no empty row
  assert m.any(axis=1).all()


@pytest.mark.parametrize("instance", instance_params())
def test_targets_match_reference_relabelling(instance):
  g = load_golden(instance)
  n = json.load(open(instance / "golden_manifest.json"))["instance"]["tokens_per_image"]
  for name in ("train", "train3"):
    layout = sequence.assemble(
      g[f"{name}.input_ids"],
      n,
      attention_mask=g[f"{name}.attention_mask"],
      labels=g[f"{name}.labels"],
      check_fm_positions=True,
    )
    s = layout.targets.shape[1]
    np.testing.assert_array_equal(layout.targets[:, : s - 1].reshape(-1), g[f"{name}.text_labels"])


def test_fm_position_check_rejects_unlabelled_images():
  ids = np.array([[1, 2, sequence.IM_START_ID, sequence.IMAGE_GEN_TOKEN_INDEX, sequence.IM_END_ID, 3]])
  labels = np.array([[-100, -100, -100, 151666, 151668, 3]])  # <im_start> not labelled
  with pytest.raises(sequence.SequenceError, match="im_start"):
    sequence.assemble(ids, 4, labels=labels, check_fm_positions=True)


def test_pixel_unshuffle_channel_order():
  d, gh, gw = 3, 4, 6
  x = np.arange(gh * gw * d, dtype=np.float32).reshape(1, gh * gw, d)
  out = np.asarray(siglip.pixel_unshuffle(jnp.asarray(x), gh, gw))
  grid = x.reshape(gh, gw, d)
  for i in range(gh // 2):
    for j in range(gw // 2):
      token = out[0, i * (gw // 2) + j]
      for kh in range(2):
        for kw in range(2):
          np.testing.assert_array_equal(token[(kh * 2 + kw) * d : (kh * 2 + kw + 1) * d], grid[2 * i + kh, 2 * j + kw])
  back = np.asarray(siglip.pixel_shuffle(jnp.asarray(out), gh // 2, gw // 2))
  np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("instance", instance_params())
def test_pixel_shuffle_matches_golden(instance):
  g = load_golden(instance)
  gen_out = g["heads.gen_out"]
  side = int(round(gen_out.shape[1] ** 0.5))
  np.testing.assert_array_equal(np.asarray(siglip.pixel_shuffle(jnp.asarray(gen_out), side, side)), g["heads.hi_low"])


def test_patchify_channel_order():
  c, h, w = 2, 4, 6
  x = np.arange(h * w * c, dtype=np.float32).reshape(1, h, w, c)
  z = np.asarray(vae.patchify(jnp.asarray(x)))
  for i in range(h // 2):
    for j in range(w // 2):
      for ch in range(c):
        for pi in range(2):
          for pj in range(2):
            assert z[0, i, j, ch * 4 + pi * 2 + pj] == x[0, 2 * i + pi, 2 * j + pj, ch]
  np.testing.assert_array_equal(np.asarray(vae.unpatchify(jnp.asarray(z))), x)


@pytest.mark.parametrize("instance", instance_params())
def test_patchify_and_bn_match_golden(instance):
  """golden moments -> mean -> patchify -> BatchNorm(eps 1e-4) == golden z."""
  g = load_golden(instance)
  _, variables = _checkpoint(instance)
  stats = variables["batch_stats"]["vae_model"]["bn"]
  zc = g["vae_encode.moments"].shape[1] // 2
  mean = np.transpose(g["vae_encode.moments"][:, :zc], (0, 2, 3, 1))
  z = np.asarray(vae.patchify(jnp.asarray(mean)))
  z = (z - np.asarray(stats["running_mean"])) / np.sqrt(np.asarray(stats["running_var"]) + 1e-4)
  assert rel_error(np.transpose(z, (0, 3, 1, 2)), g["vae_encode.z"]) < TOL
  wrong_eps = (np.asarray(vae.patchify(jnp.asarray(mean))) - np.asarray(stats["running_mean"])) / np.sqrt(
    np.asarray(stats["running_var"]) + 1e-5
  )
  assert rel_error(np.transpose(wrong_eps, (0, 3, 1, 2)), g["vae_encode.z"]) > TOL


@pytest.mark.parametrize("instance", instance_params())
def test_hi_projector_rope_positions(instance):
  """[0..L/2-1, 0..L/2-1] matches the golden; plain 0..L-1 positions do not."""
  g = load_golden(instance)
  cfg, variables = _checkpoint(instance)
  params = {"params": variables["params"]["hi_projector"]}
  kw = dict(
    width=cfg.vision.hidden_size,
    num_heads=cfg.vision.num_heads,
    num_kv_heads=cfg.text.num_kv_heads,
    num_layers=cfg.hi_layers,
    out_features=cfg.vae.ch,
    embed_axis="vision_embed",
  )
  args = (g["heads.hi_gate_out"], g["heads.t_emb2"])
  right = cfm_head.DiTProjector(repeat_positions=True, **kw).apply(params, *args)
  wrong = cfm_head.DiTProjector(repeat_positions=False, **kw).apply(params, *args)
  assert rel_error(right, g["heads.hi_out"]) < TOL
  assert rel_error(wrong, g["heads.hi_out"]) > 10 * TOL


@pytest.mark.parametrize("instance", instance_params())
def test_time_embedding_is_cos_first_and_unscaled(instance):
  g = load_golden(instance)
  t = g["time_embed.t"].reshape(-1)
  feats = np.asarray(cfm_head.timestep_features(jnp.asarray(t)))
  assert rel_error(feats, g["time_embed.freq"]) < 1e-6
  sin_first = np.concatenate([feats[:, 128:], feats[:, :128]], axis=1)
  assert rel_error(sin_first, g["time_embed.freq"]) > 0.1
  scaled = np.asarray(cfm_head.timestep_features(jnp.asarray(t * 1000)))
  assert rel_error(scaled, g["time_embed.freq"]) > 0.1


def test_rope_inverse_frequencies_are_bf16_rounded():
  from cheers_jax.model.layers import rope_cos_sin

  cos, sin = rope_cos_sin(jnp.array([[1.0]]), 128, 1e6)
  inv_freq = np.arctan2(np.asarray(sin)[0, 0, :64], np.asarray(cos)[0, 0, :64])  # angle at position 1
  exact = 1.0 / (1e6 ** (np.arange(0, 128, 2) / 128))
  rounded = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.max(np.abs(inv_freq / rounded - 1)) < 1e-5
  assert np.max(np.abs(inv_freq / exact - 1)) > 1e-3
