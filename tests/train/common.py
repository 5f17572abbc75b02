"""Configs and helpers shared by the train tests."""

from __future__ import annotations

import os

import jax
import numpy as np

from configs import tiny
from tests import oracle
from tests.train.fake_data import FakeIterator

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ORACLE = str(oracle.ORACLE)

BATCH, SEQ, IMAGE, TOKENS = 4, 32, 64, 4


def small_config(**train):
  """configs/tiny.py with a 4-sample batch of 32 tokens, no warmup (step 1 already moves the params),
  a log line and a checkpoint every step or two. Tests that share it share compiled programs."""
  c = tiny.get_config()
  # 64-px images (4 tokens each) and the reference's FM-on-every-image default: the tests cover these
  c.model.vision.image_size = c.model.vae.resolution = c.data.image_size = IMAGE
  # the published model's geometry (patch 16, a 3-level VAE: 32 px per token); tiny's patch 8 has its own test
  c.model.vision.patch_size = 16
  c.model.vae.ch_mult = (1, 1, 2, 2)
  c.train.fm_gen_only = False
  # random init, everything but the VAE trained, lambda 1: the paths these tests cover (the shipped tiny
  # default starts from its parts with the tokenizer frozen: tests/train/test_tiny.py)
  c.init_from = ""
  c.model.dtype = "float32"  # these tests compare paths to fp32 rounding; bf16 compute: test_bf16_gemms.py
  c.train.trainable = "all_but_vae"
  c.train.fm_weight = 1.0
  c.train.calibrate_latent_norm = 0  # tested on its own (test_step); the fake batches need no calibration
  c.train.schedule = "constant"
  c.train.ce_chunk = 256
  c.train.batch_size = BATCH
  c.train.steps = 6
  c.train.warmup_ratio = 0.0
  c.train.lr = 1e-3
  c.data.seq_buckets = (SEQ,)
  c.log_every = 1
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 10
  c.sample_prompts = ()
  for k, v in train.items():
    c.train[k] = v
  return c


def fake_iterator(seed: int = 0, batch: int = BATCH) -> FakeIterator:
  return FakeIterator(seed, batch, SEQ, IMAGE, TOKENS)


def max_rel(a, b) -> float:
  """max |a - b| / max(1, max |b|) (the oracle's error measure)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) if b.size else 0.0


def tree_max_abs_diff(a, b) -> float:
  diffs = jax.tree.leaves(
    jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0,
      a,
      b,
    )
  )
  return max(diffs) if diffs else 0.0


def adam_mu(state):
  """Adam's first moment after the first step: (1 - b1) * the clipped gradient (None at frozen leaves)."""
  return state.opt_state[1].inner_state[0].mu


def compare_updates(a, b) -> dict:
  """How far two states are after ONE update from the same start.

  Adam's first step is ~lr * sign(g), so a parameter whose gradient is mathematically zero (a conv bias
  before GroupNorm, an attention key bias) moves by +-lr on rounding noise alone. So the gradients are
  compared through Adam's first moment, relative to the largest one, and the params only where the
  gradient is above the rounding level (|mu| > 1e-4 max|mu|).
  """
  mu_a = [np.asarray(x, np.float64) for x in jax.tree.leaves(adam_mu(a))]
  mu_b = [np.asarray(x, np.float64) for x in jax.tree.leaves(adam_mu(b))]
  scale = max(float(np.max(np.abs(x))) for x in mu_b if x.size)
  grad_err = max(float(np.max(np.abs(x - y))) for x, y in zip(mu_a, mu_b) if x.size) / scale
  from cheers_jax.train import optimizer as opt_lib

  mask = jax.tree.map(lambda x: x is not None, adam_mu(b), is_leaf=lambda x: x is None)
  pa = jax.tree.leaves(opt_lib.partition(jax.device_get(a.params), mask)[0])
  pb = jax.tree.leaves(opt_lib.partition(jax.device_get(b.params), mask)[0])
  param_err, moved = 0.0, 0
  for x, y, m in zip(pa, pb, mu_b):
    well = np.abs(m) > 1e-4 * scale
    if well.any():
      param_err = max(param_err, float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))[well])))
      moved += int(well.sum())
  all_err = tree_max_abs_diff(a.params, b.params)
  return {"grad_rel": grad_err, "param_abs_well": param_err, "param_abs_all": all_err, "well_elements": moved}
