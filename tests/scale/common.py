"""Helpers of the scale tests: subprocesses with fake CPU devices and a shared compilation cache.

Every test here compiles the tiny model's train step at least once (~1-2 min on 2 cores each), so the
subprocesses share a persistent XLA compilation cache (the train tests' one: $TMPDIR/
cheers_jax_test_jax_cache, or CHEERS_TEST_JAX_CACHE; '' turns it off): a second run is mostly lookups.
The model is configs/tiny.py with a 1024-token vocabulary (--config.model.text.vocab_size=1024): the
151,936-token one makes every step's logits ~100x larger and adds nothing to what these tests check.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(REPO, "configs", "tiny.py")
SMALL_VOCAB = "--config.model.text.vocab_size=1024"
CACHE_DIR = os.environ.get("CHEERS_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "cheers_jax_test_jax_cache"))
# faster XLA:CPU compiles, same numerics; see tests/train/conftest.py
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_cpu_enable_concurrency_optimized_scheduler=false"


def env(devices: Optional[int] = None, cache: bool = True, **extra: str) -> dict[str, str]:
  """os.environ for a child: repo on PYTHONPATH, `devices` fake CPU devices, the shared compile cache
  (cache=False: none, e.g. for jax.distributed processes, which must all run the same executable)."""
  e = dict(os.environ)
  flags = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
  if FAST_COMPILE not in flags:
    flags = f"{flags} {FAST_COMPILE}"
  if devices:
    flags = f"{flags} --xla_force_host_platform_device_count={devices}"
  e["XLA_FLAGS"] = flags.strip()
  e["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
  e["JAX_PLATFORMS"] = "cpu"
  for k in [k for k in e if k.startswith("CHEERS_")]:
    if k != "CHEERS_TEST_JAX_CACHE":
      del e[k]
  e.pop("JAX_COMPILATION_CACHE_DIR", None)
  if CACHE_DIR and cache:
    e["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
  e.update(extra)
  return e


def run(
  args: Sequence[str], devices: Optional[int] = None, timeout: float = 900, **extra: str
) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env(devices, **extra), capture_output=True, text=True, timeout=timeout
  )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
