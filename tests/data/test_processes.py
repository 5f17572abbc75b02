"""The data pipeline across processes: 2 jax.distributed processes split the 1-process stream exactly
(JSONL, shards, mixed sources); resume with grain worker processes; a dying worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cheers_jax.bench.data import write_dataset
from cheers_jax.data import prepare as prepare_lib
from cheers_jax.data.pipeline import make_train_iterator
from tests.data.stream_worker import config
from tests.scale.common import REPO, env, free_port

STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, dict]:
  """Cases {name: data config}: one JSONL, its prepared shards, and a JSONL + shards of other records."""
  tmp = tmp_path_factory.mktemp("streams")
  sizes = ((48, 64), (80, 60), (64, 64))
  a = write_dataset(str(tmp / "a"), 120, image_sizes=sizes)
  b = write_dataset(str(tmp / "b"), 120, image_sizes=sizes, start=5000)
  for jsonl, folder in ((a, tmp / "a"), (b, tmp / "b")):
    prepare_lib.prepare(
      [jsonl], [str(folder / "images")], str(folder / "shards"), records_per_shard=50, log=lambda *_: None
    )
  return {
    "jsonl": {"source": "jsonl", "jsonl_path": a, "image_root": str(tmp / "a" / "images")},
    "shards": {"sources": [str(tmp / "a" / "shards")]},
    "mixed": {
      "sources": [
        {"path": a, "weight": 1.0, "image_root": str(tmp / "a" / "images")},
        {"path": str(tmp / "b" / "shards"), "weight": 2.0},
      ]
    },
  }


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("runs")
  args = lambda prefix: [
    sys.executable,
    "-m",
    "tests.data.stream_worker",
    "streams",
    str(tmp / prefix),
    json.dumps(data),
    str(STEPS),
  ]
  single = subprocess.run(args("single"), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  procs = [
    subprocess.Popen(
      args("multi"),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env(CHEERS_COORDINATOR=f"localhost:{port}", CHEERS_NUM_PROCESSES="2", CHEERS_PROCESS_ID=str(pid)),
    )
    for pid in range(2)
  ]
  errors = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("the 2-process run did not finish in 600 s")
    errors.append(err)
  assert not any(p.returncode for p in procs), "\n".join(e[-2000:] for e in errors)
  load = lambda name: json.loads((tmp / name).read_text())
  return load("single.0.json"), [load(f"multi.{pid}.json") for pid in range(2)]


@pytest.mark.parametrize("case", ["jsonl", "shards", "mixed"])
def test_two_processes_split_the_one_process_stream_exactly(runs, case):
  """Step by step, the two processes' samples (text, t, pixels) are disjoint and together are the
  1-process batch with the same seed."""
  single, multi = runs
  for step in range(STEPS):
    whole, halves = single[case][step], [m[case][step] for m in multi]
    assert len(whole) == 8 and [len(h) for h in halves] == [4, 4]
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == sorted(whole)
  if case == "mixed":  # both sources are drawn
    texts = " ".join(row for step in single[case] for row in step)
    assert any(f"number {i}." in texts or f"picture {i}." in texts or f"field {i}." in texts for i in range(5000, 5120))
    assert any(f"number {i}." in texts or f"picture {i}." in texts or f"field {i}." in texts for i in range(120))


def test_resume_with_worker_processes_is_exact(data):
  c = config(8, worker_count=2, cfg_data_rate=0.3, **data["mixed"])
  it = make_train_iterator(c)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  resumed = make_train_iterator(c)
  resumed.set_state(state)
  for w in want:
    g = next(resumed)
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_a_dying_worker_is_a_clear_error_not_a_hang(tmp_path: Path):
  out = tmp_path / "out.txt"
  with open(out, "w") as f:  # a file, not a pipe: a stray process holding it cannot stall the test
    subprocess.run(
      [sys.executable, "-m", "tests.data.stream_worker", "die"],
      cwd=REPO,
      env=env(),
      stdout=f,
      stderr=subprocess.STDOUT,
      timeout=300,
    )
  text = out.read_text()
  line = [x for x in text.splitlines() if x.startswith(("RAISED", "NO ERROR"))]
  assert line, text[-2000:]
  assert line[0].startswith("RAISED DataWorkerError") and "data.worker_count" in line[0], line[0]
  assert "exit code -9" in line[0] or "signal" in line[0], line[0]
  assert "WORKERS LEFT 0" in text  # the error stopped the surviving worker too
