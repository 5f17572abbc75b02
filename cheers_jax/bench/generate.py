"""Inference speed: prefill, text decoding and text-to-image at several batch sizes.

  python -m cheers_jax.bench generate --config tiny --batch-sizes 1,8
  python -m cheers_jax.bench generate --checkpoint HF_DIR --batch-sizes 1,8
  python -m cheers_jax.bench generate --full-size --batch-sizes 1,8     # random weights, published shapes, bf16

Every measured program is first run once (the compile, reported separately as first-call time minus the
steady-state time), then timed over --repeats runs (median). Prefill: an understanding prompt of
--prompt-len text tokens plus one image. Decode: --new-tokens greedy tokens after it, never stopping
at <|im_end|>. T2I: --steps Euler steps with CFG (2B rows per LLM call, tokenizer path once per step),
the final VAE decode included. The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from cheers_jax import cli
from cheers_jax import config as config_lib
from cheers_jax.data.tokenizer import IM_END_ID, IM_START_ID
from cheers_jax.infer import loader
from cheers_jax.infer.decode import GREEDY, decode, prefill, prepare_prompts, round_up
from cheers_jax.infer.t2i import text_to_image
from cheers_jax.model.config import ModelConfig
from cheers_jax.model.sequence import IMAGE_TOKEN_INDEX


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """The model flags `build_model` reads: one of --config / --checkpoint / --full-size, and --dtype."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--config", help="a shipped config name or a config file (its `model` section), random weights")
  src.add_argument("--checkpoint", help="Hugging Face checkpoint directory")
  src.add_argument("--full-size", action="store_true", help="published shapes (2.6 B params), random bf16 weights")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the config's; bf16 for the others")


def build_model(args):
  """-> (Cheers, variables, description); the dtype policy is the inference loader's."""

  if args.checkpoint:
    dtype = args.dtype or "bfloat16"
    model, variables = loader.load_hf(args.checkpoint, dtype)
    what = f"checkpoint {args.checkpoint}"
  else:
    if args.full_size:
      cfg, dtype, what = ModelConfig(), args.dtype or "bfloat16", "full size (published shapes), random weights"
    else:
      cfg = config_lib.model_config(config_lib.load(args.config))
      dtype = args.dtype or cfg.dtype
      what = f"config {args.config}, random weights"
    model, variables = loader.load_random(cfg, dtype, args.seed)
  return model, variables, f"{what}, {dtype}"


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
  """(first call seconds, median of `repeats` later calls), each fully synchronised."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def bench_batch(model, variables, batch: int, args) -> dict:
  cfg = model.cfg
  rng = np.random.RandomState(args.seed)
  res = cfg.vision.image_size
  text = rng.randint(0, 150000, (batch, args.prompt_len))
  prompts = [np.concatenate([[IM_START_ID, IMAGE_TOKEN_INDEX, IM_END_ID], row]) for row in text]
  images = [[rng.rand(res, res, 3).astype(np.float32)] for _ in range(batch)]
  pb = prepare_prompts(cfg, prompts, images, bucket=64)
  cache_len = round_up(pb.seq_len + args.new_tokens, 64)
  out = {"batch": batch, "prompt_tokens": int(pb.lengths[0]), "cache_len": cache_len}

  first, steady = _timed(lambda: prefill(model, variables, pb, cache_len), args.repeats)
  out.update(prefill_s=steady, prefill_compile_s=max(first - steady, 0.0))
  state = prefill(model, variables, pb, cache_len)
  run = lambda: decode(model, variables, state, args.new_tokens, GREEDY, eos_id=None).tokens
  first, steady = _timed(run, args.repeats)
  out.update(
    decode_s=steady,
    decode_compile_s=max(first - steady, 0.0),
    decode_tokens_per_s=batch * args.new_tokens / steady,
    decode_ms_per_step=1e3 * steady / args.new_tokens,
  )

  if args.steps > 0:
    t2i_prompts = [np.append(row[: args.t2i_prompt_len], IM_START_ID) for row in text]
    seeds = list(range(batch))
    run = lambda: text_to_image(model, variables, t2i_prompts, steps=args.steps, cfg_scale=args.cfg, seeds=seeds).images
    first, steady = _timed(run, args.repeats)
    out.update(
      t2i_s=steady,
      t2i_compile_s=max(first - steady, 0.0),
      t2i_s_per_image=steady / batch,
      t2i_s_per_step=steady / args.steps,
    )
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog="python -m cheers_jax.bench generate", description=__doc__)
  add_model_flags(p)
  p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
  p.add_argument(
    "--prompt-len", type=cli.POSITIVE_INT, default=64, help="text tokens of the prefill prompt (+ one image)"
  )
  p.add_argument("--new-tokens", type=cli.POSITIVE_INT, default=128, help="decoded tokens (default 128)")
  p.add_argument("--steps", type=cli.NON_NEGATIVE_INT, default=80, help="T2I Euler steps (default 80; 0 skips T2I)")
  p.add_argument("--t2i-prompt-len", type=cli.POSITIVE_INT, default=48, help="text tokens of the T2I prompt")
  p.add_argument("--cfg", type=cli.NON_NEGATIVE, default=9.5, help="CFG scale (default 9.5)")
  p.add_argument("--repeats", type=cli.POSITIVE_INT, default=3, help="timed runs after the compile (median)")
  p.add_argument("--seed", type=cli.NON_NEGATIVE_INT, default=0)
  args = p.parse_args(argv)
  batches = cli.comma_list(args.batch_sizes, "--batch-sizes", int)
  if min(batches) < 1 or args.new_tokens < 1 or args.repeats < 1 or args.steps < 0:
    p.error("batch sizes, --new-tokens and --repeats must be >= 1, --steps >= 0")

  t0 = time.perf_counter()
  model, variables, what = build_model(args)
  jax.block_until_ready(variables)
  print(
    f"model: {what}; {jax.devices()[0].device_kind} x{jax.device_count()}; ready in {time.perf_counter() - t0:.1f} s",
    flush=True,
  )
  rows = []
  for b in batches:
    r = bench_batch(model, variables, b, args)
    rows.append(r)
    line = (
      f"B={b:<3} prefill {r['prompt_tokens']} tok: {1e3 * r['prefill_s']:8.1f} ms "
      f"(compile {r['prefill_compile_s']:.1f} s)"
      f" | decode {r['decode_tokens_per_s']:9.1f} tok/s, {r['decode_ms_per_step']:.2f} ms/step "
      f"(compile {r['decode_compile_s']:.1f} s)"
    )
    if "t2i_s" in r:
      line += (
        f" | T2I {args.steps} steps: {r['t2i_s_per_image']:.3f} s/image, {r['t2i_s_per_step']:.4f} s/step "
        f"(compile {r['t2i_compile_s']:.1f} s)"
      )
    print(line, flush=True)
  print(
    "RESULT "
    + json.dumps(
      {
        "model": what,
        "device": jax.devices()[0].device_kind,
        "steps": args.steps,
        "new_tokens": args.new_tokens,
        "rows": rows,
      }
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
