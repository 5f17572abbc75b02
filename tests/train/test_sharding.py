"""Sharded training on 8 fake CPU devices equals one device (runs tests/train/sharding_check.py in a
subprocess, since the device count is fixed when JAX starts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train.common import REPO
from tests.train.conftest import CACHE_DIR


@pytest.mark.slow
def test_meshes_match_one_device_and_shard_as_the_rules_say():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_llvm_disable_expensive_passes=true "
                      + " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f))
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  if CACHE_DIR:
    env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
  proc = subprocess.run([sys.executable, "-m", "tests.train.sharding_check"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1200)
  tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
  assert proc.returncode == 0, tail
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  results = json.loads(line[len("RESULT "):])
  for name, r in results.items():
    print(f"{name}: loss rel {r['loss']:.1e}, grad_norm rel {r['grad_norm']:.1e}, gradient (Adam mu) "
          f"{r['grad_rel']:.1e} of max, params {r['param_abs_well']:.1e} abs (well-conditioned), "
          f"{r['param_abs_all']:.1e} over all")
  assert set(results) == {"data8", "fsdp8", "fsdp4_tensor2"}
