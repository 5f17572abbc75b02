"""T2I and I2T generation against the oracle's golden arrays (fp32, tolerance 1e-4 of max|golden|)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.infer.conftest import GOLDEN, ORACLE, TINY


@pytest.fixture(scope="module")
def runner():
  from cheers_jax.golden import Runner

  return Runner(str(TINY), dict(np.load(GOLDEN, allow_pickle=False)))


@pytest.fixture(scope="module")
def manifest():
  return json.loads((ORACLE / "golden_manifest.json").read_text())


@pytest.mark.parametrize("group", ["t2i", "i2t"])
def test_group_matches_golden(runner, manifest, group):
  from cheers_jax.golden import compare

  ours = getattr(runner, f"group_{group}")()
  expected = {k for k, v in manifest["arrays"].items() if k.startswith(group + ".") and v["role"] == "output"}
  assert expected <= set(ours), f"not computed: {sorted(expected - set(ours))}"
  rows = compare(ours, runner.g, manifest, "float32")
  bad = [(name, err, tol) for name, _, err, tol, ok, _ in rows if not ok]
  assert not bad, f"outside tolerance: {bad}"


def test_generated_ids_budget(runner):
  """max_length 6 gives 7 ids (I2T); after a 4-token image, max_length 8 gives <im_end> + 5 ids."""
  from cheers_jax.infer.decode import reference_max_new_tokens

  assert reference_max_new_tokens(6) == 7 == runner.g["i2t.generated_ids"].shape[1]
  assert 1 + reference_max_new_tokens(8, runner.tokens_per_image) == runner.g["t2i.generated_ids"].shape[1]
