"""Sharded training on 8 fake CPU devices equals one device (runs tests/train/sharding_check.py in a
subprocess, since the device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train.common import REPO
from tests.train.conftest import _FAST, CACHE_DIR


def run_with_8_devices(module: str) -> dict:
  """`python -m module` with 8 fake CPU devices; its `RESULT {json}` line."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=8 "
    + _FAST
    + " "
    + " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  )
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  if CACHE_DIR:
    env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
  proc = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
  assert proc.returncode == 0, tail
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


def print_comparison(results: dict) -> None:
  for name, r in results.items():
    if isinstance(r, dict):
      print(
        f"{name}: loss rel {r['loss']:.1e}, grad_norm rel {r['grad_norm']:.1e}, gradient (Adam mu) "
        f"{r['grad_rel']:.1e} of max, params {r['param_abs_well']:.1e} abs (well-conditioned), "
        f"{r['param_abs_all']:.1e} over all"
      )


@pytest.mark.slow
def test_meshes_match_one_device_and_shard_as_the_rules_say():
  results = run_with_8_devices("tests.train.sharding_check")
  print_comparison(results)
  assert set(results) == {"data8", "fsdp8", "fsdp4_tensor2"}


@pytest.mark.slow
def test_packed_batches_on_8_devices_match_one_device():
  """A packed batch (8 rows of several samples: segment ids, restarting positions, per-row image slots)
  gives the one-device step on data=2 x fsdp=4 (tests/train/packing_check.py)."""
  results = run_with_8_devices("tests.train.packing_check")
  print_comparison(results)
  assert set(results) == {"samples", "data2_fsdp4"} and results["samples"] > 8


def test_rules_shard_a_repeated_name_or_mesh_axis_once():
  """A PartitionSpec may use a mesh axis once: a logical name repeated in one array, or two names with
  the same rule, shard the first dim only; axes that do not divide a dim, or have size 1, are dropped."""
  import flax.linen as nn
  import jax
  from jax.sharding import AbstractMesh, PartitionSpec as P
  from cheers_jax import sharding

  mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
  boxed = {
    "square": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 8), "float32"), ("embed", "embed")),
    "same_rule": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 8), "float32"), ("vision_mlp", "mlp")),
    "rgb": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 8), "float32"), ("conv_out", "mlp")),
    "batch": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16, 4), "float32"), ("activation_batch", None)),
    "plain": jax.ShapeDtypeStruct((5,), "float32"),
  }
  specs = {k: v.spec for k, v in sharding.param_shardings(boxed, mesh).items()}
  assert specs == {
    "square": P("fsdp", None),
    "same_rule": P("tensor", None),
    "rgb": P(None, "tensor"),
    "batch": P("fsdp", None),
    "plain": P(None),
  }, specs
