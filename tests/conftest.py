"""Suite-wide options, so the default suite fits CI's 15-minute budget on 2 cores (README: -n 2).

- `heavy` tests (multi-process / AOT / sweep end-to-end runs, each several compile-bound minutes) run only
  on request: `python -m pytest -q -m heavy tests` (or CHEERS_HEAVY_TESTS=1 for everything).
- The costliest tests are queued first (a parallel run ends when its longest test does). Tests are
  handed to the xdist workers one by one; programs compiled by one worker reach the other through the
  persistent compilation cache (tests/train/conftest.py).
"""

import os

import pytest

# The suite is CPU-only by design (tiny configs, fake devices). Pin it, so that an environment with the
# aot extra (libtpu, the CUDA plugin: requirements-aot.txt, installed by CI for the heavy set) does not
# make jax probe for a TPU or GPU. JAX_PLATFORMS=cuda python -m pytest ... still chooses otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

HEAVY_HINT = (
  "heavy test (compile-bound minutes on a 2-core CPU): run `python -m pytest -m heavy tests` "
  "or set CHEERS_HEAVY_TESTS=1"
)


# the longest tests' files first (minutes, cold cache, 2 cores)
FIRST = ("tests/train/test_sharding.py", "tests/test_parity.py")


def pytest_collection_modifyitems(config, items):
  run_heavy = os.environ.get("CHEERS_HEAVY_TESTS") == "1" or "heavy" in (config.getoption("-m") or "")
  skip = pytest.mark.skip(reason=HEAVY_HINT)
  for item in items:
    if "heavy" in item.keywords and not run_heavy:
      item.add_marker(skip)

  def rank(item):
    path = item.nodeid.split("::")[0]
    return FIRST.index(path) if path in FIRST else len(FIRST)

  items.sort(key=rank)  # stable: file order is kept within a rank
