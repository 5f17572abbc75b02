"""Evaluation over many devices and processes yields the files of one device: `evaluate suite` (MMBench
rows with a broken image, GenEval and DPG prompts) run three ways through the real CLI: 1 CPU device, 8
fake CPU devices in one process, and 2 jax.distributed processes (as `train` starts them, CHEERS_*
environment) of 1 device each sharing the output folder (bit-identical images: the same one-device
program), and a run interrupted with one device resumed with 8. Heavy: every run compiles the tiny
model's programs (several minutes on 2 cores)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.evaluate.test_understanding import _mmbench
from tests.infer.conftest import TINY
from tests.scale.common import REPO, env, free_port

pytestmark = [pytest.mark.heavy]


def _inputs(root: Path) -> Path:
  lmu = root / "LMUData"
  lmu.mkdir()
  _mmbench(lmu)
  (lmu / "geneval").mkdir()
  (lmu / "geneval" / "evaluation_metadata.jsonl").write_text(
    "\n".join(json.dumps({"prompt": p}) for p in ["a cow", "a photo of a red car", "two cats on a sofa"])
  )
  (lmu / "dpg_bench" / "prompts").mkdir(parents=True)
  for name, text in (("1", "A red cube."), ("2", "A long prompt about a small wooden house by a lake at dawn.")):
    (lmu / "dpg_bench" / "prompts" / f"{name}.txt").write_text(text)
  return lmu


def _args(lmu: Path, out: Path) -> list[str]:
  return [
    "-m",
    "cheers_jax.evaluate",
    "suite",
    "--checkpoint",
    str(TINY),
    "--dtype",
    "float32",
    "--lmudata",
    str(lmu),
    "--out",
    str(out),
    "--max-new-tokens",
    "3",
    "--batch-size",
    "2",
    "--gen-batch-size",
    "2",
    "--geneval-steps",
    "2",
    "--dpg-steps",
    "2",
    "--no-progress",
  ]


def _run(lmu, out, devices=None, processes=1, timeout=1500):
  if processes == 1:
    proc = subprocess.run(
      [sys.executable, *_args(lmu, out)], cwd=REPO, env=env(devices), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr
  port = free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, *_args(lmu, out)],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env(
        None,
        cache=False,
        CHEERS_COORDINATOR=f"localhost:{port}",
        CHEERS_NUM_PROCESSES=str(processes),
        CHEERS_PROCESS_ID=str(pid),
      ),
    )
    for pid in range(processes)
  ]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-2000:] for o in outs)
  return outs[0][1]


def _files(out: Path) -> dict:
  got = {}
  for p in sorted(out.rglob("*")):
    if p.is_file() and p.name not in ("summary.md", "summary.json"):
      rel = str(p.relative_to(out))
      if p.suffix == ".png":
        got[rel] = np.asarray(Image.open(p)).tobytes()
      elif p.suffix == ".tsv":
        got[rel] = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False).to_dict("list")
      else:
        got[rel] = p.read_bytes()
  return got


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  root = tmp_path_factory.mktemp("par")
  lmu = _inputs(root)
  out = root / "d1"
  log = _run(lmu, out, devices=1)
  assert "1 process(es) x 1 device(s)" in log
  return root, lmu, _files(out)


def _check_same(files, want, exact_images=True):
  """The same files; the answers and scores equal. Images: equal, or with another local device count
  (XLA:CPU's fake devices compile the one-device program a little differently per count, see
  docs/evaluation.md) within one level on a few pixels."""
  assert sorted(files) == sorted(want)
  assert len([f for f in want if f.endswith(".png")]) == 12 and "dpg/1.jpg" in want and "dpg/2.jpg" in want
  for name in want:
    if exact_images or not name.endswith((".png", ".jpg")):
      assert files[name] == want[name], name
    elif name.endswith(".png"):
      a, b = (np.frombuffer(x, np.uint8).astype(int) for x in (files[name], want[name]))
      assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.01, name


def test_eight_devices_give_the_files_of_one(one_device):
  root, lmu, want = one_device
  out = root / "d8"
  log = _run(lmu, out, devices=8)
  assert "1 process(es) x 8 device(s)" in log
  _check_same(_files(out), want, exact_images=False)


def test_two_processes_give_the_files_of_one(one_device):
  root, lmu, want = one_device
  out = root / "p2"
  log = _run(lmu, out, processes=2)
  assert "2 process(es) x 1 device(s)" in log
  _check_same(_files(out), want)
  assert not (out / "understanding" / ".parts").exists() and not (out / "dpg" / ".dpg_tiles").exists()


def test_a_run_resumed_with_other_devices_keeps_what_is_done(one_device):
  root, lmu, want = one_device
  out = root / "resume"
  shutil.copytree(root / "d1", out)
  (out / "geneval" / "00001" / "samples" / "00002.png").unlink()
  (out / "dpg" / "2.jpg").unlink()
  tsv = out / "understanding" / "MMBench_DEV_EN_V11.tsv"
  frame = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
  frame.loc[1, "status"] = "pending"
  frame.to_csv(tsv, sep="\t", index=False)
  log = _run(lmu, out, devices=8)
  assert "2 already answered" in log and "1 to generate" in log and "1 grids to generate" in log
  _check_same(_files(out), want, exact_images=False)
