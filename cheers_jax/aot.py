r"""Ahead-of-time memory of the train step: will it fit, before you rent the hardware?

  python -m cheers_jax.aot                                  # full size (--config cheers_1p5b), 512x512
  python -m cheers_jax.aot --meshes "fsdp=1;fsdp=8;data=2,fsdp=4;fsdp=4,tensor=2" --per-device-batch 1,2,4,8 \
      --seq-len 400 --remat none --hbm-gib 79 --out aot.csv
  python -m cheers_jax.aot --config tiny --meshes "fsdp=2" --per-device-batch 1
  python -m cheers_jax.aot --target h100 --meshes "fsdp=1" --per-device-batch 8,16
  python -m cheers_jax.aot --target tpu:v5p:2x2x1 --meshes "fsdp=4" --per-device-batch 8

For each (mesh, per-device batch) the full train step is lowered with `jax.ShapeDtypeStruct`s that carry
the state and batch shardings (nothing is allocated) and compiled; `compiled.memory_analysis()` gives
the per-device bytes of the arguments (params, optimizer state, batch), outputs, the donated part
(aliased: outputs that reuse argument buffers) and XLA's temporaries. The per-device total
  total = arguments + outputs - aliased + temp
is what the step needs at its peak, before allocator fragmentation and the runtime's own reserve.

Targets (`--target`, cheers_jax.targets): `h100`, `a100`, `a100-40gb` compile with the real XLA:GPU
compiler from a device description, and `tpu:TOPOLOGY` (e.g. tpu:v5p:2x2x1, tpu:v5e:2x4, tpu:v6e:2x2) with
the real TPU compiler, on a host that has neither (`pip install -r requirements-aot.txt` brings both;
as MaxText's train_compile.py): their memory_analysis() is that device's own figure. On TPU the row
also has the compiled FLOPs and bytes (cost_analysis), their ratio to the model FLOPs
(metrics.flops_per_sample x batch: the recompute overhead), and a roofline ESTIMATE of the step time,
max(FLOPs / peak, bytes / HBM bandwidth), with the MFU that time implies. CAVEAT: XLA's cost model counts a
while loop's body once, so with scanned layers (the default) compiled FLOPs and bytes are LOWER BOUNDS and
the ratio can fall below 1 (full size on v5p: 0.59) and the MFU estimate above 100 %.
`--target cpu` (the default without the extra) uses fake XLA:CPU devices: an ESTIMATE only (XLA:CPU
fuses and schedules differently and keeps some bf16 work in fp32).
--per-device-batch counts the rows of one data shard: global batch = per-device batch x data x fsdp.
The batch is the reference timing's mix (`--gen-fraction` generation samples, one image each, padded to
`--seq-len`, see cheers_jax.train.synthetic.BatchSpec); pass `--seq-len 1024 --image-slots 2` to match a pipeline
config with those buckets and data.max_images_per_sample=2. A GPU also needs room outside XLA's buffers:
JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the memory; set it to 0.95 for runs
that are close.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import jax

from cheers_jax import cli
from cheers_jax import config as config_lib
from cheers_jax import sharding, targets
from cheers_jax.train import measure, synthetic

DEFAULT_CONFIG = "cheers_1p5b"
DEFAULT_MESHES = "fsdp=1;fsdp=8;data=2,fsdp=4;fsdp=4,tensor=2"


def _devices_needed(meshes: Sequence[dict]) -> int:
  return max(math.prod(max(1, int(v)) for v in m.values()) for m in meshes)


def ensure_fake_devices(n: int) -> None:
  """Ask XLA:CPU for n devices; only effective before jax initialises its backends (harmless on
  GPU/TPU hosts: it changes the CPU client only)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def pick_devices(target: targets.Target, need: int) -> tuple[list, str]:
  """Compile-only devices of `target`; the attached accelerators when the target is 'cpu' and they are enough."""
  if target.platform != "cpu":
    return targets.devices(target, need), target.name
  default = jax.devices()
  if default[0].platform != "cpu" and len(default) >= need:
    return default, default[0].platform
  cpu = jax.devices("cpu")
  if default[0].platform == "cpu":
    return cpu, "cpu (estimate)"
  return cpu, f"cpu (estimate; only {len(default)} {default[0].platform})"


def format_table(rows: Sequence[dict], memory_gib: float) -> str:
  head = (
    f"{'mesh':<18} {'dev':>3} {'remat':>5} {'B/dev':>5} {'B':>4} {'seq':>5} {'args':>7} {'outputs':>7} "
    f"{'aliased':>7} {'temp':>7} {'total':>7} {'fits ' + format(memory_gib, '.4g') + ' GiB':>15} "
    f"{'compile s':>9}"
  )
  lines = [head, " " * 50 + "(GiB per device)"]
  f = lambda v: measure.fmt(v, ".2f")
  for r in rows:
    lead = f"{r['mesh']:<18} {r.get('devices', ''):>3} {r.get('remat', ''):>5} {r['per_device_batch']:>5} "
    if r.get("status") != "ok":
      lines.append(f"{lead}{r.get('global_batch', ''):>4}  {r['status']}: {r.get('error', '')}")
      continue
    line = (
      f"{lead}{r['global_batch']:>4} {r['seq_len']:>5} {f(r['args_gib']):>7} {f(r['outputs_gib']):>7} "
      f"{f(r['alias_gib']):>7} {f(r['temp_gib']):>7} {f(r['total_gib']):>7} {r['fits']:>15} "
      f"{measure.fmt(r['compile_s'], '.1f'):>9}"
    )
    if r.get("rows", r["global_batch"]) != r["global_batch"]:
      line += f"  (packed: {r['global_batch']} samples in {r['rows']} rows of {r['seq_len']})"
    if r.get("compiled_tflop") is not None:
      line += f"  | {r['compiled_tflop']:.1f} TFLOP/device compiled = {r['recompute']:.2f}x the model's" + (
        f"; roofline {r['roofline_step_s_est']:.3f} s/step, MFU {100 * r['roofline_mfu_est']:.0f} % (est.; "
        "scanned loop bodies counted once)"
        if r.get("roofline_step_s_est")
        else ""
      )
    lines.append(line)
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cheers_jax.aot", description=__doc__)
  cli.add_config_flags(p, default=DEFAULT_CONFIG)
  p.add_argument(
    "--target",
    default="cpu",
    help=f"what to compile for: {targets.names()} (default cpu: fake CPU "
    "devices, an estimate); GPU and TPU targets need `pip install -r requirements-aot.txt`",
  )
  p.add_argument("--meshes", default=DEFAULT_MESHES, help=f"';'-separated meshes (default '{DEFAULT_MESHES}')")
  p.add_argument("--per-device-batch", default="1,2,4,8", help="comma-separated rows per data shard (default 1,2,4,8)")
  cli.add_batch_shape_flags(p, seq_len_default=400, seq_len_help="400, the reference timing's")
  p.add_argument("--remat", help="comma-separated remat policies, one row each (default: the config's)")
  p.add_argument("--attention", help="attention implementation (default: the config's)")
  p.add_argument(
    "--hbm-gib", type=cli.POSITIVE, help="device memory for the 'fits' column (default: the target's; 79 GiB for cpu)"
  )
  p.add_argument("--fake-devices", type=cli.POSITIVE_INT, help="CPU devices to create (default: the largest mesh)")
  p.add_argument("--out", help="also write the rows to this CSV file (an existing one needs --overwrite)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  args, overrides = cli.parse_config_args(_parser(), argv)
  target = targets.parse(args.target)
  targets.check_installed(target)
  meshes = sharding.parse_meshes(args.meshes)
  per_device = cli.comma_list(args.per_device_batch, "--per-device-batch", int)
  config = config_lib.load(args.config, overrides)
  remats = cli.comma_list(args.remat, "--remat") if args.remat else [config.model.remat_policy]
  with config.unlocked():
    if args.attention:
      config.model.attention = args.attention
  batch = synthetic.BatchOptions.from_args(args)
  batch.spec(config, 1)
  if args.out:
    cli.check_output_file(args.out, args.overwrite)
  memory_gib = args.hbm_gib or target.memory_gib or 79.0
  need = _devices_needed(meshes)
  targets.prepare_environment(target)
  ensure_fake_devices(max(need, args.fake_devices or 0))
  devices, platform = pick_devices(target, need)
  print(
    f"AOT memory of the train step: {args.config} {' '.join(overrides)}; {platform}, {len(devices)} devices", flush=True
  )
  rows = []
  for remat in remats:
    with config.unlocked():
      config.model.remat_policy = remat
    for mesh in meshes:
      for b in per_device:
        row = measure.aot_memory(config, mesh, b, batch=batch, devices=devices, target=target)
        row.update(target=target.name, platform=platform, memory_gib=memory_gib)
        row["fits"] = (
          ("yes" if row["total_gib"] <= memory_gib else "NO")
          if row.get("status") == "ok"
          else ("NO" if row.get("status") == "oom" else "?")
        )
        rows.append(row)
        state = (
          f"total {row['total_gib']:.2f} GiB/device (compile {row['compile_s']:.0f} s)"
          if row["status"] == "ok"
          else f"{row['status']}: {row.get('error')}"
        )
        print(f"  {row['mesh']} remat={remat} per-device batch {b}: {state}", flush=True)
  print("\n" + format_table(rows, memory_gib))
  if not target.exact:
    print(
      "\nCPU figures estimate a GPU's (XLA:CPU buffers differ); --target h100|a100|tpu:... gives the real compiler's."
    )
  if args.out:
    measure.write_csv(rows, args.out, measure.AOT_FIELDS)
    print(f"wrote {args.out}")
  return 0 if any(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
