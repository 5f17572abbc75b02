"""python -m cheers_jax.evaluate {understanding,score,geneval,dpg,suite} ...

  understanding  --checkpoint DIR --data FILE.tsv --dataset NAME --out OUTDIR [--batch-size N] [--limit N]
  score          --dataset NAME --predictions FILE.tsv
  geneval        --checkpoint DIR --metadata evaluation_metadata.jsonl --out OUTDIR
  dpg            --checkpoint DIR --prompts PROMPT_DIR --out OUTDIR
  suite          --checkpoint DIR --lmudata DIR --out OUT [--geneval-metadata F] [--dpg-prompts D] [--only A,B]

The model comes from exactly one of --checkpoint HF_DIR, --orbax ORBAX_EXPORT_DIR or --run TRAIN_WORKDIR
(`cheers_jax.infer.loader`). Understanding writes OUTDIR/NAME.tsv (input columns but `image`, plus raw /
prediction / extracted / error) and OUTDIR/NAME_score.json; rerunning with the same OUTDIR decodes only
the missing rows (GenEval and DPG resume likewise). Under a multi-process launcher (the environments of
`cheers_jax.distributed`, as for `train`) every process runs the same command: each takes its share of
rows or images on its local devices, process 0 writes the merged outputs; OUTDIR must be shared.
A user's mistake is one line `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from cheers_jax import cli
from cheers_jax import distributed
from cheers_jax.data.tokenizer import CheersTokenizer
from cheers_jax.evaluate import generation as gen
from cheers_jax.evaluate import suite
from cheers_jax.evaluate.datasets import DatasetError, dataset_spec
from cheers_jax.evaluate.parallel import current_workers
from cheers_jax.evaluate.scoring import score_file, score_path, summary_lines
from cheers_jax.evaluate.understanding import run_understanding
from cheers_jax.infer import loader


def _model_args(p: argparse.ArgumentParser) -> None:
  cli.add_model_source_flags(p.add_argument_group("model"), dtype_help="bf16 as the official run")


def _understanding_args(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--batch-size",
    type=cli.POSITIVE_INT,
    default=16,
    help="rows decoded together per process (default 16; rounded up to the local devices)",
  )
  p.add_argument("--limit", type=cli.POSITIVE_INT, help="only the first N rows (a quick look)")
  p.add_argument(
    "--max-new-tokens",
    type=cli.POSITIVE_INT,
    help="cap on answer tokens (default: the reference's own limit, prompt + answer <= 1025 ids)",
  )
  p.add_argument(
    "--bucket", type=cli.POSITIVE_INT, default=64, help="prompt lengths are padded to a multiple of this (compiles)"
  )
  p.add_argument(
    "--save-every", type=cli.POSITIVE_INT, default=1, help="write the predictions file every N batches (default 1)"
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _generation_args(p: argparse.ArgumentParser, name: str, prefix: str = "") -> None:
  d = gen.DEFAULTS[name]
  flag = f"--{prefix}" if prefix else "--"
  dest = prefix.replace("-", "_")
  p.add_argument(
    f"{flag}steps",
    dest=f"{dest}steps",
    type=cli.POSITIVE_INT,
    default=d["steps"],
    help=f"{name} Euler steps (default {d['steps']}: {d['steps_src']})",
  )
  p.add_argument(
    f"{flag}cfg",
    dest=f"{dest}cfg",
    type=cli.NON_NEGATIVE,
    default=d["cfg"],
    help=f"{name} guidance scale (default {d['cfg']}: {d['cfg_src']})",
  )
  p.add_argument(
    f"{flag}shift",
    dest=f"{dest}shift",
    type=cli.POSITIVE,
    default=d["shift"],
    help=f"{name} time shift a (default {d['shift']}: {d['shift_src']})",
  )


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
    prog="python -m cheers_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = p.add_subparsers(dest="command", required=True, metavar="{understanding,score,geneval,dpg,suite}")

  u = sub.add_parser("understanding", help="answer a VLMEvalKit TSV with the model and score it")
  _model_args(u)
  u.add_argument("--data", required=True, help="VLMEvalKit TSV (e.g. $LMUData/MMBench_DEV_EN_V11.tsv)")
  u.add_argument("--dataset", help="benchmark name: picks the prompt and the scorer (default: the file's stem)")
  u.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
  _understanding_args(u)

  s = sub.add_parser("score", help="re-score a predictions TSV without a model")
  s.add_argument("--dataset", required=True, help="benchmark name (the scorer)")
  s.add_argument("--predictions", required=True, help="predictions TSV (with `raw` and/or `prediction`)")

  for name, helptext in (
    ("geneval", "GenEval images in the official layout"),
    ("dpg", "DPG-Bench 2x2 grids in the official layout"),
  ):
    d = gen.DEFAULTS[name]
    g = sub.add_parser(name, help=helptext)
    _model_args(g)
    if name == "geneval":
      g.add_argument("--metadata", required=True, help="GenEval evaluation_metadata.jsonl")
      g.add_argument(
        "--images-per-prompt",
        type=cli.POSITIVE_INT,
        default=d["images_per_prompt"],
        help=f"default {d['images_per_prompt']} (run_short.sh --batch_size 4)",
      )
    else:
      g.add_argument("--prompts", required=True, help="DPG-Bench prompts folder (one .txt per prompt)")
    g.add_argument("--out", required=True, help="output folder (rerun to resume)")
    _generation_args(g, name)
    g.add_argument(
      "--seed", type=cli.NON_NEGATIVE_INT, default=0, help="image n of prompt i uses seed + i * images-per-prompt + n"
    )
    g.add_argument("--batch-size", type=cli.POSITIVE_INT, default=8, help="images per device per call (default 8)")
    g.add_argument("--limit", type=cli.POSITIVE_INT, help="only the first N prompts")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

  su = sub.add_parser("suite", help="every benchmark whose input is present, and OUT/summary.{md,json}")
  _model_args(su)
  su.add_argument("--lmudata", required=True, help="VLMEvalKit's LMUData folder (NAME.tsv of each benchmark)")
  su.add_argument("--out", required=True, help="output folder (rerun to resume)")
  su.add_argument(
    "--geneval-metadata",
    help="GenEval evaluation_metadata.jsonl (default: LMUDATA/geneval/evaluation_metadata.jsonl when present)",
  )
  su.add_argument("--dpg-prompts", help="DPG-Bench prompts folder (default: LMUDATA/dpg_bench/prompts when present)")
  su.add_argument("--only", help="comma-separated benchmark names (the 12 understanding sets, geneval, dpg)")
  _understanding_args(su)
  su.add_argument("--gen-batch-size", type=cli.POSITIVE_INT, default=8, help="images per device per call (default 8)")
  su.add_argument("--seed", type=cli.NON_NEGATIVE_INT, default=0, help="GenEval / DPG seed (see geneval --seed)")
  _generation_args(su, "geneval", "geneval-")
  _generation_args(su, "dpg", "dpg-")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _load(args, need_generation: bool):
  """The model, once per process, after the inputs were checked."""
  dtype = args.dtype or loader.default_dtype()
  t0 = time.perf_counter()
  model, variables = loader.load_model(args.checkpoint, args.orbax, args.run, dtype, need_generation=need_generation)
  print(
    f"loaded {args.checkpoint or args.orbax or args.run} ({dtype}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr
  )
  return model, variables


def _main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "score":
    spec = dataset_spec(args.dataset)
    scores = score_file(spec, args.predictions)
    print("\n".join(summary_lines(scores)))
    print(f"wrote {score_path(spec, args.predictions)}")
    return 0

  loader.check_one_source(args.checkpoint, args.orbax, args.run)
  # the inputs are checked before the (slow) model load, so a bad file fails fast
  if args.command == "understanding":
    if not os.path.isfile(args.data):
      raise DatasetError(f"data file not found: {args.data!r}")
    name = args.dataset or Path(args.data).stem
    dataset_spec(name)
  elif args.command == "geneval":
    gen.check_flow_args(args.steps, args.shift, args.batch_size, args.images_per_prompt)
    gen.read_geneval_metadata(args.metadata)
  elif args.command == "dpg":
    gen.check_flow_args(args.steps, args.shift, args.batch_size)
    gen.read_dpg_prompts(args.prompts)
  else:
    plan = suite.plan(args.lmudata, args.geneval_metadata, args.dpg_prompts, args.only)
  distributed.maybe_initialize()
  workers = current_workers()
  draws = args.command in suite.GENERATION or (
    args.command == "suite" and any(n in plan.inputs for n in suite.GENERATION)
  )
  model, variables = _load(args, need_generation=draws)
  tokenizer = CheersTokenizer()
  quiet = dict(workers=workers, progress=not args.no_progress)
  understanding = dict(
    batch_size=args.batch_size,
    limit=args.limit,
    max_new_tokens=args.max_new_tokens,
    bucket=args.bucket,
    save_every=args.save_every,
  )
  if args.command == "understanding":
    scores = run_understanding(
      model, variables, args.data, name, args.out, tokenizer=tokenizer, **understanding, **quiet
    )
    if workers.is_lead:
      print("\n".join(summary_lines(scores)))
    return 0
  if args.command == "suite":
    generation = {
      name: dict(
        steps=getattr(args, f"{name}_steps"),
        cfg=getattr(args, f"{name}_cfg"),
        shift=getattr(args, f"{name}_shift"),
        seed=args.seed,
        batch_size=args.gen_batch_size,
      )
      for name in ("geneval", "dpg")
    }
    suite.run_suite(
      model, variables, tokenizer, plan, args.out, understanding=understanding, generation=generation, **quiet
    )
    if workers.is_lead:
      print(Path(args.out, "summary.md").read_text(encoding="utf-8"))
      print(f"wrote {Path(args.out, 'summary.md')} and {Path(args.out, 'summary.json')}")
    return 0
  common = dict(
    steps=args.steps,
    cfg=args.cfg,
    shift=args.shift,
    seed=args.seed,
    batch_size=args.batch_size,
    limit=args.limit,
    **quiet,
  )
  if args.command == "geneval":
    res = gen.run_geneval(
      model, variables, tokenizer, args.metadata, args.out, images_per_prompt=args.images_per_prompt, **common
    )
  else:
    res = gen.run_dpg(model, variables, tokenizer, args.prompts, args.out, **common)
  if workers.is_lead:
    what = "grids" if args.command == "dpg" else "images"
    failed = f", {res['failed']} failed prompt(s)" if res["failed"] else ""
    print(f"{args.command}: {res['generated']} {what} in {res['seconds']:.1f} s{failed} -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
