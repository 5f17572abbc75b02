"""Where the oracle's golden instances live, for tests.

The shipped instance is in the repository, tests/fixtures/oracle/ (golden.npz: the official code's arrays
on a tiny random checkpoint, golden_bf16.npz: the same in bf16, golden_manifest.json, tiny_ckpt/: that
checkpoint, 25 MB), so a clone runs every test; CHEERS_ORACLE names another instance to use instead.
More instances (other seeds, other variants of the oracle's generator) are picked up from
CHEERS_ORACLE_EXTRA (paths separated by ':'), each a folder holding golden.npz, golden_manifest.json and
tiny_ckpt/. tests/fixtures/reference/ holds the published checkpoint's small files (config, tensor list,
processor and generation configs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = Path(os.environ.get("CHEERS_ORACLE") or REPO / "tests" / "fixtures" / "oracle")
ORACLE = SHIPPED
TINY = ORACLE / "tiny_ckpt"
GOLDEN = ORACLE / "golden.npz"
REFERENCE = REPO / "tests" / "fixtures" / "reference"


def instances() -> list[Path]:
  found = [SHIPPED]  # in the repository: a missing file is an error, never a skip
  for extra in filter(None, os.environ.get("CHEERS_ORACLE_EXTRA", "").split(":")):
    if (Path(extra) / "golden.npz").exists():
      found.append(Path(extra))
  return found


def instance_params():
  """pytest params over every instance (the shipped one first)."""
  return [pytest.param(p, id=p.name if p != SHIPPED else "shipped") for p in instances()]


def load_golden(instance: Path, name: str = "golden.npz") -> dict:
  return dict(np.load(instance / name, allow_pickle=False))


def rel_error(ours, ref) -> float:
  ref = np.asarray(ref, np.float64)
  scale = max(1.0, float(np.max(np.abs(ref))))
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref))) / scale
