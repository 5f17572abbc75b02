"""The chunked, shard-local CE equals a plain cross-entropy, in value and gradient, for any row grouping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheers_jax.model.sequence import IGNORE_INDEX
from cheers_jax.train.loss import token_cross_entropy


def _plain_ce(hidden, kernel, targets):
  logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, jnp.clip(targets, 0, None)[..., None], axis=-1)[..., 0]
  valid = targets != IGNORE_INDEX
  return jnp.where(valid, lse - picked, 0.0), jnp.where(valid, lse, 0.0)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_chunked_ce_matches_plain_ce(groups):
  b, s, d, v = 4, 24, 16, 50
  kh, kk, kt, km = jax.random.split(jax.random.PRNGKey(0), 4)
  hidden = jax.random.normal(kh, (b, s, d))
  kernel = jax.random.normal(kk, (d, v)) * 0.3
  targets = jax.random.randint(kt, (b, s), 0, v)
  # uneven labelled counts per row (one row has none), so blocks skip different numbers of chunks
  keep = jax.random.uniform(km, (b, s)) < jnp.array([0.9, 0.1, 0.0, 0.5])[:, None]
  targets = jnp.where(keep, targets, IGNORE_INDEX)
  weights = jax.random.uniform(km, (b, s))

  def objective(fn):
    def f(h, k):
      ce, lse = fn(h, k)
      return jnp.sum(ce * weights) + 0.1 * jnp.sum(lse * weights)

    return f

  chunked = objective(lambda h, k: token_cross_entropy(h, k, targets, chunk=8, groups=groups))
  plain = objective(lambda h, k: _plain_ce(h, k, targets))
  np.testing.assert_allclose(chunked(hidden, kernel), plain(hidden, kernel), rtol=1e-5)
  got, want = jax.grad(chunked, (0, 1))(hidden, kernel), jax.grad(plain, (0, 1))(hidden, kernel)
  for a, e in zip(got, want):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
  ce, _ = token_cross_entropy(hidden, kernel, targets, chunk=8, groups=groups)
  np.testing.assert_allclose(ce, _plain_ce(hidden, kernel, targets)[0], rtol=1e-5, atol=1e-6)
