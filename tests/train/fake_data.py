"""Deterministic fake batches in the batch contract (cheers_jax.data.batch), without the data pipeline.

Every batch is a pure function of (seed, batch index), so an iterator's state is just the index:
`FakeIterator` mirrors grain's get_state()/set_state() and resumes exactly.
"""

from __future__ import annotations

import json

import numpy as np

from cheers_jax.data import batch as batch_lib
from cheers_jax.model.sequence import assemble
from cheers_jax.tokens import (
  ASSISTANT_ID,
  CHAT_END_ID,
  CHAT_START_ID,
  IGNORE_INDEX,
  IM_END_ID,
  IM_START_ID,
  IMAGE_GEN_TOKEN_INDEX,
  IMAGE_TOKEN_INDEX,
  NEWLINE_ID,
  USER_ID,
)

IM_S, IM_E, NL = CHAT_START_ID, CHAT_END_ID, NEWLINE_ID


def _sample(rng: np.random.Generator, kind: str, text_len: int) -> tuple[list[int], list[int], float]:
  """ids, labels, t of one chat-formatted sample ('und' | 'gen' | 'text')."""
  words = [int(x) for x in rng.integers(100, 400, text_len)]
  user = [IM_S, USER_ID, NL]
  asst = [IM_S, ASSISTANT_ID, NL]
  if kind == "und":
    ids = user + [IM_START_ID, IMAGE_TOKEN_INDEX, IM_END_ID, IM_E, NL] + asst + words + [IM_E, NL]
    t = 1.0
  elif kind == "gen":
    ids = user + words + [IM_E, NL] + asst + [IM_START_ID, IMAGE_GEN_TOKEN_INDEX, IM_END_ID, IM_E, NL]
    t = float(np.clip(rng.uniform(), 1e-6, 1 - 1e-6))
  else:
    ids = user + words[: text_len // 2] + [IM_E, NL] + asst + words[text_len // 2 :] + [IM_E, NL]
    t = 0.0
  # labels: assistant turn + the structural ids in every turn (rae_qwen)
  start = len(ids) - ids[::-1].index(ASSISTANT_ID) - 2
  labels = [
    x if (i >= start or x in (NL, IM_S, IM_E, IM_START_ID, IM_END_ID)) and x > 0 else IGNORE_INDEX
    for i, x in enumerate(ids)
  ]
  return ids, labels, t


def make_batch(
  seed: int,
  index: int,
  batch_size: int,
  seq_len: int,
  image_size: int,
  tokens_per_image: int,
  kinds=("und", "gen"),
  text_len: int = 6,
) -> dict:
  rng = np.random.default_rng([seed, index])
  samples = [_sample(rng, kinds[(index * batch_size + b) % len(kinds)], text_len) for b in range(batch_size)]
  ids, labels, att = batch_lib.pad_samples([s[0] for s in samples], [s[1] for s in samples])
  layout = assemble(ids, tokens_per_image, attention_mask=att, labels=labels, seq_len=seq_len, check_fm_positions=True)
  m = layout.num_images
  pixels = rng.integers(0, 256, (m, image_size, image_size, 3), np.uint8)
  kinds_ = layout.image_kind
  pixels[kinds_ == 0] = 0  # text-only samples carry a black dummy image
  t = np.array([samples[s][2] for s in layout.image_sample], np.float32)
  # one image per sample (the text-only dummy included): one slot each
  return batch_lib.from_assembled(layout, tokens_per_image, 1, pixels, t)


class FakeIterator:
  """Infinite iterator of `make_batch` with grain-like JSON state."""

  def __init__(self, seed: int, batch_size: int, seq_len: int, image_size: int, tokens_per_image: int, **kw):
    self.args = (seed, batch_size, seq_len, image_size, tokens_per_image)
    self.kw = kw
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    seed, b, s, size, n = self.args
    batch = make_batch(seed, self.index, b, s, size, n, **self.kw)
    self.index += 1
    return batch

  def get_state(self) -> bytes:
    return json.dumps({"index": self.index}).encode()

  def set_state(self, state: bytes) -> None:
    self.index = int(json.loads(state)["index"])
