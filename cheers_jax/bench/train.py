r"""Training speed: compile time, step time, samples/s, MFU and peak memory of the jitted train step.

  python -m cheers_jax.bench train --config tiny [--batch-size 8] [--steps 10]
  python -m cheers_jax.bench train --full-size                 # published shapes, bf16, B=4 and B=8
  python -m cheers_jax.bench train --full-size --batch-sizes 8 --remat full --mesh fsdp=-1
  python -m cheers_jax.bench train --full-size --padding       # padded share of the tokens, packed or not
  python -m cheers_jax.bench train --config tiny --mix --config.data.seq_buckets='(512,1024,2048,4096)' \
      [--config.data.packing=True --config.data.pack_images=12]

The step is the training one (`cheers_jax.train.step.make_train_step`: forward + backward, gradient
clipping, AdamW on everything but the VAE, fp32 master params), compiled once per batch size (the compile
is timed on its own), then run --warmup untimed and --steps timed times on one synthetic static-shape
batch (median). The batch is the reference timing's: --gen-fraction generation samples (default 0.5),
the rest understanding samples, one image each at the config's size, --text-len random text tokens
(default 120, which gives 400-token samples at 512x512) padded to --seq-len (default: 400 with
--full-size, else the config's smallest bucket). See cheers_jax.train.synthetic.BatchSpec.

--mix: B samples of a realistic length mix (cheers_jax.data.packing.length_mix: captions of 20-300 tokens
+ the image's tokens, understanding answers up to 1,500 tokens, text; by the config's data.mix), one
image each, padded to the config's bucket of the longest, or with --config.data.packing=True packed into
as few rows of data.pack_len as hold them: the same B samples either way, so samples/s compare packing
at the same number of real samples per step. --padding prints the padding figure instead of timing:
the share of padded tokens (and image slots) of 20,000 such samples batched as the pipeline batches
them (B per batch, each padded to the bucket of its longest; or packed, B rows per batch).

  samples/s = B / step time;  tokens/s = valid (non-padding) tokens per step / step time
  MFU       = F x samples/s / (n_devices x P)
    F = cheers_jax.train.metrics.flops_per_sample: FLOPs of one training sample counted like torch's
        FlopCounterMode (matrix multiplies, convolutions and attention at 2 FLOPs per multiply-add;
        x3 for trainable modules = forward + backward, x1 for the frozen VAE encoder); 16.2 TFLOP at
        full size, 512x512, seq 400 (the oracle's count of the reference).
    P = dense bf16 peak FLOP/s of one device (targets.CHIPS: H100 989 TFLOP/s); MFU is n/a where
        the peak is unknown (CPU).
  peak memory = the devices' peak_bytes_in_use (GPU/TPU), else the compiled step's memory_analysis()
        (arguments + outputs - aliased + temp, per device; CPU).

With --full-size the figures are printed next to the reference's (PyTorch, one H100 80GB, SDPA attention,
bf16 weights and AdamW): B=8 1.134 s/step, 7.06 samples/s, 71.0 GiB; B=4 0.742 s/step, 5.39 samples/s,
42.6 GiB. The comparison is like for like only on one H100 with the default batch composition. Our
master params and Adam moments are fp32 (the reference keeps them bf16): 28 GiB of state before
activations, so B=8 without remat may not fit 80 GB (see `python -m cheers_jax.aot`).
Each batch size runs in its own subprocess by default (clean peak-memory counters; an OOM is reported,
not fatal). The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Optional, Sequence

from cheers_jax import cli
from cheers_jax import config as config_lib
from cheers_jax import distributed, sharding
from cheers_jax.data import packing
from cheers_jax.train import measure, synthetic
from cheers_jax.train import metrics as metrics_lib

FULL_SIZE_CONFIG = "cheers_1p5b"
DEFAULT_CONFIG = "tiny"
# The official PyTorch Cheers on one H100 80GB HBM3, timed by the project (seq 400, half generation samples)
REFERENCE_H100 = {
  "device": "NVIDIA H100 80GB HBM3",
  "attention": "PyTorch SDPA",
  "seq_len": 400,
  "gen_fraction": 0.5,
  "flops_per_sample": 16.2e12,
  "batches": {
    4: {"step_s": 0.7417, "samples_per_s": 5.393, "peak_gib": 42.64},
    8: {"step_s": 1.1336, "samples_per_s": 7.057, "peak_gib": 71.02},
  },
}


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cheers_jax.bench train", description=__doc__)
  src = p.add_mutually_exclusive_group()
  cli.add_config_flags(src)  # default: tiny
  src.add_argument(
    "--full-size",
    action="store_true",
    help="the published model (config cheers_1p5b: 2.6 B params, bf16 compute, 512x512)",
  )
  p.add_argument("--batch-size", type=cli.POSITIVE_INT, help="global batch (default 8; --full-size: 4 and 8)")
  p.add_argument("--batch-sizes", help="comma-separated global batches (instead of --batch-size)")
  p.add_argument("--steps", type=cli.POSITIVE_INT, default=10, help="timed steps (median; default 10)")
  p.add_argument("--warmup", type=cli.NON_NEGATIVE_INT, default=1, help="untimed steps after the compile (default 1)")
  p.add_argument("--mesh", help="AXIS=SIZE pairs, e.g. 'fsdp=-1' or 'data=2,fsdp=4' (default: the config's mesh)")
  p.add_argument("--remat", help="remat policy: none, full, dots, dots_no_batch (default: the config's)")
  p.add_argument("--attention", help="attention implementation: xla, cudnn (default: the config's)")
  cli.add_batch_shape_flags(p, seq_len_help="400 with --full-size, else the config's smallest data.seq_buckets")
  p.add_argument(
    "--padding",
    action="store_true",
    help="print the padding figure of the realistic mix, with and without packing, and exit (nothing compiled)",
  )
  cli.add_init_flag(p)
  p.add_argument(
    "--isolate",
    choices=("auto", "subprocess", "none"),
    default="auto",
    help="one subprocess per batch size (auto: unless jax.distributed is in use)",
  )
  p.add_argument("--timeout", type=cli.POSITIVE, default=3600.0, help="seconds per batch size in subprocess mode")
  return p


def _gen_count(spec: synthetic.BatchSpec) -> int:
  return sum(spec.is_gen(i) for i in range(spec.batch_size))


def reference_lines(rows: Sequence[dict], spec_of: dict[int, synthetic.BatchSpec]) -> list[str]:
  """Ours next to the reference H100 figures, batch by batch."""
  ref = REFERENCE_H100
  lines = [
    f"reference: official PyTorch Cheers on one {ref['device']} ({ref['attention']}, bf16 params + AdamW), "
    f"{ref['seq_len']}-token samples, half generation"
  ]
  lines.append(f"  {'B':>3} {'':<9} {'s/step':>8} {'samples/s':>9} {'peak GiB':>8} {'TFLOP/s/dev':>11}")
  for r in rows:
    b = int(r["batch_size"])
    want = ref["batches"].get(b)
    if want is None:
      continue
    f = measure.fmt
    ours_tf = r.get("tflops_per_device")
    lines.append(
      f"  {b:>3} {'ours':<9} {f(r.get('step_s'), '.3f'):>8} {f(r.get('samples_per_s'), '.2f'):>9} "
      f"{f(r.get('peak_mem_gib'), '.1f'):>8} {f(ours_tf, '.1f'):>11}"
      + ("" if r.get("status") == "ok" else f"   ({r.get('status')})")
    )
    ref_tf = ref["flops_per_sample"] * want["samples_per_s"] / 1e12
    lines.append(
      f"  {b:>3} {'reference':<9} {want['step_s']:>8.3f} {want['samples_per_s']:>9.2f} "
      f"{want['peak_gib']:>8.1f} {ref_tf:>11.1f}"
    )
    if r.get("status") == "ok":
      lines.append(f"  {'':>3} {'speed-up':<9} {want['step_s'] / r['step_s']:>7.2f}x")
    spec = spec_of.get(b)
    if spec is not None and (
      spec.seq_len != ref["seq_len"]
      or spec.sample_len != ref["seq_len"]
      or abs(spec.gen_fraction - ref["gen_fraction"]) > 1e-9
      or spec.image_slots != 1
    ):
      lines.append(
        f"  {'':>3} note: batch composition differs from the reference's (seq {spec.seq_len}, "
        f"samples of {spec.sample_len} tokens, gen fraction {spec.gen_fraction}, "
        f"{spec.image_slots} slot(s))"
      )
  kinds = {str(r.get("device_kind")) for r in rows if r.get("device_kind")}
  if kinds and not any("h100" in k.lower() for k in kinds):
    lines.append(f"  note: measured on {', '.join(sorted(kinds))}, not an H100: not like for like")
  return lines


def print_padding(config, batch_size: int, where: str, samples: int = 20000) -> dict:
  """The padding figure of the realistic mix at the config's buckets, unpacked and packed (one line each)."""
  n = config_lib.model_config(config).tokens_per_image
  buckets = tuple(int(b) for b in config.data.seq_buckets)
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    data.packing = True
  pack = packing.resolve(data, n, rows=batch_size)
  lengths = packing.length_mix(samples, n, int(config.seed), dict(config.data.mix))
  figures = packing.padding_figures(lengths, buckets, batch_size, int(config.data.max_images_per_sample), pack)
  print(
    f"padding: {where}, {samples} samples of the realistic mix (data.mix {dict(config.data.mix)}; "
    f"{n} tokens per image), buckets {buckets}"
  )
  f = figures
  print(
    f"  unpacked, {batch_size} per batch (each batch padded to its longest sample's bucket): "
    f"{100 * f['unpacked']['padding']:.1f} % of the tokens, {100 * f['unpacked']['slot_padding']:.1f} % of "
    f"the image slots ({config.data.max_images_per_sample} per sample)"
  )
  print(
    f"  unpacked, every sample padded alone to its own bucket (best case): "
    f"{100 * f['unpacked_alone']['padding']:.1f} % of the tokens"
  )
  print(
    f"  packed, {pack.rows} rows of {pack.row_len} tokens and {pack.row_images} image slots per batch: "
    f"{100 * f['packed']['padding']:.1f} % of the tokens, {100 * f['packed']['slot_padding']:.1f} % of the "
    f"image slots, {f['packed']['samples'] / f['packed']['batches']:.1f} samples per batch"
  )
  print(
    "RESULT "
    + json.dumps(
      {
        "config": where,
        "samples": samples,
        "buckets": buckets,
        "batch_size": batch_size,
        "pack": dataclasses.asdict(pack),
        **figures,
      }
    )
  )
  return figures


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  args, overrides = cli.parse_config_args(_parser(), argv)
  config_path = FULL_SIZE_CONFIG if args.full_size else (args.config or DEFAULT_CONFIG)
  config = config_lib.load(config_path, overrides)
  if args.batch_sizes:
    batch_sizes = cli.comma_list(args.batch_sizes, "--batch-sizes", int)
  elif args.batch_size:
    batch_sizes = [args.batch_size]
  else:
    batch_sizes = [4, 8] if args.full_size else [8]
  mesh = sharding.parse_meshes(args.mesh, "--mesh")[0] if args.mesh else dict(config.mesh)
  seq_len = args.seq_len or (REFERENCE_H100["seq_len"] if args.full_size else None)
  if args.padding:
    print_padding(config, batch_sizes[0], where=FULL_SIZE_CONFIG if args.full_size else config_path)
    return 0
  batch = dataclasses.replace(synthetic.BatchOptions.from_args(args), seq_len=seq_len)
  specs = {b: batch.spec(config, b) for b in batch_sizes}
  remat = args.remat or config.model.remat_policy
  attention = args.attention or config.model.attention
  layouts = [measure.StepLayout.make(mesh, remat, attention, b) for b in sorted(batch_sizes)]
  cfg = config_lib.model_config(config)
  spec0 = specs[batch_sizes[0]]
  flops = metrics_lib.flops_per_sample(cfg, spec0.seq_len, spec0.image_size, spec0.image_slots, config.train.trainable)
  where = f"full size ({FULL_SIZE_CONFIG})" if args.full_size else config_path
  print(f"train step: {where} {' '.join(overrides)}".rstrip())
  print(
    f"  dtype {cfg.dtype}, params {cfg.param_dtype}, mesh {sharding.mesh_name(mesh)}, remat {remat}, attention "
    f"{attention}, trainable {config.train.trainable}, grad_accum {config.train.grad_accum}"
  )
  for b in batch_sizes:
    s = specs[b]
    if s.text_lens:
      rows = (
        f"packed into {s.rows} rows of {s.seq_len} ({s.slots_per_row} image slots each)"
        if s.pack
        else f"one per row, padded to {s.seq_len} ({s.image_slots} image slot(s) each)"
      )
      print(
        f"  batch {b}: samples of the realistic mix ({min(s.sample_lens())}-{s.sample_len} tokens, one "
        f"{s.image_size}x{s.image_size} image each), {rows}: {100 * s.padding:.1f} % padding"
      )
      continue
    print(
      f"  batch {b}: {_gen_count(s)} generation + {b - _gen_count(s)} understanding samples, "
      f"{s.sample_len}-token samples padded to {s.seq_len}, {s.image_slots} image slot(s) of "
      f"{s.image_size}x{s.image_size} per sample"
    )
  print(
    f"  FLOPs per sample (fwd+bwd): {flops / 1e12:.4g} TFLOP; {args.steps} timed steps after {args.warmup} "
    "warm-up step(s)",
    flush=True,
  )

  rows = measure.run_sweep(
    config_path,
    overrides,
    layouts,
    steps=args.steps,
    warmup=args.warmup,
    batch=batch,
    init=args.init,
    isolate=args.isolate,
    timeout=args.timeout,
    log=lambda m: print(m, flush=True),
  )
  if distributed.launched_multi_process() and not distributed.is_lead():  # process 0 reports
    return 0
  print()
  kinds = sorted({str(r.get("device_kind")) for r in rows if r.get("device_kind")})
  devices = max((int(r.get("devices") or 0) for r in rows), default=0)
  print(f"devices: {devices} x {', '.join(kinds) or '?'}")
  print(
    f"  {'B':>3} {'status':>8} {'compile s':>9} {'s/step':>8} {'samples/s':>9} {'tokens/s':>9} "
    f"{'TFLOP/s/dev':>11} {'MFU':>6} {'peak GiB':>8}  memory source"
  )
  f = measure.fmt
  for r in rows:
    mfu = None if r.get("mfu") is None else 100 * r["mfu"]
    print(
      f"  {r['batch_size']:>3} {r.get('status', '?'):>8} {f(r.get('compile_s'), '.1f'):>9} "
      f"{f(r.get('step_s'), '.3f'):>8} {f(r.get('samples_per_s'), '.2f'):>9} {f(r.get('tokens_per_s'), '.0f'):>9} "
      f"{f(r.get('tflops_per_device'), '.3f'):>11} {f(mfu, '.1f') + ('%' if mfu is not None else ''):>6} "
      f"{f(r.get('peak_mem_gib'), '.2f'):>8}  {r.get('mem_source', '')}"
    )
    if r.get("status") != "ok":
      print(f"      {r.get('error', '')}")
  print("  MFU = FLOPs/sample x samples/s / (devices x peak bf16 FLOP/s); n/a where the peak is unknown (CPU)")
  if args.full_size:
    print()
    print("\n".join(reference_lines(rows, specs)))
  result: dict[str, Any] = {
    "config": where,
    "overrides": overrides,
    "mesh": sharding.mesh_name(mesh),
    "remat": remat,
    "attention": attention,
    "flops_per_sample": flops,
    "rows": rows,
  }
  if args.full_size:
    result["reference_h100"] = REFERENCE_H100
  print("RESULT " + json.dumps(result))
  return 0 if any(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
