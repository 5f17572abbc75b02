"""python -m cheers_jax.bench SUBCOMMAND [options]

Each subcommand is the module cheers_jax/bench/SUBCOMMAND.py with a `main(argv) -> int`; adding a file
adds a subcommand.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Optional, Sequence

import cheers_jax.bench as _pkg


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__) if not m.name.startswith("_"))


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  names = available()
  if not argv or argv[0] in ("-h", "--help"):
    print(
      f"usage: python -m cheers_jax.bench {{{','.join(names)}}} [options]\n\n"
      "subcommands:\n" + "\n".join(f"  {n:<10} python -m cheers_jax.bench {n} --help" for n in names)
    )
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in names:
    print(f"error: unknown benchmark '{name}'; choose from {', '.join(names)}", file=sys.stderr)
    return 2
  return int(importlib.import_module(f"cheers_jax.bench.{name}").main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
