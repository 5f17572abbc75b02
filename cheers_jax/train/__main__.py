r"""Train Cheers: `python -m cheers_jax.train --config tiny --workdir DIR`.

--config is a shipped config name (tiny, cheers_1p5b) or a config file (a Python file with get_config(),
e.g. a training-stage recipe of the repository); override any value with --config.KEY=VALUE, e.g.
  python -m cheers_jax.train --config tiny --workdir /tmp/tiny --config.train.steps=50
  python -m cheers_jax.train --config path/to/stage2_pretrain.py --workdir /runs/stage2 \
      --config.init_from=hf:/ckpt/Cheers --config.data.jsonl_path=data.jsonl --config.data.image_root=imgs
Rerunning the same command resumes from the latest checkpoint in WORKDIR/checkpoints (state and data
position). On SIGTERM a checkpoint is written at the next step boundary before exiting. At the end the
final params are exported to WORKDIR/hf in the published HF layout, sample images go to
WORKDIR/samples, metrics to WORKDIR/metrics.jsonl and TensorBoard (WORKDIR).
Multi-host: start one process per host (see launch/); cheers_jax.distributed reads the environment.
Flags: --no-export-hf, --no-eval, --no-samples turn the end-of-run steps off (the older spellings
--noexport_hf, --noeval, --nosamples still work).
Exit status: 0 finished; 2 a mistake in the config, the flags or the data (one line `error: ...`; --debug:
traceback); 3 stopped on a non-finite loss (train.nan_policy=stop); 75 preempted (SIGTERM): a checkpoint is
saved, rerun the same command to resume (75 = EX_TEMPFAIL, "try again"; launch/ requeues).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from cheers_jax import cli
from cheers_jax import config as config_lib
from cheers_jax import distributed
from cheers_jax.errors import UserError
from cheers_jax.train import loop

EXIT_NONFINITE = 3  # stopped on a non-finite loss or gradient (train.nan_policy='stop')
EXIT_PREEMPTED = 75  # SIGTERM: checkpoint saved, rerun to resume (sysexits.h EX_TEMPFAIL)
# The flags' spellings of the absl era (`--export_hf`, `--noeval`): still accepted, not documented.
_DEPRECATED = {
  "--export_hf": "--export-hf",
  "--noexport_hf": "--no-export-hf",
  "--noeval": "--no-eval",
  "--nosamples": "--no-samples",
}


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cheers_jax.train", description=__doc__)
  cli.add_config_flags(p, required=True)
  p.add_argument(
    "--workdir",
    help="directory for checkpoints, metrics, samples and the HF export (default: "
    "config.workdir). An existing run there is resumed.",
  )
  p.add_argument(
    "--export-hf",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="export the final params to WORKDIR/hf (HF safetensors layout; default on)",
  )
  p.add_argument(
    "--eval",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="after training on the synthetic shapes, caption held-out images and draw every prompt, "
    "judged against chance (default on)",
  )
  p.add_argument(
    "--samples",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="write sample images of config.sample_prompts (default on)",
  )
  p.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
  return p


def _quiet_libraries(record: logging.LogRecord) -> bool:
  """Orbax narrates every save at INFO, and JAX each backend it does not find ('Unable to initialize backend
  tpu: libtpu.so'): keep their warnings only."""
  if record.levelno >= logging.WARNING:
    return True
  return "orbax" not in record.pathname and not record.name.startswith("jax.")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
  """INFO to stderr in one format, library chatter filtered. absl (imported by Orbax) calls
  `logging.basicConfig()` the first time it logs, so a handler with Python's bare default format may be
  there already: it gets ours (handlers someone configured keep theirs)."""
  root = logging.getLogger()
  if not root.handlers:
    logging.basicConfig(format=LOG_FORMAT)
  root.setLevel(logging.INFO)
  for handler in root.handlers:
    if handler.formatter is not None and handler.formatter._fmt == logging.BASIC_FORMAT:
      handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_quiet_libraries)


def _train(argv: list[str]) -> int:
  args, overrides = cli.parse_config_args(_parser(), [_DEPRECATED.get(a, a) for a in argv])
  config = config_lib.load(args.config, overrides)
  workdir = args.workdir or config.get("workdir", "")
  if not workdir:
    raise UserError("--workdir is required (or set config.workdir)")
  configure_logging()
  distributed.maybe_initialize()
  try:
    result = loop.train(config, workdir, export_hf=args.export_hf, evaluate=args.eval, samples=args.samples)
  except loop.NonFiniteError as e:
    print(f"training stopped: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  print(f"{result.status} at step {result.step}; workdir {workdir}", flush=True)
  return EXIT_PREEMPTED if result.status == "preempted" else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_train, argv)


if __name__ == "__main__":
  sys.exit(main())
