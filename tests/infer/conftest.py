"""Shared fixtures: the oracle's tiny checkpoint loaded once, in fp32, as the parity tool loads it."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ORACLE = REPO_ROOT.parent / "shared" / "oracle"
TINY = ORACLE / "tiny_ckpt"
GOLDEN = ORACLE / "golden.npz"

needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} not present")


@pytest.fixture(scope="session")
def tiny():
  """(Cheers module, variables) of the tiny oracle checkpoint in fp32."""
  if not TINY.is_dir():
    pytest.skip(f"{TINY} not present")
  from cheers_jax.infer.loader import load_hf
  return load_hf(TINY, "float32", need_generation=True)


@pytest.fixture(scope="session")
def tokenizer():
  from cheers_jax.data.tokenizer import CheersTokenizer
  return CheersTokenizer()
