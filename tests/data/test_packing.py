"""Packed rows (data.packing): the layout, the config checks, the pipeline's packed batches (resume, skips),
the padding figure, and the loss and gradients of a packed batch against the same samples unpacked on the
oracle's tiny model."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import pytest

from cheers_jax import sharding
from cheers_jax.data import batch as batch_lib
from cheers_jax.data import packing
from cheers_jax.data.pipeline import make_train_iterator
from cheers_jax.errors import ConfigError
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.qwen2 import omni_mask
from cheers_jax.model.sequence import IGNORE_INDEX, assemble
from cheers_jax.train import state as state_lib
from cheers_jax.train import step as step_lib
from tests.train.common import IMAGE, ORACLE, TOKENS, small_config
from tests.train.fake_data import _sample

CKPT = os.path.join(ORACLE, "tiny_ckpt")
KINDS = ("und", "gen", "text", "gen", "und", "text", "gen", "und")


def fake_samples(n: int, seed: int = 0, kinds=KINDS) -> list[dict]:
  """Prepared samples as the pipeline makes them (ids, labels, uint8 pixels, t, kinds), of varied lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    kind = kinds[i % len(kinds)]
    ids, labels, t = _sample(rng, kind, int(rng.integers(3, 12)))
    lay = assemble(np.asarray([ids]), TOKENS, labels=np.asarray([labels]), check_fm_positions=True)
    pixels = rng.integers(0, 256, (1, IMAGE, IMAGE, 3), np.uint8) * (kind != "text")
    out.append(
      {
        "id": f"s{i}",
        "input_ids": np.asarray(ids),
        "labels": np.asarray(labels),
        "pixels": pixels,
        "t": np.asarray([t], np.float32),
        "image_kind": lay.image_kind,
        "length": int(lay.valid.sum()),
      }
    )
  return out


def unpacked_batch(samples: list[dict], seq_len: int) -> tuple[dict, object]:
  ids, labels, mask = batch_lib.pad_samples([s["input_ids"] for s in samples], [s["labels"] for s in samples])
  lay = assemble(ids, TOKENS, attention_mask=mask, labels=labels, seq_len=seq_len, check_fm_positions=True)
  batch = batch_lib.from_assembled(
    lay, TOKENS, 1, np.concatenate([s["pixels"] for s in samples]), np.concatenate([s["t"] for s in samples])
  )
  return batch, lay


def packed_batch(samples: list[dict], spec: packing.PackingSpec) -> tuple[dict, object, list]:
  [placement] = packing.first_fit([s["length"] for s in samples], [1] * len(samples), spec)
  assert len(placement) == len(samples), "the samples must fill one batch"
  ids, labels, mask = batch_lib.pad_samples([s["input_ids"] for s in samples], [s["labels"] for s in samples])
  lay = packing.packed_layout(ids, labels, mask, placement, spec, TOKENS)
  batch = packing.collate_packed(samples, placement, spec, TOKENS)
  return batch, lay, placement


# ---- the layout ------------------------------------------------------------------------------------
def test_packed_rows_hold_each_sample_as_its_own_segment():
  samples = fake_samples(8)
  spec = packing.PackingSpec(rows=3, row_len=96, row_images=4)
  flat, flat_lay = unpacked_batch(samples, 32)
  batch, lay, placement = packed_batch(samples, spec)
  assert batch["token_ids"].shape == (3, 96) and batch["pixels"].shape == (12, IMAGE, IMAGE, 3)
  assert max(np.bincount([r for r, _ in placement])) >= 3  # rows really hold several samples
  assert packing.samples_in(batch) == len(samples) == packing.samples_in(flat)
  mask = np.asarray(omni_mask(batch["image_mask"], batch["valid"], batch["segment_ids"]))
  flat_mask = np.asarray(omni_mask(flat["image_mask"], flat["valid"], flat["segment_ids"]))
  slots, flat_slots = batch_lib.image_slots(lay, spec.row_images), batch_lib.image_slots(flat_lay, 1)
  seen = np.zeros((3, 96), int)
  for b, (row, off) in enumerate(placement):
    n = samples[b]["length"]
    span = slice(off, off + n)
    seen[row, span] += 1
    assert (batch["segment_ids"][row, span] == batch["segment_ids"][row, off]).all()
    for key in ("token_ids", "image_mask", "targets", "valid"):  # the sample's own values, shifted within it
      np.testing.assert_array_equal(batch[key][row, span], flat[key][b, :n], err_msg=key)
    np.testing.assert_array_equal(batch["positions"][row, span], np.arange(n))  # positions restart
    assert batch["targets"][row, off + n - 1] == IGNORE_INDEX  # never a target in the next sample
    # attention within the sample exactly as unpacked, and nothing outside it
    np.testing.assert_array_equal(mask[row, span, span], flat_mask[b, :n, :n])
    assert not mask[row, span].sum() - mask[row, span, span].sum()
    # its image: same slot contents, and its tokens point at that slot
    (k,) = np.flatnonzero(lay.image_sample == b)
    for key in ("pixels", "t", "image_kind", "image_weight"):
      np.testing.assert_array_equal(batch[key][slots[k]], flat[key][flat_slots[k]], err_msg=key)
    np.testing.assert_array_equal(
      batch["image_positions"][slots[k]] - row * 96 - off, flat["image_positions"][flat_slots[k]] - b * 32
    )
    idx = batch["image_index"][row, span]
    assert set(np.unique(idx[idx >= 0] // TOKENS)) == {slots[k]}
  assert seen.max() == 1 and (seen == batch["valid"]).all()  # no overlap, padding only at row ends


def test_first_fit_closes_a_batch_at_the_first_sample_that_fits_no_row():
  spec = packing.PackingSpec(rows=2, row_len=10, row_images=2)
  batches = packing.first_fit([6, 6, 3, 3, 5, 2], [1] * 6, spec)
  assert batches == [[(0, 0), (1, 0), (0, 6), (1, 6)], [(0, 0), (0, 5)]]
  spec_images = packing.PackingSpec(rows=1, row_len=100, row_images=2)  # slots close a row too
  assert packing.first_fit([5, 5, 5], [1, 1, 1], spec_images) == [[(0, 0), (0, 5)], [(0, 0)]]
  with pytest.raises(ValueError, match="fits no row"):
    packing.first_fit([11], [1], spec)


def test_a_packing_config_that_cannot_hold_the_longest_bucket_is_a_config_error():
  data = ml_collections.ConfigDict(
    dict(packing=True, pack_len=0, pack_images=0, seq_buckets=(64, 128), max_images_per_sample=2)
  )
  assert packing.resolve(data, 4, rows=4) == packing.PackingSpec(4, 128, 16)  # defaults: largest bucket, 128/8
  data.pack_len = 100
  with pytest.raises(ConfigError, match=r"data\.pack_len=100 cannot hold the longest bucket \(data\.seq_buckets"):
    packing.resolve(data, 4, rows=4)
  data.pack_len, data.pack_images = 256, 1
  with pytest.raises(ConfigError, match=r"data\.pack_images=1 .*data\.max_images_per_sample=2"):
    packing.resolve(data, 4, rows=4)
  data.packing = False
  assert packing.resolve(data, 4, rows=4) is None


# ---- the pipeline ----------------------------------------------------------------------------------
def packed_config(**data):
  config = small_config()
  config.data.seq_buckets = (64,)
  config.data.max_images_per_sample = 1
  config.data.synthetic_size = 64
  config.data.mix = dict(und=1.0, gen=1.0, text=1.0)
  config.data.packing = True
  config.data.pack_len = 128
  for k, v in data.items():
    config.data[k] = v
  return config


def test_the_pipeline_packs_rows_and_resumes_exactly():
  config = packed_config()
  it = make_train_iterator(config)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  counter = packing.PaddingCounter()
  for batch in first + rest:
    assert batch["token_ids"].shape == (4, 128) and batch["segment_ids"].max() >= 2
    assert batch["pixels"].dtype == np.uint8 and batch["pixels"].shape[0] == 4 * 16
    counter.add(batch)
  assert counter.samples > 5 * 4 and counter.padding < 0.5
  again = make_train_iterator(config)
  again.set_state(state)
  for want in rest:  # the sample held over a batch boundary is read again after a restore
    got = next(again)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_sample_longer_than_the_row_is_skipped_and_counted():
  config = packed_config(seq_buckets=(34,), pack_len=34)  # the synthetic samples have 34-36 tokens
  it = make_train_iterator(config)
  batches = [next(it) for _ in range(3)]
  assert it.skipped["too_long"] > 0 and int(batches[-1]["num_skipped"]) == it.num_skipped
  assert all((b["valid"].sum(1) == 34).all() for b in batches)
  assert all("do not fit a packed row (34)" in msg for _, reason, msg in it.recent_skips if reason == "too_long")


# ---- the padding figure ----------------------------------------------------------------------------
def test_padding_figure_of_the_realistic_mix_at_the_published_buckets():
  lengths = packing.length_mix(4000, tokens_per_image=256, seed=0)
  assert lengths.min() >= 24 + 256 + 6 and lengths.max() <= 24 + 256 + 1560  # question + answer >= 6
  figures = packing.padding_figures(lengths, (512, 1024, 2048, 4096), 8, 2, packing.PackingSpec(8, 4096, 8))
  assert figures["unpacked"]["padding"] > 0.5  # a batch pads to the bucket of its longest sample
  assert figures["packed"]["padding"] <= 0.10  # the goal
  assert figures["packed"]["samples"] == figures["unpacked_alone"]["samples"] == 4000


# ---- loss and gradients: packed == unpacked ------------------------------------------------------------
def test_packed_loss_and_gradients_equal_unpacked_on_the_oracle_model():
  """The same 8 samples, one per row (32 tokens) and packed into 3 rows of 96: loss, its parts and every
  gradient agree to fp32 rounding (same flow-matching noise per image)."""
  config = small_config()
  config.init_from = f"hf:{CKPT}"
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state, _ = state_lib.init_train_state(config, mesh)
  model = Cheers(state_lib.model_config(config))
  loss_and_grad = jax.jit(step_lib.make_loss_and_grad(model, config))
  samples = fake_samples(8, seed=1)
  flat, flat_lay = unpacked_batch(samples, 32)
  spec = packing.PackingSpec(rows=3, row_len=96, row_images=4)
  packed, lay, _ = packed_batch(samples, spec)
  h = IMAGE // model.cfg.vision.patch_size
  noise = np.random.default_rng(2).standard_normal((8, h, h, model.cfg.vae.latent_channels)).astype(np.float32)

  def run(batch, layout, slots_per_row):
    x0 = np.zeros((batch["pixels"].shape[0],) + noise.shape[1:], np.float32)
    x0[batch_lib.image_slots(layout, slots_per_row)] = noise  # image k's noise wherever its slot is
    batch = {k: v for k, v in batch.items() if k not in batch_lib.HOST_ONLY_KEYS}
    with jax.default_matmul_precision("highest"):
      return jax.device_get(loss_and_grad(state.params, state.batch_stats, batch, x0))

  g_flat, s_flat = run(flat, flat_lay, 1)
  g_packed, s_packed = run(packed, lay, spec.row_images)
  assert int(s_packed["num_text_targets"]) == int(s_flat["num_text_targets"]) > 0
  for key in ("loss", "loss_ar", "loss_fm"):
    assert float(s_packed[key]) == pytest.approx(float(s_flat[key]), rel=1e-6, abs=1e-7), key
  leaves_flat, leaves_packed = jax.tree.leaves(g_flat), jax.tree.leaves(g_packed)
  scale = max(float(np.max(np.abs(x))) for x in leaves_flat if x.size)
  worst = max(
    float(np.max(np.abs(np.asarray(a, np.float64) - b))) for a, b in zip(leaves_packed, leaves_flat) if a.size
  )
  print(
    f"packed vs unpacked: loss {float(s_packed['loss']):.7f} vs {float(s_flat['loss']):.7f}, "
    f"gradient max diff {worst:.1e} of max |g| {scale:.1e}"
  )
  assert worst <= 1e-5 * scale


def test_bench_compares_the_same_mix_samples_packed_and_unpacked(capsys):
  """`bench train --mix` builds the same samples both ways (same real tokens and images, fewer rows
  packed); `bench train --padding` prints the figure without compiling anything."""
  from cheers_jax import config as config_lib
  from cheers_jax.bench import train as bench_train
  from cheers_jax.train import synthetic

  buckets = "--config.data.seq_buckets=(512,1024,2048,4096)"
  flat_config = config_lib.load("tiny", [buckets])
  packed_config_ = config_lib.load("tiny", [buckets, "--config.data.packing=True", "--config.data.pack_images=12"])
  flat_spec, packed_spec = (synthetic.batch_spec(c, 16, mix=True) for c in (flat_config, packed_config_))
  flat, packed = synthetic.synthetic_batch(flat_spec), synthetic.synthetic_batch(packed_spec)
  assert packed_spec.rows < flat_spec.rows == 16 and packed["token_ids"].shape == (packed_spec.rows, 4096)
  assert packing.samples_in(packed) == packing.samples_in(flat) == 16
  assert packed["valid"].sum() == flat["valid"].sum() and packed["image_weight"].sum() == flat["image_weight"].sum()
  assert packed_spec.padding < flat_spec.padding
  assert bench_train.main(["--config", "tiny", "--padding", "--batch-size", "8", buckets]) == 0
  out = capsys.readouterr().out
  assert "unpacked, 8 per batch" in out and "packed, 8 rows of 4096 tokens" in out
  assert out.splitlines()[-1].startswith("RESULT ")


def test_train_cli_refuses_a_row_shorter_than_the_longest_bucket(tmp_path):
  """One line naming the keys, exit 2, nothing written."""
  from tests.train.test_cli import run_cli

  proc = run_cli("--config", "tiny", f"--workdir={tmp_path}", "--config.data.packing=True", "--config.data.pack_len=50")
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert "data.pack_len=50 cannot hold the longest bucket (data.seq_buckets=(96,))" in lines[0]
  assert not os.listdir(tmp_path)
