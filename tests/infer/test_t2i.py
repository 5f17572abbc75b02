"""Text-to-image and editing: schedules, batching of unequal prompts, editing, argument errors."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from cheers_jax.data.tokenizer import IM_END_ID
from cheers_jax.infer.decode import GenerationError
from cheers_jax.infer.t2i import (
  edit_images,
  edit_prompt,
  edit_schedule,
  edit_steps,
  latent_noise,
  shift_time,
  t2i_prompt,
  t2i_schedule,
  text_to_image,
)


def test_t2i_schedule():
  t, dt = t2i_schedule(4, 0.5)
  np.testing.assert_allclose(t, [0.0, 0.2, 0.5, 1.0], atol=1e-7)
  np.testing.assert_allclose(dt, [0.2, 0.3, 0.5, 0.25], atol=1e-7)  # the last is the extra 1/N at t = 1
  assert t.dtype == dt.dtype == np.float32
  assert np.sum(dt) == pytest.approx(1.25)


def test_edit_schedule_is_exact():
  assert edit_steps(80) == 72 and edit_steps(10) == 9 and edit_steps(4) == 3
  t, dt = edit_schedule(80, 0.5)
  assert len(t) == 72
  assert float(t[0]) == pytest.approx(0.05 / 0.95, abs=1e-7)  # shift(0.1) at a = 0.5: 0.0526
  assert round(float(t[0]), 4) == 0.0526
  np.testing.assert_allclose(t, shift_time(np.linspace(0.1, 1.0, 72), 0.5), atol=1e-7)
  assert t[-1] == 1.0 and dt[-1] == np.float32(1 / 72)
  np.testing.assert_allclose(dt[:-1], np.diff(t), atol=0)


PROMPTS = ("a red circle", "a small blue square on a wooden table next to a window at sunset")


def test_unequal_batch_equals_each_alone(tiny, tokenizer):
  model, variables = tiny
  prompts = [t2i_prompt(tokenizer, p) for p in PROMPTS]
  assert len(prompts[0]) != len(prompts[1])
  kw = dict(steps=2, cfg_scale=3.0, max_new_tokens=3)
  batched = text_to_image(model, variables, prompts, seeds=[11, 12], **kw)
  assert batched.images.shape == (2, 64, 64, 3)
  assert batched.images.min() >= 0 and batched.images.max() <= 1
  for i, prompt in enumerate(prompts):
    alone = text_to_image(model, variables, [prompt], seeds=[11 + i], **kw)
    np.testing.assert_allclose(batched.latent[i], alone.latent[0], atol=1e-4)
    np.testing.assert_allclose(batched.image_raw[i], alone.image_raw[0], atol=1e-4)
    np.testing.assert_array_equal(batched.generated_ids[i], alone.generated_ids[0])
    assert batched.generated_ids[i][0] == IM_END_ID and len(batched.generated_ids[i]) == 4
  assert not np.allclose(batched.latent[0], batched.latent[1])


def test_edit_runs(tiny, tokenizer):
  model, variables = tiny
  rng = np.random.RandomState(0)
  source = rng.rand(1, 64, 64, 3).astype(np.float32)
  # steps 3 -> int(2.7) = 2 evaluations: the same compiled sampler as the 2-step T2I above
  res = edit_images(
    model, variables, [edit_prompt(tokenizer, "make it blue")], source, steps=3, cfg_scale=3.0, seeds=[0]
  )
  assert res.images.shape == (1, 64, 64, 3) and np.isfinite(res.latent).all()
  np.testing.assert_allclose(res.step_t, shift_time(np.linspace(0.1, 1.0, 2), 0.5), atol=1e-7)
  # the starting state is 0.1 encode(src) + 0.9 noise
  from cheers_jax.infer.t2i import _edit_latent, latent_noise

  noise = latent_noise(model, [0])
  z = np.asarray(_edit_latent(model, variables, source, noise, 1.0))  # start_t = 1: the source latent alone
  np.testing.assert_allclose(_edit_latent(model, variables, source, noise, 0.1), 0.1 * z + 0.9 * noise, atol=1e-5)


def test_argument_errors(tiny, tokenizer):
  model, variables = tiny
  prompt = [t2i_prompt(tokenizer, "x")]
  with pytest.raises(GenerationError, match="at least 1"):
    text_to_image(model, variables, prompt, steps=0)
  with pytest.raises(GenerationError, match="at least 2"):
    edit_images(model, variables, [edit_prompt(tokenizer, "x")], np.zeros((1, 64, 64, 3), np.float32), steps=1)
  with pytest.raises(GenerationError, match="max-len"):
    text_to_image(model, variables, prompt, steps=1, max_len=20)
  with pytest.raises(GenerationError, match="source images"):
    edit_images(model, variables, prompt * 2, np.zeros((1, 64, 64, 3), np.float32), steps=4)


def test_latent_noise_is_the_per_seed_draw_in_one_program():
  """Batched noise equals jax.random.normal(PRNGKey(seed)) seed by seed, so an image's noise never depends
  on the batch it is drawn in."""
  cfg = types.SimpleNamespace(
    vision=types.SimpleNamespace(image_size=32, patch_size=8), vae=types.SimpleNamespace(latent_channels=8)
  )
  model = types.SimpleNamespace(cfg=cfg)
  seeds = [0, 1, 7, 123456, 2**31 - 1, -3]
  got = latent_noise(model, seeds)
  assert got.shape == (6, 4, 4, 8) and got.dtype == np.float32
  for row, seed in zip(got, seeds):
    np.testing.assert_array_equal(row, np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (4, 4, 8))))
  np.testing.assert_array_equal(latent_noise(model, seeds[2:4]), got[2:4])
  assert latent_noise(model, []).shape == (0, 4, 4, 8)
