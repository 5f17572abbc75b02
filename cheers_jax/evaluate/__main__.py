"""python -m cheers_jax.evaluate {understanding,score,geneval,dpg} ...

  understanding  --checkpoint DIR --data FILE.tsv --dataset NAME --out OUTDIR [--batch-size N] [--limit N]
  score          --dataset NAME --predictions FILE.tsv
  geneval        --checkpoint DIR --metadata evaluation_metadata.jsonl --out OUTDIR
  dpg            --checkpoint DIR --prompts PROMPT_DIR --out OUTDIR

The model comes from exactly one of --checkpoint HF_DIR, --orbax ORBAX_EXPORT_DIR or --run TRAIN_WORKDIR
(`cheers_jax.infer.loader`). Understanding writes OUTDIR/NAME.tsv (input columns but `image`, plus raw /
prediction / extracted / error) and OUTDIR/NAME_score.json; rerunning with the same OUTDIR decodes only
the missing rows (GenEval and DPG resume likewise). A user's mistake is one line `error: ...`, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from cheers_jax import cli


def _model_args(p: argparse.ArgumentParser) -> None:
  cli.add_model_source_flags(p.add_argument_group("model"), dtype_help="bf16 as the official run")


def build_parser() -> argparse.ArgumentParser:
  from cheers_jax.evaluate import generation as gen
  p = cli.ArgumentParser(prog="python -m cheers_jax.evaluate", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, metavar="{understanding,score,geneval,dpg}")

  u = sub.add_parser("understanding", help="answer a VLMEvalKit TSV with the model and score it")
  _model_args(u)
  u.add_argument("--data", required=True, help="VLMEvalKit TSV (e.g. $LMUData/MMBench_DEV_EN_V11.tsv)")
  u.add_argument("--dataset", help="benchmark name: picks the prompt and the scorer (default: the file's stem)")
  u.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
  u.add_argument("--batch-size", type=cli.POSITIVE_INT, default=16, help="rows decoded together (default 16)")
  u.add_argument("--limit", type=cli.POSITIVE_INT, help="only the first N rows (a quick look)")
  u.add_argument("--max-new-tokens", type=cli.POSITIVE_INT,
                 help="cap on answer tokens (default: the reference's own limit, prompt + answer <= 1025 ids)")
  u.add_argument("--bucket", type=cli.POSITIVE_INT, default=64, help="prompt lengths are padded to a multiple of this (compiles)")
  u.add_argument("--save-every", type=cli.POSITIVE_INT, default=1, help="write the predictions file every N batches (default 1)")
  u.add_argument("--no-progress", action="store_true", help="no progress bar")

  s = sub.add_parser("score", help="re-score a predictions TSV without a model")
  s.add_argument("--dataset", required=True, help="benchmark name (the scorer)")
  s.add_argument("--predictions", required=True, help="predictions TSV (with `raw` and/or `prediction`)")

  for name, helptext in (("geneval", "GenEval images in the official layout"),
                         ("dpg", "DPG-Bench 2x2 grids in the official layout")):
    d = gen.DEFAULTS[name]
    g = sub.add_parser(name, help=helptext)
    _model_args(g)
    if name == "geneval":
      g.add_argument("--metadata", required=True, help="GenEval evaluation_metadata.jsonl")
      g.add_argument("--images-per-prompt", type=cli.POSITIVE_INT, default=d["images_per_prompt"],
                     help=f"default {d['images_per_prompt']} (run_short.sh --batch_size 4)")
    else:
      g.add_argument("--prompts", required=True, help="DPG-Bench prompts folder (one .txt per prompt)")
    g.add_argument("--out", required=True, help="output folder (rerun to resume)")
    g.add_argument("--steps", type=cli.POSITIVE_INT, default=d["steps"], help=f"Euler steps (default {d['steps']}: {d['steps_src']})")
    g.add_argument("--cfg", type=cli.NON_NEGATIVE, default=d["cfg"], help=f"guidance scale (default {d['cfg']}: {d['cfg_src']})")
    g.add_argument("--shift", type=cli.POSITIVE, default=d["shift"],
                   help=f"time shift a (default {d['shift']}: {d['shift_src']})")
    g.add_argument("--seed", type=cli.NON_NEGATIVE_INT, default=0, help="image n of prompt i uses seed + i * images-per-prompt + n")
    g.add_argument("--batch-size", type=cli.POSITIVE_INT, default=8, help="images generated together (default 8)")
    g.add_argument("--limit", type=cli.POSITIVE_INT, help="only the first N prompts")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "score":
    from cheers_jax.evaluate.datasets import dataset_spec
    from cheers_jax.evaluate.scoring import score_file, score_path, summary_lines
    spec = dataset_spec(args.dataset)
    scores = score_file(spec, args.predictions)
    print("\n".join(summary_lines(scores)))
    print(f"wrote {score_path(spec, args.predictions)}")
    return 0
  if args.command == "understanding":
    from cheers_jax.evaluate.understanding import run_cli
    return run_cli(args)
  from cheers_jax.evaluate.generation import run_cli as run_generation
  return run_generation(args)


if __name__ == "__main__":
  sys.exit(main())
