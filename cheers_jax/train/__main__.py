r"""Train Cheers: `python -m cheers_jax.train --config configs/tiny.py --workdir DIR`.

The config is an ml_collections file (configs/*.py); override any value with --config.KEY=VALUE, e.g.
  python -m cheers_jax.train --config configs/tiny.py --workdir /tmp/tiny --config.train.steps=50
  python -m cheers_jax.train --config configs/stage2_pretrain.py --workdir /runs/stage2 \
      --config.init_from=hf:/ckpt/Cheers --config.data.jsonl_path=data.jsonl --config.data.image_root=imgs
Rerunning the same command resumes from the latest checkpoint in WORKDIR/checkpoints (state and data
position). On SIGTERM a checkpoint is written at the next step boundary before exiting. At the end the
final params are exported to WORKDIR/hf in the published HF layout, sample images go to
WORKDIR/samples, metrics to WORKDIR/metrics.jsonl and TensorBoard (WORKDIR).
Multi-host: start one process per host (see launch/); cheers_jax.distributed reads the environment.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py); override values with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the HF export "
                               "(default: config.workdir). An existing run there is resumed.")
_EXPORT_HF = flags.DEFINE_bool("export_hf", True, "Export the final params to WORKDIR/hf (HF safetensors layout).")
_EVAL = flags.DEFINE_bool("eval", True, "After training on the synthetic shapes, caption held-out images and "
                          "report colour/shape accuracy against chance.")
_SAMPLES = flags.DEFINE_bool("samples", True, "Write sample images of config.sample_prompts.")


def _message(e: BaseException) -> str:
  """ml_collections wraps a KeyError (whose str is a repr) in an AttributeError: unwrap to the text."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if e.args else str(e)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a bad --config.KEY override into one clear line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help prints the usage and exits 1: asking for help is not a failure
    if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    print(f"{e}\nPass --help for usage.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"config error: {_message(e)}\n  in the overrides {' '.join(bad) or '(none)'}; the config file "
          "defines the valid keys (see configs/common.py)", file=sys.stderr)
    sys.exit(2)


def _quiet_orbax(record: logging.LogRecord) -> bool:
  """Orbax narrates every save at INFO; keep its warnings only."""
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (options are --flag=value)")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
  try:
    config.keys()  # config_flags loads lazily: surface a missing / broken file here
  except (OSError, SyntaxError, AttributeError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  workdir = _WORKDIR.value or config.get("workdir", "")
  if not workdir:
    raise app.UsageError("--workdir is required (or set config.workdir)")
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_quiet_orbax)

  from cheers_jax import distributed
  distributed.maybe_initialize()
  from cheers_jax.checkpoint.hf import CheckpointError
  from cheers_jax.model.config import ConfigError
  from cheers_jax.train.loop import NonFiniteError, train
  try:
    result = train(config, workdir, export_hf=_EXPORT_HF.value, evaluate=_EVAL.value, samples=_SAMPLES.value)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except CheckpointError as e:  # init_from names weights that do not fit config.model
    print("error: " + "; ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
    return 2
  except NonFiniteError as e:
    print(f"training stopped: {e}", file=sys.stderr)
    return 3
  print(f"{result.status} at step {result.step}; workdir {workdir}", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
