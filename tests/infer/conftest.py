"""Shared fixtures: the oracle's tiny checkpoint loaded once, in fp32, as the parity tool loads it."""

from __future__ import annotations


import pytest

from tests.oracle import GOLDEN, ORACLE, TINY  # noqa: F401  (re-exported for the inference tests)


@pytest.fixture(scope="session")
def tiny():
  """(Cheers module, variables) of the tiny oracle checkpoint in fp32."""
  from cheers_jax.infer.loader import load_hf

  return load_hf(TINY, "float32", need_generation=True)


@pytest.fixture(scope="session")
def tokenizer():
  from cheers_jax.data.tokenizer import CheersTokenizer

  return CheersTokenizer()
