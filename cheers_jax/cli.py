"""The error contract of every `python -m cheers_jax.X` tool.

- A user's mistake (`cheers_jax.errors.UserError`: bad arguments, config, files or data; a missing
  file) prints ONE line `error: ...` that says what to do, and exits with status 2. `--debug` shows
  its traceback instead.
- Anything else is a bug: its traceback is printed as Python does.
- Output folders that already hold results are never overwritten silently (`check_output_dir`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from cheers_jax import config as config_lib
from cheers_jax.errors import UserError

USAGE_ERROR = 2
# Files the user named that cannot be opened are their mistake too.
USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are user errors (one line, exit 2) instead of usage + exit; the description
  (a tool's docstring) is printed as written."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    raise UserError(f"{message} (see {self.prog} --help)")


def one_line(message: str) -> str:
  return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run(
  main: Callable[[list[str]], Optional[int]], argv: Optional[Sequence[str]] = None, debug: Optional[bool] = None
) -> int:
  """Calls `main(argv)` under the contract and returns its exit status. `--debug` in argv (or
  debug=True, for tools whose flag parser owns it) re-raises a user error with its traceback."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if debug is None:
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
  try:
    return int(main(argv) or 0)
  except (UserError,) + USER_OS_ERRORS as e:
    if debug:
      raise
    text = str(e) if isinstance(e, UserError) or not e.filename else f"{e.strerror or e}: {e.filename}"
    print(f"error: {one_line(text)}", file=sys.stderr, flush=True)
    return USAGE_ERROR


# ---- shared flag groups ---------------------------------------------------------------------------
CONFIG_HELP = (
  "a shipped config name (tiny, cheers_1p5b) or a config file (FILE.py[:ARG]); override any value "
  "with --config.KEY=VALUE (repeatable; the key must exist, the value takes its type)"
)


def add_config_flags(group, *, default: Optional[str] = None, required: bool = False) -> None:
  """--config NAME|FILE.py[:ARG]; its --config.KEY=VALUE overrides are set aside by `parse_config_args`."""
  group.add_argument(
    "--config",
    default=default,
    required=required,
    metavar="NAME|FILE.py[:ARG]",
    help=CONFIG_HELP + (f" (default: {default})" if default else ""),
  )


def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(args, overrides): argv parsed by `parser`, its --config.KEY=VALUE overrides set aside for config.load."""
  rest, overrides = config_lib.split_overrides(argv)
  return parser.parse_args(rest), overrides


def add_init_flag(p: argparse.ArgumentParser) -> None:
  """--init: how the measuring tools (bench train, sweep) build the train state."""
  p.add_argument(
    "--init",
    choices=("synthetic", "config"),
    default="synthetic",
    help="synthetic: cheap pseudo-random state (default); config: the real init_train_state",
  )


def add_batch_shape_flags(
  parser: argparse.ArgumentParser,
  *,
  seq_len_default: Optional[int] = None,
  seq_len_help: str = "the config's smallest data.seq_buckets",
) -> None:
  """The synthetic batch of the measuring tools (train.synthetic.BatchOptions.from_args)."""
  g = parser.add_argument_group("batch shape (a synthetic batch as the reference timing's)")
  g.add_argument(
    "--seq-len", type=POSITIVE_INT, default=seq_len_default, help=f"static sequence length (default: {seq_len_help})"
  )
  g.add_argument(
    "--text-len",
    type=NON_NEGATIVE_INT,
    help="random text tokens per sample (default 120, the "
    "reference's 400-token samples at 512x512, or what fits --seq-len)",
  )
  g.add_argument(
    "--gen-fraction",
    type=number(float, minimum=0, maximum=1),
    default=0.5,
    help="share of generation samples (default 0.5)",
  )
  g.add_argument(
    "--image-slots",
    type=POSITIVE_INT,
    default=1,
    help="image slots per sample (default 1; a pipeline config uses data.max_images_per_sample)",
  )
  g.add_argument(
    "--mix",
    action="store_true",
    help="samples of the realistic length mix instead, padded to the "
    "config's bucket of the longest, or packed with --config.data.packing=True",
  )


def add_model_source_flags(group, dtype_help: str = "") -> None:
  """--checkpoint / --orbax / --run (exactly one: `cheers_jax.infer.loader.load_model`) and --dtype."""
  group.add_argument("--checkpoint", help="Hugging Face checkpoint directory (config.json + safetensors)")
  group.add_argument("--orbax", help="Orbax export directory written by `cheers_jax.convert hf-to-orbax`")
  group.add_argument("--run", help="training workdir of `cheers_jax.train` (its latest checkpoint)")
  group.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    help="compute and parameter dtype (default: "
    "float32 on CPU, bfloat16 on GPU/TPU" + (f"; {dtype_help})" if dtype_help else ")"),
  )


def comma_list(text: str, flag: str, cast: Callable = str) -> list:
  """'1,2, 8' -> [1, 2, 8] (cast each item); a bad item is a user error naming `flag`."""
  try:
    items = [cast(x.strip()) for x in str(text).split(",") if x.strip()]
  except ValueError:
    raise UserError(f"{flag} {text!r}: give a comma-separated list, e.g. {'1,8' if cast is int else 'a,b'}") from None
  if not items:
    raise UserError(f"{flag} {text!r}: give at least one value")
  return items


# ---- numeric flags: argparse `type=` functions. A bad value (NaN, inf, out of range) is rejected where
# the argument is parsed, as "argument --flag: ..." (one line, exit 2), before anything slow starts.
def number(
  cast: Callable = float,
  *,
  minimum: Optional[float] = None,
  above: Optional[float] = None,
  maximum: Optional[float] = None,
  hint: str = "",
) -> Callable[[str], float]:
  """A parser of one finite number of type `cast` with value >= minimum, > above and <= maximum."""

  def parse(text: str):
    try:
      value = cast(text)
    except (TypeError, ValueError):
      raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if cast is int else 'a number'}") from None
    bounds = (
      ([f">= {minimum:g}"] if minimum is not None else [])
      + ([f"> {above:g}"] if above is not None else [])
      + ([f"<= {maximum:g}"] if maximum is not None else [])
    )
    ok = (
      math.isfinite(value)
      and (minimum is None or value >= minimum)
      and (above is None or value > above)
      and (maximum is None or value <= maximum)
    )
    if not ok:
      kind = "an integer" if cast is int else "a finite number"
      wanted = f"{kind} {' and '.join(bounds)}" if bounds else kind
      raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}{f' ({hint})' if hint else ''}")
    return value

  parse.__name__ = cast.__name__  # argparse names the type in some messages
  return parse


FINITE = number(float)
POSITIVE = number(float, above=0)
NON_NEGATIVE = number(float, minimum=0)
POSITIVE_INT = number(int, minimum=1)
NON_NEGATIVE_INT = number(int, minimum=0)


def check_output_dir(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
  """A folder for results: refused when it already holds files, unless `overwrite`."""
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f"output folder {path} is a file; give a folder")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise UserError(f"output folder {path} is not empty; choose another one or pass {flag} to replace its files")
  return path


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
  path = Path(path)
  if path.exists() and not overwrite:
    raise UserError(f"output file {path} exists; choose another name or pass {flag} to replace it")
  return path
