"""Measuring the train step of one layout (mesh x remat x attention x batch): compile time, step time,
throughput, MFU and memory; many layouts one after the other, each in a fresh process by default.

The library behind `python -m cheers_jax.sweep`, `python -m cheers_jax.bench train` and
`python -m cheers_jax.aot`: `compile_step` lowers and compiles the step of one layout (on abstract inputs for
`aot_memory`, on a synthetic state and batch for `measure_layout`, which then runs it). A failed layout (out of
memory, compile error, crash, timeout) is a row with its status and error, never the end of the run. Row keys:
FIELDS (measure_layout), AOT_FIELDS (aot_memory).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from cheers_jax import config as config_lib
from cheers_jax import distributed, sharding, targets
from cheers_jax.errors import UserError
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.config import ModelConfig
from cheers_jax.train import metrics as metrics_lib
from cheers_jax.train import state as state_lib
from cheers_jax.train import step as step_lib
from cheers_jax.train import synthetic

ROW_PREFIX = "SWEEP_ROW "
FIELDS = (
  "mesh",
  "remat",
  "attention",
  "batch_size",
  "per_device_batch",
  "devices",
  "device_kind",
  "status",
  "compile_s",
  "step_s",
  "samples_per_s",
  "tokens_per_s",
  "tflops_per_device",
  "mfu",
  "peak_mem_gib",
  "mem_source",
  "args_gib",
  "temp_gib",
  "setup_peak_gib",
  "in_use_gib",
  "loss",
  "seq_len",
  "error",
)
AOT_FIELDS = (
  "target",
  "mesh",
  "devices",
  "platform",
  "per_device_batch",
  "global_batch",
  "seq_len",
  "remat",
  "args_gib",
  "outputs_gib",
  "alias_gib",
  "temp_gib",
  "total_gib",
  "memory_gib",
  "fits",
  "compiled_tflop",
  "model_tflop",
  "recompute",
  "compiled_gb",
  "roofline_step_s_est",
  "roofline_mfu_est",
  "compile_s",
  "status",
  "error",
)
GIB = targets.GIB


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """One combination to measure: mesh shape x remat policy x attention x global batch."""

  mesh: tuple[tuple[str, int], ...]  # ((axis, size), ...)
  remat: str
  attention: str
  batch_size: int  # global

  @classmethod
  def make(cls, mesh: Mapping[str, int], remat: str, attention: str, batch_size: int) -> "StepLayout":
    return cls(tuple(sharding.full_mesh_shape(mesh).items()), remat, attention, int(batch_size))

  @property
  def mesh_dict(self) -> dict[str, int]:
    return dict(self.mesh)

  @property
  def name(self) -> str:
    return f"{sharding.mesh_name(self.mesh_dict)} remat={self.remat} attn={self.attention} B={self.batch_size}"

  def to_json(self) -> dict:
    return {"mesh": self.mesh_dict, "remat": self.remat, "attention": self.attention, "batch_size": self.batch_size}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "StepLayout":
    return cls.make(d["mesh"], d["remat"], d["attention"], d["batch_size"])


def layout_config(config, layout: StepLayout):
  """A copy of `config` with the layout's mesh, remat policy, attention and global batch."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.remat_policy = layout.remat
    c.model.attention = layout.attention
    c.train.batch_size = layout.batch_size
    c.mesh = dict(layout.mesh_dict)
  return c


def classify_error(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OOM" in text:
    return "oom"
  return "error"


def short_error(e: BaseException | str, limit: int = 300) -> str:
  text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
  text = " ".join(text.split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def memory_figures(compiled) -> dict[str, Optional[float]]:
  """Per-device bytes of a compiled step: arguments, outputs, aliased (donated), temp, and their total."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    ma = None
  if ma is None:
    return {"args": None, "outputs": None, "alias": None, "temp": None, "total": None, "code": None}
  args, out, alias, temp = (
    float(ma.argument_size_in_bytes),
    float(ma.output_size_in_bytes),
    float(ma.alias_size_in_bytes),
    float(ma.temp_size_in_bytes),
  )
  return {
    "args": args,
    "outputs": out,
    "alias": alias,
    "temp": temp,
    "total": args + out - alias + temp,
    "code": float(getattr(ma, "generated_code_size_in_bytes", 0) or 0),
  }


def device_peak_bytes(devices, key: str = "peak_bytes_in_use") -> Optional[float]:
  """The largest `memory_stats()[key]` over `devices`; None where a backend keeps no such counter (CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if not stats or key not in stats:
      return None
    peaks.append(float(stats[key]))
  return max(peaks) if peaks else None


class CompileFailed(RuntimeError):
  """XLA refused to compile the step (its message follows); setup errors are raised as they are."""


@dataclasses.dataclass
class CompiledStep:
  """The train step of one layout, compiled for its inputs (`state`, `batch`: arrays, or ShapeDtypeStructs
  when compiled on abstract inputs)."""

  config: Any  # the layout's run config (layout_config)
  model: ModelConfig
  mesh: Any
  spec: synthetic.BatchSpec
  state: Any
  batch: Any
  compiled: Any
  compile_s: float
  valid_tokens: float  # text/image tokens of the synthetic batch (0 for abstract inputs)

  def model_flops(self) -> float:
    """FLOPs of one step of the model (metrics.flops_per_sample x the rows of the global batch)."""
    spec = self.spec
    # the rows' FLOPs, padding included (packed rows: spec.rows rows of several samples)
    return (
      metrics_lib.flops_per_sample(
        self.model, spec.seq_len, spec.image_size, spec.slots_per_row, self.config.train.trainable
      )
      * spec.rows
    )


def compile_step(
  config,
  layout: StepLayout,
  *,
  batch: synthetic.BatchOptions = synthetic.BatchOptions(),
  init: str = "abstract",
  devices: Optional[Sequence] = None,
  compiler_options: Optional[dict] = None,
) -> CompiledStep:
  """Lower and compile the train step of `config` in `layout`.

  init: 'abstract' = ShapeDtypeStructs carrying the state and batch shardings (nothing is allocated: memory
  before renting the hardware); 'synthetic' = a synthetic state (train.synthetic) and 'config' = the config's
  own init, each with a synthetic batch, to run the step. devices: the mesh's (default: jax.devices()).
  Raises CompileFailed when XLA refuses the program (e.g. it cannot fit), other errors during setup.
  """
  c = layout_config(config, layout)
  cfg = state_lib.model_config(c)
  mesh = sharding.make_mesh_on_first_devices(layout.mesh_dict, devices)
  shards = sharding.data_shards(mesh)
  if layout.batch_size % shards:
    raise UserError(f"global batch {layout.batch_size} is not divisible by data x fsdp = {shards}")
  spec = batch.spec(c, layout.batch_size)
  valid_tokens = 0.0
  if init == "abstract":
    abstract, shardings = state_lib.abstract_train_state(c, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    dbatch = synthetic.abstract_batch(spec, mesh)
  else:
    if init == "synthetic":
      state, shardings = synthetic.synthetic_train_state(c, mesh, int(c.seed))
    elif init == "config":
      state, shardings = state_lib.init_train_state(c, mesh)
    else:
      raise UserError(f"init={init!r}: use 'abstract', 'synthetic' or 'config'")
    host = synthetic.synthetic_batch(spec)
    valid_tokens = float(np.sum(host["valid"]))
    dbatch = synthetic.global_device_batch(host, mesh)
    del host
  step_fn = step_lib.make_train_step(Cheers(cfg), c, mesh, shardings)
  t0 = time.perf_counter()
  try:
    compiled = step_fn.lower(state, dbatch).compile(compiler_options=compiler_options or None)
  except Exception as e:  # noqa: BLE001 -- the compiler's message, kept whole
    raise CompileFailed(f"{type(e).__name__}: {e}") from e
  return CompiledStep(c, cfg, mesh, spec, state, dbatch, compiled, time.perf_counter() - t0, valid_tokens)


def measure_layout(
  config,
  layout: StepLayout,
  *,
  steps: int = 5,
  warmup: int = 1,
  batch: synthetic.BatchOptions = synthetic.BatchOptions(),
  init: str = "synthetic",
  cumulative_peak: bool = False,
) -> dict[str, Any]:
  """Compile and time the train step of one layout, in this process. Never raises: failures are rows."""
  row: dict[str, Any] = {
    "mesh": sharding.mesh_name(layout.mesh_dict),
    "remat": layout.remat,
    "attention": layout.attention,
    "batch_size": layout.batch_size,
    "status": "error",
  }
  phase = "setup"
  try:
    if init == "abstract":
      raise UserError("init='abstract' compiles without arrays: measure_layout runs the step; use aot_memory")
    step = compile_step(config, layout, batch=batch, init=init)
    mesh, n_dev = step.mesh, step.mesh.devices.size
    kind = mesh.devices.flat[0].device_kind
    row.update(
      devices=n_dev,
      device_kind=kind,
      per_device_batch=layout.batch_size // sharding.data_shards(mesh),
      seq_len=step.spec.seq_len,
      compile_s=step.compile_s,
    )
    mem = memory_figures(step.compiled)
    row["args_gib"] = None if mem["args"] is None else mem["args"] / GIB
    row["temp_gib"] = None if mem["temp"] is None else mem["temp"] / GIB
    # The process's peak before the first step: state init, batch and the compiler's own autotuning
    # buffers. On one H200 the full-size peak (85.5 GiB) was far above args + temp (37.8 GiB); this splits it.
    setup_peak = device_peak_bytes(step.mesh.local_devices)

    phase = "run"
    state, dbatch, compiled = step.state, step.batch, step.compiled
    step.state = step.batch = step.compiled = None  # the loop below owns them (donated state)
    times, metrics = [], None
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, dbatch)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times) if times else float("nan")
    flops = step.model_flops()
    util = metrics_lib.mfu(flops / step_s, n_dev, kind)
    peak = device_peak_bytes(mesh.local_devices)
    row.update(
      status="ok",
      step_s=step_s,
      samples_per_s=layout.batch_size / step_s,
      tokens_per_s=step.valid_tokens / step_s,
      tflops_per_device=flops / step_s / n_dev / 1e12,
      mfu=util,
      loss=float(jax.device_get(metrics["loss"])),
    )
    if peak is not None:
      row.update(peak_mem_gib=peak / GIB, mem_source="device_peak_cumulative" if cumulative_peak else "device_peak")
      in_use = device_peak_bytes(mesh.local_devices, "bytes_in_use")
      row.update(
        setup_peak_gib=None if setup_peak is None else setup_peak / GIB,
        in_use_gib=None if in_use is None else in_use / GIB,
      )
    elif mem["total"] is not None:
      row.update(peak_mem_gib=mem["total"] / GIB, mem_source="compiled")
    del state, dbatch, compiled
  except Exception as e:  # noqa: BLE001 -- a failed layout is a row, never the end of the sweep
    if isinstance(e, CompileFailed):
      phase = "compile"
    status = classify_error(e)
    row.update(
      status=status if status == "oom" else ("compile_error" if phase == "compile" else "error"),
      error=f"[{phase}] {short_error(e)}",
    )
  gc.collect()
  return row


# ---- ahead of time: memory and cost before renting the hardware ---------------------------------------
def cost_figures(compiled, model_flops: float, target: Optional[targets.Target]) -> dict[str, Any]:
  """Compiled FLOPs and bytes (per device, from cost_analysis) against the model's; a roofline estimate."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 -- not every backend has it
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or not cost.get("flops"):
    return {}
  flops, nbytes = float(cost["flops"]), float(cost.get("bytes accessed", 0.0))
  out: dict[str, Any] = {
    "compiled_tflop": flops / 1e12,
    "compiled_gb": nbytes / 1e9,
    "model_tflop": model_flops / 1e12,
    "recompute": flops / model_flops if model_flops else None,
  }
  if target is not None and target.peak_tflops and target.hbm_gbps:
    step = max(flops / (target.peak_tflops * 1e12), nbytes / (target.hbm_gbps * 1e9))
    out.update(roofline_step_s_est=step, roofline_mfu_est=model_flops / step / (target.peak_tflops * 1e12))
  return out


def aot_memory(
  config,
  mesh_shape: Mapping[str, int],
  per_device_batch: int,
  *,
  batch: synthetic.BatchOptions = synthetic.BatchOptions(),
  devices: Optional[Sequence] = None,
  target: Optional[targets.Target] = None,
) -> dict[str, Any]:
  """Compile the train step of `config` for `mesh_shape` on abstract inputs (compile_step); per-device bytes
  (GiB), and on targets with a cost model the compiled FLOPs per device against the model's (cost_figures).

  Never raises: a failure is a row with status 'error' or 'oom' (XLA may refuse a program that cannot fit).
  """
  row: dict[str, Any] = {
    "mesh": sharding.mesh_name(mesh_shape),
    "per_device_batch": per_device_batch,
    "remat": config.model.remat_policy,
    "status": "error",
  }
  try:
    mesh = sharding.make_mesh_on_first_devices(mesh_shape, devices)
    layout = StepLayout.make(
      mesh_shape, config.model.remat_policy, config.model.attention, per_device_batch * sharding.data_shards(mesh)
    )
    row.update(devices=mesh.devices.size, global_batch=layout.batch_size)
    step = compile_step(
      config,
      layout,
      batch=batch,
      devices=devices,
      compiler_options=target.compiler_options if target is not None else None,
    )
    row.update(seq_len=step.spec.seq_len, rows=step.spec.rows, compile_s=step.compile_s)
    mem = memory_figures(step.compiled)
    if mem["total"] is None:
      raise RuntimeError("this backend has no memory_analysis()")
    row.update({f"{k}_gib": mem[k] / GIB for k in ("args", "outputs", "alias", "temp", "total")}, status="ok")
    if target is not None and target.platform == "tpu":
      row.update(cost_figures(step.compiled, step.model_flops() / mesh.devices.size, target))
    del step
  except Exception as e:  # noqa: BLE001 -- one failed combination is a row
    row.update(status=classify_error(e), error=short_error(e))
  jax.clear_caches()  # compiled steps of earlier combinations are not needed again
  return row


# ---- many layouts -----------------------------------------------------------------------------------
def run_isolated(
  config_path: str,
  overrides: Sequence[str],
  layout: StepLayout,
  *,
  steps: int,
  warmup: int,
  batch: synthetic.BatchOptions,
  init: str,
  timeout: float,
) -> dict[str, Any]:
  """`measure_layout` in a fresh Python process (clean device memory and peak counters)."""
  payload = {
    "config": config_path,
    "overrides": list(overrides),
    "layout": layout.to_json(),
    "steps": steps,
    "warmup": warmup,
    "batch": dataclasses.asdict(batch),
    "init": init,
  }
  env = dict(os.environ)
  roots = [str(Path(__file__).resolve().parents[2])]
  if config_lib.is_path(config_path):  # the config file may import its siblings (see config.load)
    roots.append(os.path.dirname(os.path.dirname(os.path.abspath(config_path.partition(":")[0]))))
  inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + inherited))
  base = {
    "mesh": sharding.mesh_name(layout.mesh_dict),
    "remat": layout.remat,
    "attention": layout.attention,
    "batch_size": layout.batch_size,
  }
  try:
    proc = subprocess.run(
      [sys.executable, "-m", "cheers_jax.train.measure", json.dumps(payload)],
      capture_output=True,
      text=True,
      timeout=timeout,
      env=env,
    )
  except subprocess.TimeoutExpired:
    return {**base, "status": "timeout", "error": f"no result within {timeout:.0f} s (--timeout)"}
  for line in proc.stdout.splitlines():
    if line.startswith(ROW_PREFIX):
      return json.loads(line[len(ROW_PREFIX) :])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
  text = " | ".join(tail)
  status = "oom" if ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()) else "crash"
  return {**base, "status": status, "error": short_error(f"exit {proc.returncode}: {text}", 500)}


def layouts_from(
  meshes: Sequence[Mapping[str, int]], remats: Sequence[str], attentions: Sequence[str], batch_sizes: Sequence[int]
) -> list[StepLayout]:
  return [StepLayout.make(m, r, a, b) for m in meshes for r in remats for a in attentions for b in batch_sizes]


def run_sweep(
  config_path: str,
  overrides: Sequence[str],
  layouts: Sequence[StepLayout],
  *,
  steps: int = 5,
  warmup: int = 1,
  batch: synthetic.BatchOptions = synthetic.BatchOptions(),
  init: str = "synthetic",
  isolate: str = "auto",
  timeout: float = 3600.0,
  log=print,
) -> list[dict[str, Any]]:
  """Measure every layout; returns one row per layout (see FIELDS)."""
  if isolate == "auto":
    isolate = "none" if distributed.launched_multi_process() else "subprocess"
  if isolate not in ("subprocess", "none"):
    raise UserError(f"isolate={isolate!r}: use auto, subprocess or none")
  config = None
  if isolate == "none":
    distributed.maybe_initialize()
    config = config_lib.load(config_path, overrides)
  rows = []
  for i, layout in enumerate(layouts):
    log(f"[{i + 1}/{len(layouts)}] {layout.name} ...")
    if isolate == "subprocess":
      row = run_isolated(
        config_path, overrides, layout, steps=steps, warmup=warmup, batch=batch, init=init, timeout=timeout
      )
    else:
      row = measure_layout(config, layout, steps=steps, warmup=warmup, batch=batch, init=init, cumulative_peak=i > 0)
    log("    " + _one_line(row))
    rows.append(row)
  return rows


def _one_line(row: Mapping[str, Any]) -> str:
  if row.get("status") != "ok":
    return f"{row.get('status')}: {row.get('error', '')}"
  return (
    f"ok: compile {row['compile_s']:.1f} s, {row['step_s']:.3f} s/step, {row['samples_per_s']:.2f} samples/s, "
    f"peak {fmt(row.get('peak_mem_gib'), '.2f')} GiB ({row.get('mem_source')})"
    + (
      f", of which before the first step {fmt(row['setup_peak_gib'], '.2f')},"
      f" in use after {fmt(row.get('in_use_gib'), '.2f')}"
      if row.get("setup_peak_gib") is not None
      else ""
    )
  )


def fmt(v: Any, spec: str) -> str:
  """A figure for a table; 'n/a' when missing or not finite."""
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return format(v, spec)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, fields: Sequence[str] = FIELDS) -> None:
  """One line per row, `fields` as columns; a missing value is an empty cell."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def best_row(rows: Sequence[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
  ok = [r for r in rows if r.get("status") == "ok" and r.get("samples_per_s")]
  return max(ok, key=lambda r: r["samples_per_s"]) if ok else None


def _worker(payload: str) -> int:
  """`measure_layout` in this fresh process (see `run_isolated`); prints the row."""
  p = json.loads(payload)
  config = config_lib.load(p["config"], p["overrides"])
  row = measure_layout(
    config,
    StepLayout.from_json(p["layout"]),
    steps=int(p["steps"]),
    warmup=int(p["warmup"]),
    batch=synthetic.BatchOptions(**p["batch"]),
    init=p["init"],
  )
  print(ROW_PREFIX + json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_worker(sys.argv[1]))
