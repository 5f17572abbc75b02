"""Compile targets: devices XLA can compile for on a host that does not have them.

  h100, a100, a100-40gb   XLA:GPU from a device description (package data: assets/gpu_targets/NAME.txtpb,
                          with the data-sheet sources in each file); needs `jax[cuda12]` (requirements-aot.txt)
                          and runs with JAX_PLATFORMS=cpu, so no driver or GPU is needed.
  tpu:TOPOLOGY            a TPU slice, e.g. tpu:v5p:2x2x1, tpu:v5e:2x4, tpu:v6e:2x2 (any name that
                          `jax.experimental.topologies.get_topology_desc(NAME, 'tpu')` takes); needs libtpu
                          (`jax[tpu]`, requirements-aot.txt). MaxText's train_compile.py does the same.
  cpu                     XLA:CPU fake devices: an estimate of a GPU's memory, not the real figure.

Each target carries what the reports need: memory per device, peak dense bf16 FLOP/s and HBM bandwidth
(`CHIPS`, the package's one hardware table, which MFU reads too), so `aot` can say whether a step fits and what
its roofline time is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Optional

import jax
from jax.experimental import topologies

from cheers_jax import package_data
from cheers_jax.errors import UserError

GIB = 2.0**30  # bytes; every GiB figure of the package divides by this
GPU_TARGETS = ("h100", "a100", "a100-40gb")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's figures (vendor data sheets; Cloud TPU system-architecture pages)."""

  peak_tflops: float  # dense bf16, per device: MFU and the roofline
  hbm_gib: Optional[float] = None  # usable by XLA (a GPU target's comes from its description instead)
  hbm_gbps: Optional[float] = None


# THE hardware table: matched in order against jax's device_kind (lower case), e.g. 'NVIDIA H100 80GB HBM3',
# 'TPU v5 lite'; a TPU target's generation (tpu:v5p:2x2x1) through TPU_GENERATIONS.
CHIPS: tuple[tuple[str, Chip], ...] = (
  ("h200", Chip(989.0)),
  ("h100", Chip(989.0)),
  ("a100", Chip(312.0)),
  ("tpu v5 lite", Chip(197.0, 15.75, 819.0)),
  ("tpu v5e", Chip(197.0, 15.75, 819.0)),
  ("tpu v5p", Chip(459.0, 95.74, 2765.0)),
  ("tpu v5", Chip(459.0, 95.74, 2765.0)),
  ("tpu v4", Chip(275.0, 32.0, 1228.0)),
  ("tpu v6 lite", Chip(918.0, 31.25, 1640.0)),
  ("tpu v6e", Chip(918.0, 31.25, 1640.0)),
)
TPU_GENERATIONS = {"v4": "tpu v4", "v5e": "tpu v5e", "v5litepod": "tpu v5e", "v5p": "tpu v5p", "v6e": "tpu v6e"}


def chip(device_kind: str) -> Optional[Chip]:
  """The table's row for a device kind; None when unknown (CPU: MFU is reported as n/a)."""
  kind = device_kind.lower()
  return next((c for key, c in CHIPS if key in kind), None)


def peak_flops_per_device(device_kind: str) -> Optional[float]:
  """Peak dense bf16 FLOP/s of one device, None when unknown."""
  c = chip(device_kind)
  return None if c is None else c.peak_tflops * 1e12


AOT_EXTRA = "pip install -r requirements-aot.txt"


class TargetError(UserError):
  """A target that cannot be used here; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given: 'h100', 'tpu:v5p:2x2x1', 'cpu'
  platform: str  # 'cuda', 'tpu' or 'cpu'
  memory_gib: Optional[float]  # per device
  peak_tflops: Optional[float]  # bf16 dense, per device
  hbm_gbps: Optional[float]  # per device

  @property
  def compiler_options(self) -> dict:
    """XLA options for compiling without the device. XLA:GPU normally autotunes each Triton GEMM fusion on
    the GPU; with no GPU it takes a default tiling, which fails for GEMMs fused with a transpose whose
    contracting dimension is split into a non-power-of-two head dim (SigLIP: 16 heads x 72, the attention
    output entering out_proj; minimal case in tests/scale/test_targets.py). cuBLAS GEMMs compile for every
    shape; their buffers differ little from the autotuned program's."""
    return {"xla_gpu_enable_triton_gemm": False} if self.platform == "cuda" else {}

  @property
  def exact(self) -> bool:
    """True when the compiler is the target's own (its memory_analysis is the real figure)."""
    return self.platform != "cpu"


def names() -> str:
  return ", ".join(GPU_TARGETS) + ", tpu:TOPOLOGY (e.g. tpu:v5p:2x2x1), cpu"


def gpu_description(name: str) -> str:
  """The GpuTargetConfigProto text of a shipped GPU target."""
  if name not in GPU_TARGETS:
    raise TargetError(f"unknown GPU target '{name}'; known: {', '.join(GPU_TARGETS)}")
  return (package_data.GPU_TARGETS / f"{name}.txtpb").read_text()


def _proto_number(text: str, field: str) -> float:
  m = re.search(rf"^\s*{field}:\s*([0-9.]+)", text, re.M)
  if not m:
    raise TargetError(f"GPU description lacks '{field}'")
  return float(m.group(1))


def parse(name: str) -> Target:
  """The target's figures; raises TargetError for an unknown name (no jax needed)."""
  name = name.strip().lower()
  if name == "cpu":
    return Target("cpu", "cpu", None, None, None)
  if name in GPU_TARGETS:
    text = gpu_description(name)
    return Target(
      name,
      "cuda",
      _proto_number(text, "device_memory_size") / GIB,
      chip(name).peak_tflops,
      _proto_number(text, "memory_bandwidth") / 1e9,
    )
  if name.startswith("tpu:"):
    topology = name[4:]
    generation = topology.split(":")[0].split("-")[0]
    if not topology or generation not in TPU_GENERATIONS:
      raise TargetError(
        f"unknown TPU topology '{topology}'; give GENERATION:SHAPE with a generation of "
        f"{', '.join(sorted(TPU_GENERATIONS))}, e.g. tpu:v5p:2x2x1"
      )
    c = chip(TPU_GENERATIONS[generation])
    return Target(name, "tpu", c.hbm_gib, c.peak_tflops, c.hbm_gbps)
  raise TargetError(f"unknown target '{name}'; known: {names()}")


def check_installed(target: Target) -> None:
  """One actionable line when the compiler the target needs is not installed."""
  if target.platform == "cuda" and importlib.util.find_spec("jax_cuda12_plugin") is None:
    raise TargetError(f"--target {target.name} needs the XLA:GPU compiler (jax[cuda12]): {AOT_EXTRA}")
  if target.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
    raise TargetError(f"--target {target.name} needs the TPU compiler (libtpu, from jax[tpu]): {AOT_EXTRA}")


def prepare_environment(target: Target) -> None:
  """Call before jax initialises its backends: GPU targets compile through the CUDA plugin's compile-only
  client, so the default backend must stay the CPU and the plugin must not demand a driver."""
  if target.platform in ("cuda", "tpu"):
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"  # an installed CUDA plugin must not look for a driver
  if target.platform == "tpu":  # libtpu locks /tmp/libtpu_lockfile for the chips; compiling uses none
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _gpu_topology(count: int) -> str:
  """'slices x hosts x devices per host': up to 8 GPUs per host, as an HGX node."""
  if count <= 8:
    return f"1x1x{count}"
  if count % 8:
    raise TargetError(f"{count} GPUs: use a multiple of 8 beyond one node")
  return f"1x{count // 8}x8"


def devices(target: Target, count: int) -> list:
  """`count` compile-only devices of the target (for TPU, the whole topology: its size is fixed)."""
  check_installed(target)
  if target.platform == "cpu":
    cpu = jax.devices("cpu")
    if len(cpu) < count:
      raise TargetError(
        f"{count} CPU devices needed, {len(cpu)} exist (set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={count} before jax starts)"
      )
    return cpu[:count]
  try:
    if target.platform == "cuda":
      topo = topologies.get_topology_desc(
        target.name, "cuda", target_config=gpu_description(target.name), topology=_gpu_topology(count)
      )
      return list(topo.devices)
    return list(topologies.get_topology_desc(target.name[4:], "tpu").devices)
  except Exception as e:  # noqa: BLE001 -- the compiler's own message, on one line
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TargetError(f"cannot create compile-only devices for {target.name}: {first}") from e
