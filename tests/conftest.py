"""Suite-wide options, so the default suite fits CI's 15-minute budget on 2 cores (README: -n 2).

- `heavy` tests (multi-process / AOT / sweep end-to-end runs, each several compile-bound minutes) run only
  on request: `python -m pytest -q -m heavy tests` (or CHEERS_HEAVY_TESTS=1 for everything).
- Under pytest-xdist (`--dist loadgroup`/`loadfile`) each file is one unit of work, except the files in
  SAME_WORKER, which share compiled programs in-process and so run on one worker; the costliest units
  are queued first (the run ends when its longest unit does).
"""
import os

import pytest

HEAVY_HINT = ("heavy test (compile-bound minutes on a 2-core CPU): run `python -m pytest -m heavy tests` "
              "or set CHEERS_HEAVY_TESTS=1")


# files whose tests compile the same train-step programs (tests/train/common.small_config)
SAME_WORKER = {"tests/train/test_step.py": "train_small_config", "tests/train/test_loop.py": "train_small_config",
               "tests/train/test_cli.py": "train_small_config"}
# the longest units first (minutes, cold cache, 2 cores)
FIRST = ("tests/train/test_sharding.py", "train_small_config", "tests/test_parity.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
  run_heavy = os.environ.get("CHEERS_HEAVY_TESTS") == "1" or "heavy" in (config.getoption("-m") or "")
  skip = pytest.mark.skip(reason=HEAVY_HINT)
  for item in items:
    if "heavy" in item.keywords and not run_heavy:
      item.add_marker(skip)
    path = item.nodeid.split("::")[0]
    item.add_marker(pytest.mark.xdist_group(SAME_WORKER.get(path, path)))

  def rank(item):
    group = SAME_WORKER.get(item.nodeid.split("::")[0], item.nodeid.split("::")[0])
    return FIRST.index(group) if group in FIRST else len(FIRST)

  items.sort(key=rank)  # stable: file order is kept within a rank
