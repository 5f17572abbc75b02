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
Exit status: 0 finished; 2 a mistake in the config, the flags or the data (one line `error: ...`;
--debug: traceback); 3 stopped on a non-finite loss (train.nan_policy=stop); 75 preempted (SIGTERM): a
checkpoint is saved, rerun the same command to resume (75 = EX_TEMPFAIL, "try again"; launch/ requeues).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags

from cheers_jax import cli
from cheers_jax import config as config_lib
from cheers_jax.errors import UserError

_CONFIG = flags.DEFINE_string("config", None, "A shipped config name (tiny, cheers_1p5b) or a config file "
                              "(FILE.py[:ARG]); override values with --config.KEY=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the HF export "
                               "(default: config.workdir). An existing run there is resumed.")
_EXPORT_HF = flags.DEFINE_bool("export_hf", True, "Export the final params to WORKDIR/hf (HF safetensors layout).")
_EVAL = flags.DEFINE_bool("eval", True, "After training on the synthetic shapes, caption held-out images and "
                          "report colour/shape accuracy against chance.")
_SAMPLES = flags.DEFINE_bool("samples", True, "Write sample images of config.sample_prompts.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a user error too.")

EXIT_NONFINITE = 3    # stopped on a non-finite loss or gradient (train.nan_policy='stop')
EXIT_PREEMPTED = 75   # SIGTERM: checkpoint saved, rerun to resume (sysexits.h EX_TEMPFAIL)

_OVERRIDES: list[str] = []  # the --config.KEY=VALUE arguments, set aside before absl parses the rest


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; --config.KEY=VALUE overrides go to the config loader instead."""
  rest, overrides = config_lib.split_overrides(argv[1:])
  _OVERRIDES[:] = overrides
  try:
    return flags.FLAGS([argv[0]] + rest)
  except SystemExit:  # absl's --help prints the usage and exits 1: asking for help is not a failure
    if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    print(f"error: {cli.one_line(str(e))} (pass --help for usage)", file=sys.stderr)
    sys.exit(cli.USAGE_ERROR)


def _quiet_orbax(record: logging.LogRecord) -> bool:
  """Orbax narrates every save at INFO; keep its warnings only."""
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def _train(argv: list[str]) -> int:
  if argv:
    raise UserError(f"unexpected arguments: {' '.join(argv)} (options are --flag=value)")
  if not _CONFIG.value:
    raise UserError("--config is required, e.g. --config tiny")
  config = config_lib.load(_CONFIG.value, _OVERRIDES)
  workdir = _WORKDIR.value or config.get("workdir", "")
  if not workdir:
    raise UserError("--workdir is required (or set config.workdir)")
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_quiet_orbax)

  from cheers_jax import distributed
  distributed.maybe_initialize()
  from cheers_jax.train.loop import NonFiniteError, train
  try:
    result = train(config, workdir, export_hf=_EXPORT_HF.value, evaluate=_EVAL.value, samples=_SAMPLES.value)
  except NonFiniteError as e:
    print(f"training stopped: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  print(f"{result.status} at step {result.step}; workdir {workdir}", flush=True)
  return EXIT_PREEMPTED if result.status == "preempted" else 0


def main(argv: list[str]) -> int:
  return cli.run(_train, argv[1:], debug=_DEBUG.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
