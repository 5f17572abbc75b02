"""Text decoding: sampling rules, per-sample stopping, unequal-length batches equal single prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheers_jax.infer.decode import (
  GREEDY,
  GenerationError,
  SamplingConfig,
  generate_text,
  prepare_prompts,
  reference_max_new_tokens,
  sample_logits,
)


# ---- sampling (no model) -------------------------------------------------------------------------
def _frequencies(logits, sampling, n=4000):
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  ids = np.asarray(sample_logits(rows, jax.random.PRNGKey(1), sampling))
  return np.bincount(ids, minlength=len(logits)) / n


def test_greedy_is_argmax_below_temperature_threshold():
  logits = jnp.array([[0.1, 2.0, 1.9, -1.0], [3.0, 0.0, 0.0, 3.5]])
  for temperature in (0.0, 1e-6):
    got = sample_logits(logits, jax.random.PRNGKey(0), SamplingConfig(temperature=temperature))
    np.testing.assert_array_equal(got, [1, 3])


def test_temperature_sampling_follows_softmax():
  p = np.array([0.4, 0.3, 0.2, 0.1])
  freq = _frequencies(np.log(p), SamplingConfig(temperature=1.0))
  np.testing.assert_allclose(freq, p, atol=0.03)


def test_top_p_keeps_the_reference_nucleus():
  # cumulative 0.4, 0.7, ...: a token is dropped once the mass before it exceeds 0.5 -> keep the first two
  p = np.array([0.4, 0.3, 0.2, 0.1])
  freq = _frequencies(np.log(p), SamplingConfig(temperature=1.0, top_p=0.5))
  np.testing.assert_allclose(freq, [4 / 7, 3 / 7, 0, 0], atol=0.03)
  assert _frequencies(np.log(p), SamplingConfig(temperature=1.0, top_p=0.3))[0] == 1.0


def test_top_k_and_repetition_penalty():
  p = np.array([0.4, 0.3, 0.2, 0.1])
  freq = _frequencies(np.log(p), SamplingConfig(temperature=1.0, top_k=2))
  assert freq[2] == freq[3] == 0 and abs(freq[0] - 4 / 7) < 0.03
  logits = jnp.array([[2.0, 1.9, -1.0]])
  seen = jnp.array([[True, False, False]])
  # 2.0 / 1.2 < 1.9: the seen token loses the argmax
  assert int(sample_logits(logits, jax.random.PRNGKey(0), SamplingConfig(0.0, repetition_penalty=1.2), seen)[0]) == 1
  with pytest.raises(GenerationError, match="top_p"):
    SamplingConfig(top_p=0.0).validate()


def test_reference_budget():
  assert reference_max_new_tokens(6) == 7  # cur_time > max_length: max_length + 1 tokens
  assert reference_max_new_tokens(300, 256) == 45
  assert reference_max_new_tokens(3, 256) == 0


# ---- with the tiny checkpoint ----------------------------------------------------------------------
PROMPTS = ("hi", "Write a long and detailed story about a lighthouse keeper and the sea.")


def test_unequal_batch_equals_each_alone(tiny, tokenizer):
  model, variables = tiny
  prompts = [tokenizer.build_prompt(p) for p in PROMPTS]
  assert len(prompts[0]) != len(prompts[1])
  batched = generate_text(model, variables, prompts, max_new_tokens=6, sampling=GREEDY, dummy_seeds=[3, 4])
  for i, prompt in enumerate(prompts):
    alone = generate_text(model, variables, [prompt], max_new_tokens=6, sampling=GREEDY, dummy_seeds=[3 + i])
    np.testing.assert_array_equal(batched[i], alone[0])
  assert all(len(x) == 6 for x in batched)


def test_stop_is_per_sample_and_kept(tiny, tokenizer):
  model, variables = tiny
  prompts = [tokenizer.build_prompt(p) for p in PROMPTS]
  free = generate_text(model, variables, prompts, max_new_tokens=6, sampling=GREEDY, dummy_seeds=[3, 4])
  stop = int(free[0][2])  # make sample 0's third id the stop id
  stopped = generate_text(model, variables, prompts, max_new_tokens=6, sampling=GREEDY, dummy_seeds=[3, 4], eos_id=stop)
  first = int(np.flatnonzero(free[0] == stop)[0])
  np.testing.assert_array_equal(stopped[0], free[0][: first + 1])
  hit = np.flatnonzero(free[1] == stop)
  np.testing.assert_array_equal(stopped[1], free[1][: hit[0] + 1] if hit.size else free[1])


def test_prompt_longer_than_cache(tiny, tokenizer):
  model, variables = tiny
  prompt = tokenizer.build_prompt("hello " * 20)
  with pytest.raises(GenerationError, match="max-len"):
    generate_text(model, variables, [prompt], max_new_tokens=2, max_len=16)
  with pytest.raises(GenerationError, match="empty"):
    prepare_prompts(model.cfg, [np.array([], np.int64)])
  with pytest.raises(GenerationError, match="placeholder"):
    prepare_prompts(model.cfg, [np.array([1, -200, -200, 2])], images=[[np.zeros((64, 64, 3), np.float32)]])
