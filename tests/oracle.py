"""Where the oracle's golden instances live, for tests.

The shipped instance is `<repo>/../shared/oracle`; more instances (other seeds, the tiny_b variant,
made with `make_golden.py --out-dir ...`) are picked up from CHEERS_ORACLE_EXTRA (paths separated by
':'), each a folder holding golden.npz, golden_manifest.json and tiny_ckpt/.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO.parent / "shared" / "oracle"


def instances() -> list[Path]:
  found = [SHIPPED] if (SHIPPED / "golden.npz").exists() else []
  for extra in filter(None, os.environ.get("CHEERS_ORACLE_EXTRA", "").split(":")):
    if (Path(extra) / "golden.npz").exists():
      found.append(Path(extra))
  return found


def instance_params():
  """pytest params over every available instance (a skip marker when there is none)."""
  found = instances()
  if not found:
    return [pytest.param(None, marks=pytest.mark.skip(reason="no oracle golden set beside the repo"))]
  return [pytest.param(p, id=p.name if p != SHIPPED else "shipped") for p in found]


def load_golden(instance: Path, name: str = "golden.npz") -> dict:
  return dict(np.load(instance / name, allow_pickle=False))


def rel_error(ours, ref) -> float:
  ref = np.asarray(ref, np.float64)
  scale = max(1.0, float(np.max(np.abs(ref))))
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref))) / scale
