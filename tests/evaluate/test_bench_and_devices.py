"""`python -m cheers_jax.bench evaluate` figures, and understanding data parallel over 2 fake CPU devices
(same answers as one device). Heavy: each compiles the tiny model's programs again (~1 min on 2 cores)."""

import json
import subprocess
import sys

import pytest

from tests.infer.conftest import TINY
from tests.scale.common import env

pytestmark = [pytest.mark.heavy]


def test_bench_evaluate_prints_rows_per_second(capsys):
  from cheers_jax.bench.evaluate import main

  assert (
    main(
      [
        "--checkpoint",
        str(TINY),
        "--dtype",
        "float32",
        "--rows",
        "4",
        "--batch-size",
        "4",
        "--answer-tokens",
        "2",
        "--prompts",
        "1",
        "--steps",
        "2",
        "--gen-batch-size",
        "4",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  result = json.loads(out.strip().splitlines()[-1][len("RESULT ") :])
  one = result["per_device_count"]["1"]
  assert one["rows_per_s"] > 0 and one["geneval_s_per_prompt"] > 0 and one["images_per_s"] > 0
  assert "1 device(s): understanding" in out and "rows/s" in out and "images/s" in out


SCRIPT = """
import sys, json
sys.path.insert(0, {repo!r})
from tests.evaluate.test_understanding import _mmbench
from pathlib import Path
from cheers_jax.evaluate.parallel import current_workers
from cheers_jax.evaluate.understanding import run_understanding
from cheers_jax.infer.loader import load_model
data = _mmbench(Path({tmp!r}))
model, variables = load_model({tiny!r}, dtype="float32")
s = run_understanding(model, variables, str(data), "MMBench_DEV_EN_V11", {out!r}, batch_size=2, max_new_tokens=4,
                      workers=current_workers(), progress=False)
"""


def test_data_parallel_matches_one_device(tmp_path):
  import pandas as pd
  from tests.scale.common import REPO

  outs = []
  for devices in (1, 2):
    out = str(tmp_path / f"d{devices}")
    code = SCRIPT.format(repo=REPO, tmp=str(tmp_path), tiny=str(TINY), out=out)
    proc = subprocess.run([sys.executable, "-c", code], env=env(devices), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"1 process(es) x {devices} device(s)" in proc.stderr
    outs.append(pd.read_csv(f"{out}/MMBench_DEV_EN_V11.tsv", sep="\t", dtype=str, keep_default_na=False))
  assert list(outs[0]["raw"]) == list(outs[1]["raw"])
