"""The error contract shared by the library and every command-line tool.

A `UserError` is a mistake the user can fix (a bad file, config, argument or datum); its message says
what to do. Every CLI prints it as one line `error: ...` and exits with status 2 (`cheers_jax.cli`).
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(ValueError):
  """A mistake the user can fix; the message says what to change."""


class ConfigError(UserError):
  """A config value or key is wrong (the message names it and the fix)."""


def unknown_key(where: str, key: str, valid: Iterable[str], noun: str = "config key") -> str:
  """The one 'unknown key' message: `where` names the key in full (e.g. 'train.stepz'), `key` is its
  last part, matched against `valid`; the hint is the closest valid key, else the list of them."""
  valid = sorted(valid)
  close = difflib.get_close_matches(key, valid, n=1)
  hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
  return f"unknown {noun} '{where}'{hint}"
