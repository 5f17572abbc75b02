r"""Compare train-step layouts (mesh x remat x batch x attention) on this hardware.

  python -m cheers_jax.sweep --config tiny --meshes "data=8;fsdp=8;fsdp=4,tensor=2" \
      [--remat none,full] [--batch-sizes 8,16] [--attention xla,cudnn] [--steps 5] [--out DIR] \
      [--seq-len 400] [--gen-fraction 0.5] [--config.train.grad_accum=2 ...]

For every combination: build the mesh, create the train state already sharded, compile the train step
(timed: lower + compile), run --warmup untimed and --steps timed steps on one synthetic static-shape
batch in the batch contract (`cheers_jax.train.synthetic`; no data pipeline involved), and record the
median step time, samples/s, tokens/s (valid tokens), TFLOP/s per device, MFU and the peak device
memory. A layout that
runs out of memory, fails to compile or crashes becomes a row with its error: the sweep goes on.
Writes OUT/sweep.csv and OUT/sweep.png (a folder that already holds files needs --overwrite), prints a
table and the best layout (highest samples/s). The measuring is `cheers_jax.train.measure`'s.

- `--batch-sizes` are GLOBAL batches (split over data x fsdp; `tensor` devices share rows).
- The synthetic batch is the reference timing's mix (`--gen-fraction` generation samples, the rest
  understanding, one image each, ~`--text-len` text tokens, padded to `--seq-len`); see
  `cheers_jax.train.synthetic.BatchSpec`.
- MFU = flops_per_sample (cheers_jax.train.metrics: matmul/conv/attention FLOPs of forward + backward,
  16.2 TFLOP at 512x512, seq 400) x samples/s / (devices x peak bf16 FLOP/s); n/a where the peak is
  unknown (CPU).
- Memory: `peak_bytes_in_use` of the devices where the backend reports it (GPU, TPU), else the
  compiled step's `memory_analysis()` (arguments + outputs - aliased + temp, per device; CPU).
- Isolation (`--isolate auto`): each layout runs in a fresh subprocess, so peak-memory counters start
  at zero and an OOM abort cannot take the sweep down. Under jax.distributed (CHEERS_COORDINATOR,
  SLURM, TPU pods) every process runs the layouts in-process, in lockstep; the device peak is then
  cumulative (`mem_source` says so) and the compiled figure is the per-layout one.
- The train state is filled with cheap deterministic pseudo-random values by default (`--init
  synthetic`: compiles in seconds, the step's cost is the same); `--init config` runs the real
  initialisation (`init_train_state`, honours `init_from`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from cheers_jax import cli
from cheers_jax import config as config_lib
from cheers_jax import distributed, sharding
from cheers_jax.train import measure, synthetic


# ---- reports ----------------------------------------------------------------------------------------
def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  cols = (
    ("layout", 34),
    ("status", 13),
    ("compile s", 9),
    ("step s", 8),
    ("samples/s", 9),
    ("tokens/s", 9),
    ("TFLOP/s/dev", 11),
    ("MFU", 6),
    ("mem GiB", 8),
  )
  lines = [" ".join(f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w) in enumerate(cols))]
  for r in rows:
    name = f"{r['mesh']} {r['remat']} {r['attention']} B={r['batch_size']}"
    vals = [
      name,
      r.get("status", "?"),
      measure.fmt(r.get("compile_s"), ".1f"),
      measure.fmt(r.get("step_s"), ".3f"),
      measure.fmt(r.get("samples_per_s"), ".2f"),
      measure.fmt(r.get("tokens_per_s"), ".0f"),
      measure.fmt(r.get("tflops_per_device"), ".3f"),
      measure.fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f"),
      measure.fmt(r.get("peak_mem_gib"), ".2f"),
    ]
    lines.append(" ".join(f"{v:>{w}}" if i else f"{v:<{w}}" for i, (v, (_, w)) in enumerate(zip(vals, cols))))
    if r.get("status") != "ok" and r.get("error"):
      lines.append(f"    {r['error']}")
  return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> None:
  """Two panels: samples/s per layout and peak memory per device (failed layouts marked)."""
  import matplotlib  # heavy and only for this plot: imported when a sweep draws it

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display needed

  labels = [f"{r['mesh']}\n{r['remat']}/{r['attention']}/B={r['batch_size']}" for r in rows]
  ok = [r.get("status") == "ok" for r in rows]
  speed = [r.get("samples_per_s") or 0.0 for r in rows]
  mem = [r.get("peak_mem_gib") or 0.0 for r in rows]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(rows) + 4), 4.5))
  best = measure.best_row(rows)
  colours = [
    "tab:green" if (best is not None and r is best) else ("tab:blue" if k else "lightgrey") for r, k in zip(rows, ok)
  ]
  for ax, values, ylabel in ((axes[0], speed, "samples / s"), (axes[1], mem, "peak memory / device (GiB)")):
    ax.bar(x, values, color=colours)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel(ylabel)
    for xi, r in zip(x, rows):
      if r.get("status") != "ok":
        ax.text(xi, 0, r.get("status", "?"), ha="center", va="bottom", rotation=90, fontsize=8, color="tab:red")
  sources = sorted({r.get("mem_source") for r in rows if r.get("mem_source")})
  axes[1].set_title(f"memory ({', '.join(sources) or 'n/a'})", fontsize=9)
  axes[0].set_title("throughput (green = best)", fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- CLI ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cheers_jax.sweep", description=__doc__)
  cli.add_config_flags(p, required=True)
  p.add_argument(
    "--meshes",
    help="';'-separated meshes of AXIS=SIZE (axes data, fsdp, tensor), e.g. "
    "'data=8;fsdp=8;fsdp=4,tensor=2' (default: the config's mesh)",
  )
  p.add_argument(
    "--remat", help="comma-separated remat policies: none, full, dots, dots_no_batch (default: the config's)"
  )
  p.add_argument("--batch-sizes", help="comma-separated GLOBAL batch sizes (default: train.batch_size)")
  p.add_argument("--attention", help="comma-separated attention implementations: xla, cudnn (default: the config's)")
  p.add_argument("--steps", type=cli.POSITIVE_INT, default=5, help="timed steps per layout (median; default 5)")
  p.add_argument("--warmup", type=cli.NON_NEGATIVE_INT, default=1, help="untimed steps after the compile (default 1)")
  cli.add_batch_shape_flags(p)
  cli.add_init_flag(p)
  p.add_argument(
    "--out",
    default="sweep_out",
    help="output folder for sweep.csv and sweep.png (refused if it holds files, unless --overwrite)",
  )
  p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out folder")
  p.add_argument(
    "--isolate",
    choices=("auto", "subprocess", "none"),
    default="auto",
    help="one subprocess per layout (auto: unless jax.distributed is in use)",
  )
  p.add_argument("--timeout", type=cli.POSITIVE, default=3600.0, help="seconds per layout in subprocess mode")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  args, overrides = cli.parse_config_args(_parser(), argv)
  config = config_lib.load(args.config, overrides)  # fail here, once, on a bad file, override or value
  meshes = sharding.parse_meshes(args.meshes) if args.meshes else [dict(config.mesh)]
  remats = cli.comma_list(args.remat, "--remat") if args.remat else [config.model.remat_policy]
  attentions = cli.comma_list(args.attention, "--attention") if args.attention else [config.model.attention]
  batch_sizes = (
    cli.comma_list(args.batch_sizes, "--batch-sizes", int) if args.batch_sizes else [int(config.train.batch_size)]
  )
  batch = synthetic.BatchOptions.from_args(args)
  batch.spec(config, batch_sizes[0])  # check the batch composition fits before any compile
  out = cli.check_output_dir(args.out, args.overwrite)
  layouts = measure.layouts_from(meshes, remats, attentions, batch_sizes)
  rows = measure.run_sweep(
    args.config,
    overrides,
    layouts,
    steps=args.steps,
    warmup=args.warmup,
    batch=batch,
    init=args.init,
    isolate=args.isolate,
    timeout=args.timeout,
  )
  if distributed.launched_multi_process() and not distributed.is_lead():  # process 0 reports
    return 0
  out.mkdir(parents=True, exist_ok=True)
  measure.write_csv(rows, out / "sweep.csv")
  plot(rows, out / "sweep.png", title=f"{args.config} {' '.join(overrides)}".strip())
  print("\n" + format_table(rows))
  best = measure.best_row(rows)
  if best is None:
    print("\nno layout ran; see the errors above")
  else:
    print(
      f"\nbest layout: {best['mesh']} remat={best['remat']} attention={best['attention']} "
      f"batch={best['batch_size']}: {best['samples_per_s']:.2f} samples/s, {best['step_s']:.3f} s/step, "
      f"peak {measure.fmt(best.get('peak_mem_gib'), '.2f')} GiB/device"
    )
    mesh = sharding.parse_meshes(best["mesh"])[0]
    print(
      f"  -> {sharding.mesh_overrides(mesh)} --config.model.remat_policy={best['remat']} "
      f"--config.model.attention={best['attention']}"
    )
  print(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}")
  return 0 if best is not None else 1


if __name__ == "__main__":
  sys.exit(main())
