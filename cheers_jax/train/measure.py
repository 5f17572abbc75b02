"""Measuring the train step of one layout (mesh x remat x attention x batch): compile time, step time,
throughput, MFU and memory; many layouts one after the other, each in a fresh process by default.

The library behind `python -m cheers_jax.sweep`, `python -m cheers_jax.bench train` and the figures of
`python -m cheers_jax.aot`. A failed layout (out of memory, compile error, crash, timeout) is a row
with its status and error, never the end of the run. Row keys: FIELDS.
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
from cheers_jax import distributed, sharding
from cheers_jax.errors import UserError
from cheers_jax.model.cheers import Cheers
from cheers_jax.train import metrics as metrics_lib
from cheers_jax.train import state as state_lib
from cheers_jax.train import step as step_lib
from cheers_jax.train import synthetic

ROW_PREFIX = "SWEEP_ROW "
FIELDS = ("mesh", "remat", "attention", "batch_size", "per_device_batch", "devices", "device_kind", "status",
          "compile_s", "step_s", "samples_per_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gib",
          "mem_source", "args_gib", "temp_gib", "loss", "seq_len", "error")
GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """One combination to measure: mesh shape x remat policy x attention x global batch."""
  mesh: tuple[tuple[str, int], ...]   # ((axis, size), ...)
  remat: str
  attention: str
  batch_size: int                      # global

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
  return text if len(text) <= limit else text[:limit - 3] + "..."


def memory_figures(compiled) -> dict[str, Optional[float]]:
  """Per-device bytes of a compiled step: arguments, outputs, aliased (donated), temp, and their total."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    ma = None
  if ma is None:
    return {"args": None, "outputs": None, "alias": None, "temp": None, "total": None, "code": None}
  args, out, alias, temp = (float(ma.argument_size_in_bytes), float(ma.output_size_in_bytes),
                            float(ma.alias_size_in_bytes), float(ma.temp_size_in_bytes))
  return {"args": args, "outputs": out, "alias": alias, "temp": temp, "total": args + out - alias + temp,
          "code": float(getattr(ma, "generated_code_size_in_bytes", 0) or 0)}


def device_peak_bytes(devices) -> Optional[float]:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(float(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def measure_layout(config, layout: StepLayout, *, steps: int = 5, warmup: int = 1,
                   batch: synthetic.BatchOptions = synthetic.BatchOptions(), init: str = "synthetic",
                   cumulative_peak: bool = False) -> dict[str, Any]:
  """Compile and time the train step of one layout, in this process. Never raises: failures are rows."""
  row: dict[str, Any] = {"mesh": sharding.mesh_name(layout.mesh_dict), "remat": layout.remat, "attention": layout.attention,
                         "batch_size": layout.batch_size, "status": "error"}
  phase = "setup"
  try:
    c = layout_config(config, layout)
    cfg = state_lib.model_config(c)
    mesh = sharding.make_mesh_on_first_devices(layout.mesh_dict)
    shards = sharding.data_shards(mesh)
    n_dev = mesh.devices.size
    kind = mesh.devices.flat[0].device_kind
    row.update(devices=n_dev, device_kind=kind)
    if layout.batch_size % shards:
      raise UserError(f"global batch {layout.batch_size} is not divisible by data x fsdp = {shards}")
    row["per_device_batch"] = layout.batch_size // shards
    spec = batch.spec(c, layout.batch_size)
    row["seq_len"] = spec.seq_len
    if init == "synthetic":
      state, shardings = synthetic.synthetic_train_state(c, mesh, int(c.seed))
    elif init == "config":
      state, shardings = state_lib.init_train_state(c, mesh)
    else:
      raise UserError(f"init={init!r}: use 'synthetic' or 'config'")
    host = synthetic.synthetic_batch(spec)
    valid_tokens = float(np.sum(host["valid"]))
    dbatch = synthetic.global_device_batch(host, mesh)
    del host
    step_fn = step_lib.make_train_step(Cheers(cfg), c, mesh, shardings)

    phase = "compile"
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, dbatch).compile()
    row["compile_s"] = time.perf_counter() - t0
    mem = memory_figures(compiled)
    row["args_gib"] = None if mem["args"] is None else mem["args"] / GIB
    row["temp_gib"] = None if mem["temp"] is None else mem["temp"] / GIB

    phase = "run"
    times, metrics = [], None
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, dbatch)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times) if times else float("nan")
    # the rows' FLOPs, padding included (packed rows: spec.rows rows of several samples)
    flops = metrics_lib.flops_per_sample(cfg, spec.seq_len, spec.image_size, spec.slots_per_row,
                                         c.train.trainable) * spec.rows
    util = metrics_lib.mfu(flops / step_s, n_dev, kind)
    peak = device_peak_bytes(mesh.local_devices)
    row.update(status="ok", step_s=step_s, samples_per_s=layout.batch_size / step_s, tokens_per_s=valid_tokens / step_s,
               tflops_per_device=flops / step_s / n_dev / 1e12, mfu=util,
               loss=float(jax.device_get(metrics["loss"])))
    if peak is not None:
      row.update(peak_mem_gib=peak / GIB, mem_source="device_peak_cumulative" if cumulative_peak else "device_peak")
    elif mem["total"] is not None:
      row.update(peak_mem_gib=mem["total"] / GIB, mem_source="compiled")
    del state, dbatch, compiled
  except Exception as e:  # noqa: BLE001 -- a failed layout is a row, never the end of the sweep
    status = classify_error(e)
    row.update(status=status if status == "oom" else ("compile_error" if phase == "compile" else "error"),
               error=f"[{phase}] {short_error(e)}")
  gc.collect()
  return row


# ---- many layouts -----------------------------------------------------------------------------------
def run_isolated(config_path: str, overrides: Sequence[str], layout: StepLayout, *, steps: int, warmup: int,
                 batch: synthetic.BatchOptions, init: str, timeout: float) -> dict[str, Any]:
  """`measure_layout` in a fresh Python process (clean device memory and peak counters)."""
  payload = {"config": config_path, "overrides": list(overrides), "layout": layout.to_json(), "steps": steps,
             "warmup": warmup, "batch": dataclasses.asdict(batch), "init": init}
  env = dict(os.environ)
  roots = [str(Path(__file__).resolve().parents[2])]
  if config_lib.is_path(config_path):  # the config file may import its siblings (see config.load)
    roots.append(os.path.dirname(os.path.dirname(os.path.abspath(config_path.partition(":")[0]))))
  env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
  base = {"mesh": sharding.mesh_name(layout.mesh_dict), "remat": layout.remat, "attention": layout.attention,
          "batch_size": layout.batch_size}
  try:
    proc = subprocess.run([sys.executable, "-m", "cheers_jax.train.measure", json.dumps(payload)],
                          capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {**base, "status": "timeout", "error": f"no result within {timeout:.0f} s (--timeout)"}
  for line in proc.stdout.splitlines():
    if line.startswith(ROW_PREFIX):
      return json.loads(line[len(ROW_PREFIX):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
  text = " | ".join(tail)
  status = "oom" if ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()) else "crash"
  return {**base, "status": status, "error": short_error(f"exit {proc.returncode}: {text}", 500)}


def layouts_from(meshes: Sequence[Mapping[str, int]], remats: Sequence[str], attentions: Sequence[str],
                 batch_sizes: Sequence[int]) -> list[StepLayout]:
  return [StepLayout.make(m, r, a, b) for m in meshes for r in remats for a in attentions for b in batch_sizes]


def run_sweep(config_path: str, overrides: Sequence[str], layouts: Sequence[StepLayout], *, steps: int = 5,
              warmup: int = 1, batch: synthetic.BatchOptions = synthetic.BatchOptions(), init: str = "synthetic",
              isolate: str = "auto", timeout: float = 3600.0, log=print) -> list[dict[str, Any]]:
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
      row = run_isolated(config_path, overrides, layout, steps=steps, warmup=warmup, batch=batch, init=init,
                         timeout=timeout)
    else:
      row = measure_layout(config, layout, steps=steps, warmup=warmup, batch=batch, init=init, cumulative_peak=i > 0)
    log("    " + _one_line(row))
    rows.append(row)
  return rows


def _one_line(row: Mapping[str, Any]) -> str:
  if row.get("status") != "ok":
    return f"{row.get('status')}: {row.get('error', '')}"
  return (f"ok: compile {row['compile_s']:.1f} s, {row['step_s']:.3f} s/step, {row['samples_per_s']:.2f} samples/s, "
          f"peak {fmt(row.get('peak_mem_gib'), '.2f')} GiB ({row.get('mem_source')})")


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
  row = measure_layout(config, StepLayout.from_json(p["layout"]), steps=int(p["steps"]), warmup=int(p["warmup"]),
                       batch=synthetic.BatchOptions(**p["batch"]), init=p["init"])
  print(ROW_PREFIX + json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_worker(sys.argv[1]))
