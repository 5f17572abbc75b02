"""The jitted train step: oracle parity of loss and gradients, one update, grad accumulation, NaN skip,
optimizer masks and schedules, FLOPs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest

from cheers_jax import sharding, targets
from cheers_jax.model.cheers import UNIT_PIXEL_TABLE, Cheers
from cheers_jax.model.config import ModelConfig
from cheers_jax.train import metrics as metrics_lib
from cheers_jax.train import optimizer as opt_lib
from cheers_jax.train import batching
from cheers_jax.train import state as state_lib
from cheers_jax.train import step as step_lib
from tests.train.common import (
  BATCH,
  IMAGE,
  ORACLE,
  SEQ,
  TOKENS,
  compare_updates,
  max_rel,
  small_config,
  tree_max_abs_diff,
)
from tests.train.fake_data import make_batch

GOLDEN = os.path.join(ORACLE, "golden.npz")
CKPT = os.path.join(ORACLE, "tiny_ckpt")
FP32_TOL = 1e-4  # the oracle's fp32 tolerance (max|ours - golden| / max(1, max|golden|))


@jax.jit
def _clone(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# ---- (a) parity with the oracle ------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity_setup():
  from cheers_jax.golden import Runner

  golden = dict(np.load(GOLDEN, allow_pickle=False))
  runner = Runner(CKPT, golden, "float32")
  config = small_config()
  config.init_from = f"hf:{CKPT}"
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state, shardings = state_lib.init_train_state(config, mesh)
  model = Cheers(state_lib.model_config(config))
  step_fn = step_lib.make_train_step(model, config, mesh, shardings, donate=False, return_grads=True)
  return golden, runner, config, mesh, state, step_fn


@pytest.mark.heavy  # CI runs the parity tool's train groups (tests/test_parity.py); this is the jitted step
@pytest.mark.parametrize("group", ["train", "train3"])
def test_step_matches_oracle_loss_and_gradients(parity_setup, group):
  """Loss, AR/FM parts, per-module gradient norms and recorded gradients of the jitted step (golden x0
  fed through batch['x0'], fp32) equal the reference's to the oracle's 1e-4."""
  from cheers_jax.checkpoint.hf import hf_tensor
  from cheers_jax.golden import nchw_to_nhwc

  golden, runner, config, mesh, state, step_fn = parity_setup
  layout, batch = runner.layout_batch(group, labels=True)
  batch.update(
    targets=layout.targets,
    image_kind=layout.image_kind.astype(np.int32),
    image_weight=np.ones(layout.num_images, np.float32),
    x0=nchw_to_nhwc(golden[f"{group}.x0"]).astype(np.float32),
  )
  shardings = batching.batch_shardings(mesh, batch)
  with jax.default_matmul_precision("highest"):
    _, metrics, grads = step_fn(state, batching.device_batch(batch, shardings))
  metrics = jax.device_get(metrics)
  errors = {
    "loss": max_rel(metrics["loss"], golden[f"{group}.loss"]),
    "text_loss": max_rel(metrics["loss_ar"], golden[f"{group}.text_loss"]),
    "image_loss": max_rel(metrics["loss_fm"], golden[f"{group}.image_loss"]),
  }
  # per-module gradient norms, grouped as the oracle groups them
  grads = jax.device_get(grads)
  sq = {}
  for module, sub in grads.items():
    for key, leaf in sub.items() if module == "language_model" else [(None, sub)]:
      name = "language_model.embed_tokens(=lm_head)" if key == "embed_tokens" else module
      sq[name] = sq.get(name, 0.0) + sum(
        float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(leaf)
      )
  names = [str(x) for x in golden[f"{group}.grad_groups"]]
  want_norms = golden[f"{group}.grad_norms"]
  errors["grad_norms"] = max_rel(np.sqrt([sq.get(n, 0.0) for n in names]), want_norms)
  errors["grad_norm(global)"] = max_rel(metrics["grad_norm"], np.sqrt(np.sum(np.square(want_norms.astype(np.float64)))))
  full = jax.tree.map(
    lambda g, p: np.zeros(p.shape, np.float32) if g is None else np.asarray(g),
    grads,
    state.params,
    is_leaf=lambda x: x is None,
  )  # frozen leaves: zero gradient
  for key in golden:
    if key.startswith(f"{group}.grad.model."):
      errors[key] = max_rel(hf_tensor({"params": full}, key[len(f"{group}.grad.") :]), golden[key])
  assert int(metrics["num_text_targets"]) == int(np.sum(golden[f"{group}.text_labels"] != -100))
  worst = max(errors, key=errors.get)
  print(f"{group}: worst {errors[worst]:.2e} at {worst}; " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
  assert errors[worst] <= FP32_TOL, errors


# ---- (b) one update, accumulation, (e) NaN skip ---------------------------------------------------
@pytest.fixture(scope="module")
def step_setup():
  config = small_config()
  mesh = sharding.make_mesh(dict(config.mesh))
  state, shardings = state_lib.init_train_state(config, mesh)
  model = Cheers(state_lib.model_config(config))
  step_fn = step_lib.make_train_step(model, config, mesh, shardings)  # as the loop builds it
  batch = make_batch(0, 0, BATCH, SEQ, IMAGE, TOKENS)
  batch.pop("num_skipped")
  return config, mesh, model, state, shardings, step_fn, batch


def test_one_step_decreases_loss(step_setup):
  config, mesh, _, state, _, step_fn, batch = step_setup
  dev = batching.device_batch(batch, batching.batch_shardings(mesh, batch))
  new, m0 = step_fn(_clone(state), dev)
  # the same step counter again gives the same noise: the loss difference is the update's alone
  again = _clone(new)  # the next call donates its input
  _, m1 = step_fn(again.replace(step=_clone(state.step)), dev)
  m0, m1 = jax.device_get((m0, m1))
  assert int(new.step) == 1 and int(m0["skipped_nonfinite"]) == 0
  assert m0["lr"] == pytest.approx(config.train.lr)
  assert m1["loss"] < m0["loss"] - 1e-3, (m0["loss"], m1["loss"])
  assert m1["loss_ar"] < m0["loss_ar"]
  # frozen VAE untouched, trainable params moved
  assert tree_max_abs_diff(new.params["vae_model"], state.params["vae_model"]) == 0.0
  assert tree_max_abs_diff(new.params["gen_projector"], state.params["gen_projector"]) > 0.0


def test_grad_accumulation_equals_full_batch(step_setup):
  """2 micro-batches give the full batch's loss, gradient norm and update (fp32)."""
  config, mesh, model, state, shardings, step_fn, batch = step_setup
  accum = small_config(grad_accum=2)
  step2 = step_lib.make_train_step(model, accum, mesh, shardings)
  dev = batching.device_batch(batch, batching.batch_shardings(mesh, batch))
  full_state, full = step_fn(_clone(state), dev)
  acc_state, acc = step2(_clone(state), dev)
  full, acc = jax.device_get((full, acc))
  for key in ("loss", "loss_ar", "loss_fm", "grad_norm"):
    assert acc[key] == pytest.approx(full[key], rel=2e-6), key
  assert int(acc["num_text_targets"]) == int(full["num_text_targets"])
  cmp = compare_updates(jax.device_get(acc_state), jax.device_get(full_state))
  print(
    f"accumulation vs full batch: loss rel {abs(acc['loss'] - full['loss']) / full['loss']:.1e}, "
    f"gradient (Adam mu) {cmp['grad_rel']:.1e} of max, params {cmp['param_abs_well']:.1e} abs where the "
    f"gradient is above rounding ({cmp['well_elements']} elements), {cmp['param_abs_all']:.1e} over all "
    f"(lr {config.train.lr})"
  )
  assert cmp["grad_rel"] <= 1e-5
  assert cmp["param_abs_well"] <= 1e-6
  assert cmp["param_abs_all"] <= 2 * config.train.lr  # rounding-noise gradients: at most a flipped sign


def test_nonfinite_step_is_skipped(step_setup):
  """NaN flow-matching times -> NaN loss: params and optimizer state stay as they were, the step is counted."""
  _, mesh, _, state, _, step_fn, batch = step_setup
  bad = dict(batch, t=np.full_like(batch["t"], np.nan))  # (uint8 pixels cannot be NaN)
  before = jax.device_get(state)
  dev = batching.device_batch(bad, batching.batch_shardings(mesh, bad))
  copy = _clone(state)
  with jax.transfer_guard("disallow"):  # the step itself never moves data to or from the host
    new, m = step_fn(copy, dev)
  m, after = jax.device_get((m, new))
  assert int(m["skipped_nonfinite"]) == 1 and not np.isfinite(m["loss"])
  assert int(after.step) == int(before.step) + 1
  assert tree_max_abs_diff(after.params, before.params) == 0.0
  assert tree_max_abs_diff(after.opt_state, before.opt_state) == 0.0


# ---- optimizer ---------------------------------------------------------------------------------------
def test_trainable_masks_and_frozen_state():
  config = small_config(trainable="align")
  abstract, shardings = state_lib.abstract_train_state(config, sharding.make_mesh({"data": 1}))
  mask = opt_lib.trainable_mask(abstract.params, "align")
  assert mask["language_model"]["embed_tokens"] is True
  assert mask["language_model"]["layers"]["mlp"]["up_proj"]["kernel"] is False
  assert mask["vision_representation"]["layers"]["mlp"]["fc1"]["kernel"] is False
  assert mask["vae_decoder_projector"]["decoder"]["conv_in"]["kernel"] is False
  assert all(jax.tree.leaves(mask["gen_projector"])) and all(jax.tree.leaves(mask["hi_gate"]))
  # no moments for frozen params: Adam's mu covers exactly the trainable leaves
  mu = abstract.opt_state[1].inner_state[0].mu
  assert mu["language_model"]["layers"]["mlp"]["up_proj"]["kernel"] is None
  assert mu["language_model"]["embed_tokens"].shape == abstract.params["language_model"]["embed_tokens"].shape
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  trainable = count(opt_lib.partition(abstract.params, mask)[0])
  assert count(mu) == trainable < count(abstract.params)
  full = opt_lib.trainable_mask(abstract.params, "all_but_vae")
  assert not any(jax.tree.leaves(full["vae_model"]))
  assert all(jax.tree.leaves({k: v for k, v in full.items() if k != "vae_model"}))
  with pytest.raises(ValueError, match="trainable"):
    opt_lib.trainable_mask(abstract.params, "everything")


def test_schedules():
  c = small_config(steps=100, warmup_ratio=0.02, lr=1e-4)
  sched = opt_lib.make_schedule(c.train)
  assert opt_lib.warmup_steps(c.train) == 2
  assert [float(sched(i)) for i in (0, 1, 2, 50, 99)] == pytest.approx([0, 5e-5, 1e-4, 1e-4, 1e-4])
  c.train.schedule = "cosine"
  sched = opt_lib.make_schedule(c.train)
  assert float(sched(2)) == pytest.approx(1e-4)
  assert float(sched(51)) == pytest.approx(5e-5, rel=1e-3)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-12)


def test_lr_multipliers_act_as_per_module_learning_rates():
  """'a=3,b/c=0' moves module a exactly as AdamW at 3x the lr (weight decay included, as torch param
  groups), freezes b/c, leaves the rest at the base lr; bad specs and unknown modules are clear errors."""
  params = {"a": {"w": jnp.ones((2, 3))}, "b": {"c": jnp.ones((4,)), "d": jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda x: jnp.linspace(-1.0, 2.0, x.size).reshape(x.shape), params)

  def updates(lr, multipliers):
    c = small_config(lr=lr, weight_decay=0.1, clip_norm=0.0, lr_multipliers=multipliers)
    tx = opt_lib.make_optimizer(c.train)
    return tx.update(grads, tx.init(params), params)[0]

  base, scaled = updates(1e-2, ""), updates(1e-2, " a=3, b/c=0 ")
  np.testing.assert_allclose(scaled["a"]["w"], updates(3e-2, "")["a"]["w"], rtol=1e-6)
  assert not np.any(scaled["b"]["c"])
  np.testing.assert_array_equal(scaled["b"]["d"], base["b"]["d"])
  assert opt_lib.parse_lr_multipliers("language_model/embed_tokens=0.5") == {("language_model", "embed_tokens"): 0.5}
  for bad in ("a", "a=fast", "=2", "a=-1"):
    with pytest.raises(ValueError, match="MODULE=FACTOR"):
      opt_lib.parse_lr_multipliers(bad)
  with pytest.raises(ValueError, match="matches no trainable parameter; trainable modules: a, b"):
    opt_lib.make_optimizer(small_config(lr_multipliers="und_projector=10").train).init(params)


def test_bf16_adam_moments():
  """train.opt_state_dtype: the fp32-stored variant of our Adam equals optax.adamw exactly over 3 steps;
  bfloat16 stores both moments in bf16 (half the bytes) and its updates stay within bf16 rounding."""
  params = {"a": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}, "b": jnp.ones((5,))}
  grads = [
    jax.tree.map(lambda x, k=k: jnp.sin(jnp.arange(x.size, dtype=jnp.float32) * (k + 1)).reshape(x.shape), params)
    for k in range(3)
  ]

  def run(tx):
    state, out = tx.init(params), []
    for g in grads:
      u, state = tx.update(g, state, params)
      out.append(u)
    return out, state

  hyper = dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, mask=None)
  want, _ = run(optax.adamw(**hyper))
  same, _ = run(opt_lib.adamw_stored_in(**hyper, moment_dtype="float32"))
  low, low_state = run(opt_lib.adamw_stored_in(**hyper, moment_dtype="bfloat16"))
  for w, s, l in zip(want, same, low):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), w, s)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-4), w, l)
  assert {x.dtype for x in jax.tree.leaves((low_state[0].mu, low_state[0].nu))} == {jnp.dtype(jnp.bfloat16)}
  tx = opt_lib.make_optimizer(small_config(opt_state_dtype="bfloat16").train)
  assert {x.dtype for x in jax.tree.leaves(tx.init(params)[1].inner_state[0].mu)} == {jnp.dtype(jnp.bfloat16)}
  with pytest.raises(ValueError, match="opt_state_dtype"):
    opt_lib.make_optimizer(small_config(opt_state_dtype="float16").train)


def test_latent_norm_calibration_standardises_a_random_vae(tmp_path):
  """train.calibrate_latent_norm on a random init: both VAE copies get the encoder latents' per-channel
  mean / variance over the first training images, so encode() gives mean 0 and variance 1 on them."""
  from cheers_jax.train import checkpointing as ckpt_lib

  config = small_config(calibrate_latent_norm=12)
  config.data.seq_buckets = (64,)  # the synthetic samples are ~35 tokens: at 32 the pipeline skips them all
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state, shardings, resumed = ckpt_lib.restore_or_init(config, tmp_path, mesh)
  assert not resumed
  images = state_lib.calibration_images(config, 12)
  assert images.shape == (12, IMAGE, IMAGE, 3) and images.dtype == np.uint8  # as the batches carry them
  stats = jax.device_get(state.batch_stats)
  bn = stats["vae_model"]["bn"]
  np.testing.assert_array_equal(bn["running_mean"], stats["vae_decoder_projector"]["bn"]["running_mean"])
  np.testing.assert_array_equal(bn["running_var"], stats["vae_decoder_projector"]["bn"]["running_var"])
  assert np.all(bn["running_var"] > 0) and np.any(bn["running_mean"] != 0)
  model = Cheers(state_lib.model_config(config))
  z = np.asarray(
    model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, method=Cheers.encode), np.float64
  ).reshape(-1, bn["running_mean"].shape[0])
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
  # BN divides by sqrt(var + eps): the variance is var / (var + eps), just under 1
  np.testing.assert_allclose(z.var(0), bn["running_var"] / (bn["running_var"] + model.cfg.vae.bn_eps), rtol=1e-3)
  fresh, _ = state_lib.init_train_state(small_config(), mesh)
  assert tree_max_abs_diff(fresh.params, state.params) == 0.0  # only the statistics change


def test_latent_calibration_uses_only_accepted_samples_and_reports_the_real_count(tmp_path, caplog):
  """Issue 13 item 4: the calibration said "calibrated on 256 training images" when it had used 2, and took
  images from samples the pipeline skips (here an over-long one, all white). It now prepares samples as the
  pipeline does, skips what the pipeline skips (the over-long one, a decompression bomb, a missing file)
  and logs the count it used."""
  import json
  import logging

  from PIL import Image

  from cheers_jax.data.images import preprocess_understanding
  from cheers_jax.train import checkpointing as ckpt_lib
  from tests.data.test_images import write_bomb_png

  rng = np.random.default_rng(0)
  good = [rng.integers(0, 120, (IMAGE, IMAGE, 3), dtype=np.uint8) for _ in range(2)]
  for i, arr in enumerate(good):
    Image.fromarray(arr).save(tmp_path / f"good{i}.png")
  Image.fromarray(np.full((IMAGE, IMAGE, 3), 255, np.uint8)).save(tmp_path / "white.png")
  write_bomb_png(tmp_path / "bomb.png")
  conv = lambda answer: [
    {"from": "human", "value": "<im_start><image><im_end>\nWhat is it?"},
    {"from": "gpt", "value": answer},
  ]
  lines = [
    {"id": "long", "image": "white.png", "conversations": conv(" ".join(["word"] * 80))},
    {"id": "g0", "image": "good0.png", "conversations": conv("A square.")},
    {"id": "bomb", "image": "bomb.png", "conversations": conv("A square.")},
    {"id": "missing", "image": "none.png", "conversations": conv("A square.")},
    {"id": "g1", "image": "good1.png", "conversations": conv("A square.")},
  ]
  (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  config = small_config(calibrate_latent_norm=256)
  config.data.source, config.data.jsonl_path, config.data.seq_buckets = "jsonl", str(tmp_path / "data.jsonl"), (64,)

  images = state_lib.calibration_images(config, 256)
  assert images.shape == (2, IMAGE, IMAGE, 3) and not (images == 255).all(axis=(1, 2, 3)).any()
  for got, arr in zip(images, good):  # uint8; divided by 255 on the device, they are the processor's pixels
    want = preprocess_understanding(arr, IMAGE).pixel_values.transpose(1, 2, 0)
    np.testing.assert_array_equal(UNIT_PIXEL_TABLE[got], want)

  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with caplog.at_level(logging.INFO):
    ckpt_lib.restore_or_init(config, tmp_path / "run", mesh)
  assert "calibrated on 2 training images (of the 256 asked" in caplog.text


def test_init_from_hf_with_other_shapes_names_the_differing_fields():
  """Issue 13 item 7: init_from=hf:DIR with another model's shapes printed two whole ModelConfigs; the
  error now names each differing field with both values, before any tensor is read."""
  from cheers_jax.errors import ConfigError

  config = small_config()
  config.model.text = dict(config.model.text, num_layers=3)
  config.init_from = f"hf:{CKPT}"
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with pytest.raises(ConfigError) as e:
    state_lib.init_train_state(config, mesh)
  msg = str(e.value)
  assert "1 field(s): text.num_layers: 3 (config) vs 2 (checkpoint)" in msg
  assert "--config.model.text.num_layers=2" in msg
  assert "TextConfig(" not in msg and "\n" not in msg


# ---- FLOPs -------------------------------------------------------------------------------------------
def test_flops_match_the_oracle_count():
  """Full size, 512x512, seq 400: 16.2 TFLOP per training sample (oracle README), per module too."""
  cfg = ModelConfig()
  total = metrics_lib.flops_per_sample(cfg, 400, 512)
  assert total == pytest.approx(16.2e12, rel=0.1)
  assert total == pytest.approx(16.2e12, rel=0.01)  # in fact within 1 %
  fwd = metrics_lib.forward_flops(cfg, 400, 512)
  oracle = {
    "vae_encoder": 1.119,
    "vae_decoder_projector": 2.516,
    "siglip": 0.980,
    "und_projector": 0.015,
    "llm": 1.076,
    "lm_head": 0.187,
    "gen_projector": 0.128,
    "hi_gate": 0.003,
    "hi_projector": 0.131,
  }
  for name, tflop in oracle.items():
    assert fwd[name] / 1e12 == pytest.approx(tflop, rel=0.05, abs=1e-3), name
  assert metrics_lib.flops_per_sample(cfg, 400, 512, trainable="align") < total
  assert targets.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert targets.peak_flops_per_device("TPU v5 lite") == 197e12
  assert targets.peak_flops_per_device("cpu") is None and metrics_lib.mfu(1e12, 1, "cpu") is None
  assert metrics_lib.mfu(989e12 / 2, 2, "NVIDIA H100") == pytest.approx(0.25)


def test_a_patch_of_8_pixels_trains():
  # patch 8 with a 2-level VAE (4x down, then the 2x2 patchify): one latent cell per patch, 4 tokens per
  # 32-px image; the pipeline and the step derive every size from the patch
  config = small_config()
  config.model.vision = dict(config.model.vision, image_size=32, patch_size=8)
  config.model.vae = dict(config.model.vae, resolution=32, ch_mult=(1, 2, 2))
  config.data.image_size = 32
  mesh = sharding.make_mesh(dict(config.mesh))
  state, shardings = state_lib.init_train_state(config, mesh)
  model = Cheers(state_lib.model_config(config))
  assert model.cfg.tokens_per_image == 4
  step_fn = step_lib.make_train_step(model, config, mesh, shardings)
  batch = make_batch(0, 0, BATCH, SEQ, 32, 4)
  batch.pop("num_skipped")
  dev = batching.device_batch(batch, batching.batch_shardings(mesh, batch))
  new, m0 = step_fn(_clone(state), dev)
  _, m1 = step_fn(_clone(new).replace(step=_clone(state.step)), dev)
  m0, m1 = jax.device_get((m0, m1))
  assert int(m0["skipped_nonfinite"]) == 0 and np.isfinite(m0["loss_fm"])
  assert m1["loss"] < m0["loss"]
