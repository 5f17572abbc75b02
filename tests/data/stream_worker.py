"""One process of the data pipeline's multi-process tests (tests/data/test_processes.py).

  python -m tests.data.stream_worker streams OUT CASES_JSON STEPS
  python -m tests.data.stream_worker die

`streams`: joins jax.distributed through cheers_jax.distributed when CHEERS_COORDINATOR etc. are set
(as `python -m cheers_jax.train` does; without them, one process), builds the training pipeline with
jax.process_index() / jax.process_count() as the train loop does, for each case of CASES_JSON
({name: {data key: value}}), and writes OUT.<process_index>.json: {name: [[row, ...] per step]}, a row
being the sample's text, its t values and a digest of its pixels.
`die`: a pipeline with data.worker_count=2 whose source kills its worker process (SIGKILL, as the
kernel's OOM killer does) at one record; prints `RAISED <type>: <message>` when next() raises.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys

import numpy as np

from configs import tiny


def config(batch_size: int = 4, **data):
  """configs/tiny with the pipeline at 64 px (4 tokens per image), 128-token rows, 2 image slots."""
  c = tiny.get_config()
  c.train.batch_size = batch_size
  c.data.image_size = 64
  c.model.vision.patch_size = 16
  c.data.num_threads = 2
  c.data.seq_buckets = (128,)
  c.data.max_images_per_sample = 2
  c.data.mix = {"und": 3.0, "gen": 6.0, "text": 1.0}
  for k, v in data.items():
    c.data[k] = tuple(v) if isinstance(v, list) else v
  return c


def rows(batch, tokenizer) -> list[str]:
  out = []
  per = batch["pixels"].shape[0] // batch["token_ids"].shape[0]
  for b in range(batch["token_ids"].shape[0]):
    text = tokenizer.decode(batch["token_ids"][b][batch["valid"][b] & (batch["image_index"][b] < 0)])
    slots = slice(b * per, (b + 1) * per)
    digest = hashlib.sha1(np.ascontiguousarray(batch["pixels"][slots]).tobytes()).hexdigest()[:12]
    out.append(f"{text} | t={batch['t'][slots].tolist()} | px={digest}")
  return out


def streams(out: str, cases: dict, steps: int) -> None:
  import jax
  from cheers_jax import distributed
  from cheers_jax.data.pipeline import make_train_iterator
  from cheers_jax.data.tokenizer import CheersTokenizer

  distributed.maybe_initialize()
  tok = CheersTokenizer()
  result = {}
  for name, data in cases.items():
    it = make_train_iterator(config(8, **data), process_index=jax.process_index(), process_count=jax.process_count())
    result[name] = [rows(next(it), tok) for _ in range(steps)]
  with open(f"{out}.{jax.process_index()}.json", "w") as f:
    json.dump(result, f)


class DyingSource:
  """Text records; reading record `die_at` in a process other than the main one kills that process."""

  def __init__(self, size: int, die_at: int) -> None:
    self.size, self.die_at = size, die_at
    self.main_pid = os.getpid()  # pickled into the workers

  def __len__(self) -> int:
    return self.size

  def categories(self) -> np.ndarray:
    return np.full(self.size, 2, np.int8)  # text

  def __getitem__(self, i: int) -> dict:
    if i == self.die_at and os.getpid() != self.main_pid:
      os.kill(os.getpid(), signal.SIGKILL)
    return {
      "id": f"t{i}",
      "messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}],
      "images": [],
      "image_kinds": [],
    }


def die() -> None:
  from cheers_jax.data.pipeline import make_train_iterator

  it = make_train_iterator(
    config(4, worker_count=2, shuffle=False, mix={"und": 1.0, "gen": 1.0, "text": 1.0}),
    source=DyingSource(1000, die_at=40),
  )
  try:
    for _ in range(50):
      next(it)
    print("NO ERROR", flush=True)
  except Exception as e:  # noqa: BLE001 -- the test reads what was raised
    print(f"RAISED {type(e).__name__}: {e}", flush=True)
  alive = multiprocessing.active_children()
  print(f"WORKERS LEFT {len(alive)}", flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "streams":
    streams(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
  else:
    die()
