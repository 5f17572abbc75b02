"""Evaluation speed: understanding rows/s and seconds per GenEval prompt (4 images), through the same code
as `python -m cheers_jax.evaluate`.

  python -m cheers_jax.bench evaluate --config tiny
  python -m cheers_jax.bench evaluate --full-size              # random weights, published shapes, bf16
  python -m cheers_jax.bench evaluate --checkpoint HF_DIR

Understanding: --rows synthetic MMBench-style rows (random images of several aspect ratios, questions of
unequal length), --batch-size rows per device; random weights never emit <|im_end|>, so every row decodes exactly
--answer-tokens ids (real MCQ answers are 1-3 ids). GenEval: --prompts prompts x 4 images at --steps
steps with CFG 9.5. Both are measured for each local device count of --devices (default 1 and all):
rows/s and images/s. Each figure is the second of two identical runs (the first compiles). The last
line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image

from cheers_jax import cli
from cheers_jax.bench.generate import add_model_flags, build_model
from cheers_jax.data.tokenizer import CheersTokenizer
from cheers_jax.errors import UserError
from cheers_jax.evaluate.generation import run_geneval
from cheers_jax.evaluate.parallel import Workers
from cheers_jax.evaluate.understanding import run_understanding
from cheers_jax.sharding import make_mesh


def synthetic_mcq(path: Path, rows: int, seed: int = 0) -> None:
  import pandas as pd  # pandas: the evaluation's TSV files only

  rng = np.random.RandomState(seed)
  sizes = [(640, 480), (480, 640), (512, 512), (800, 300)]
  records = []
  for i in range(rows):
    w, h = sizes[i % len(sizes)]
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)).save(buf, "JPEG")
    words = " ".join(["word"] * int(rng.randint(5, 60)))
    records.append(
      dict(
        index=i,
        question=f"Which option describes the {words}?",
        A="a red circle",
        B="a blue square",
        C="a green triangle",
        D="nothing",
        answer="ABCD"[i % 4],
        category="coarse_perception",
        split="dev",
        image=base64.b64encode(buf.getvalue()).decode(),
      )
    )
  pd.DataFrame(records).to_csv(path, sep="\t", index=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  p = cli.ArgumentParser(
    prog="python -m cheers_jax.bench evaluate",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  add_model_flags(p)
  p.add_argument("--rows", type=cli.POSITIVE_INT, default=64, help="understanding rows (default 64)")
  p.add_argument("--batch-size", type=cli.POSITIVE_INT, default=16, help="understanding rows per device (default 16)")
  p.add_argument("--answer-tokens", type=cli.POSITIVE_INT, default=16, help="ids decoded per row (default 16)")
  p.add_argument(
    "--prompts", type=cli.NON_NEGATIVE_INT, default=2, help="GenEval prompts, 4 images each (default 2; 0 skips)"
  )
  p.add_argument("--steps", type=cli.POSITIVE_INT, default=80, help="GenEval Euler steps (default 80)")
  p.add_argument(
    "--gen-batch-size", type=cli.POSITIVE_INT, default=8, help="GenEval images per device per call (default 8)"
  )
  p.add_argument("--seed", type=cli.NON_NEGATIVE_INT, default=0)
  p.add_argument("--devices", help="comma-separated local device counts to measure (default: 1 and all)")
  args = p.parse_args(argv)
  if min(args.rows, args.batch_size, args.answer_tokens, args.steps, args.gen_batch_size) < 1 or args.prompts < 0:
    p.error("--rows, --batch-size, --answer-tokens, --steps and --gen-batch-size must be >= 1, --prompts >= 0")

  local = jax.local_device_count()
  counts = cli.comma_list(args.devices, "--devices", int) if args.devices else sorted({1, local})
  if any(n < 1 or n > local for n in counts):
    raise UserError(f"--devices {args.devices}: each count must be between 1 and the {local} local devices")
  t0 = time.perf_counter()
  model, variables, what = build_model(args)
  jax.block_until_ready(variables)
  device = f"{jax.devices()[0].device_kind} x{local}"
  print(f"model: {what}; {device}; ready in {time.perf_counter() - t0:.1f} s", flush=True)
  result = {"model": what, "device": device, "per_device_count": {}}
  work = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
  tok = CheersTokenizer()
  try:
    data = work / "MMBench_DEV_EN_V11.tsv"
    synthetic_mcq(data, args.rows, args.seed)
    meta = work / "evaluation_metadata.jsonl"
    meta.write_text(
      "\n".join(
        json.dumps({"tag": "bench", "prompt": f"a photo of {n} cats on a {c} sofa"})
        for n, c in zip(range(1, args.prompts + 1), ["red", "blue", "green"] * 99)
      )
    )
    for n in counts:
      workers = Workers(0, 1, n, make_mesh({"data": -1}, jax.local_devices()[:n]) if n > 1 else None)
      quiet = dict(progress=False, log=lambda s: None, workers=workers)
      figures = {}
      times = []
      for run in range(2):
        t0 = time.perf_counter()
        run_understanding(
          model,
          variables,
          str(data),
          "MMBench_DEV_EN_V11",
          str(work / f"und{n}_{run}"),
          tokenizer=tok,
          batch_size=args.batch_size * n,
          max_new_tokens=args.answer_tokens,
          **quiet,
        )
        times.append(time.perf_counter() - t0)
      figures.update(
        rows=args.rows,
        batch_size=args.batch_size * n,
        answer_tokens=args.answer_tokens,
        understanding_first_s=times[0],
        understanding_s=times[1],
        rows_per_s=args.rows / times[1],
      )
      print(
        f"{n} device(s): understanding {args.rows} rows, batch {args.batch_size * n}, {args.answer_tokens} ids "
        f"each: {args.rows / times[1]:.2f} rows/s ({times[1]:.1f} s; first run with compiles {times[0]:.1f} s)",
        flush=True,
      )
      if args.prompts:
        times = []
        for run in range(2):
          t0 = time.perf_counter()
          run_geneval(
            model,
            variables,
            tok,
            str(meta),
            str(work / f"gen{n}_{run}"),
            images_per_prompt=4,
            steps=args.steps,
            batch_size=args.gen_batch_size,
            **quiet,
          )
          times.append(time.perf_counter() - t0)
        images = 4 * args.prompts
        figures.update(
          geneval_prompts=args.prompts,
          steps=args.steps,
          geneval_s_per_prompt=times[1] / args.prompts,
          images_per_s=images / times[1],
          geneval_first_s=times[0],
        )
        print(
          f"{n} device(s): geneval {images / times[1]:.3f} images/s, {times[1] / args.prompts:.2f} s per prompt "
          f"(4 images, {args.steps} steps, CFG 9.5, {args.gen_batch_size} images per device per call; first run "
          f"with compiles {times[0]:.1f} s)",
          flush=True,
        )
      result["per_device_count"][str(n)] = figures
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print("RESULT " + json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
