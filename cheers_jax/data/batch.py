"""The batch contract: the arrays one training batch holds, and where its images sit.

Built by the pipeline (`pipeline.collate`, `packing.collate_packed`), the synthetic measuring batches
(`train.synthetic`) and the test fakes, all through `from_assembled`; consumed by the train step.

A row holds one sample, or several with packing (`cheers_jax.data.packing`, data.packing=True): each
sample is its own segment, with its own positions from 0, attention within itself only, and its own
targets, images, t and weights.

Arrays (numpy; B rows, S = sequence bucket, K = image slots per row, M = B * K slots,
N = (image_size / 32)^2 tokens per image, H = W = image_size):
  token_ids        int32 (B, S)    text ids; 0 at image and padding positions
  image_index      int32 (B, S)    m*N + j at token j of the image in slot m, -1 elsewhere (real slots only)
  image_mask       int32 (B, S)    1 on placeholder images (bidirectional blocks), 0 elsewhere
  positions        int32 (B, S)    0.. per sample (restarting at each segment); 0..S-1 on padding
  segment_ids      int32 (B, S)    1, 2, ... = the row's samples in order; 0 on padding
  targets          int32 (B, S)    next-token target of each position (shifted, <im_start>/<im_end>
                                   re-labelled as the reference); -100 = no loss
  valid            bool  (B, S)    real tokens (right padding is False)
  pixels           uint8 (M, H, W, 3)  NHWC, as decoded (0..255; the model divides by 255 on the device,
                                   `model.cheers.unit_pixels`: a quarter of float32's bytes to move);
                                   black for the text-only dummy and padding
  t                float32 (M,)    1.0 understand, U(0,1) generate, 0.0 text-only dummy, 1.0 padding
  image_kind       int32 (M,)      0 prepended dummy / 1 und / 2 gen (sequence.KIND_*); 0 for padding
  image_weight     float32 (M,)    1 real image, 0 padding slot
  image_positions  int32 (M, N)    flat b*S + s positions of each image's tokens; padding slots: b*S
  num_skipped      int32 ()        samples skipped so far by this process (host only, not sent to devices)
Optional: x0 float32 (M, h, w, C), pre-drawn flow-matching noise (parity tests).

Slot placement: slots come in per-row blocks of K: slot m = b*K + i holds the i-th image of row b
(in order: sample by sample, each in placeholder order; a text-only sample's dummy is its image 0), so
slot m belongs to row m // K and a row's images stay with it under data sharding and micro-batching.
Unused slots are padding and no image_index refers to them. A batch is indexed locally: positions and
slots count from its first row.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cheers_jax.model.sequence import AssembledBatch
from cheers_jax.tokens import IGNORE_INDEX

# The leading axis is the batch (B) for ROW_KEYS and the image slots (M) for IMAGE_KEYS.
ROW_KEYS = ("token_ids", "image_index", "image_mask", "positions", "segment_ids", "targets", "valid")
IMAGE_KEYS = ("pixels", "t", "image_kind", "image_weight", "image_positions")
OPTIONAL_KEYS = ("x0",)
HOST_ONLY_KEYS = ("num_skipped",)  # pipeline counters, summed on the host by the loop
DTYPES = {
  **{k: np.dtype(np.int32) for k in ROW_KEYS},
  "valid": np.dtype(bool),
  "pixels": np.dtype(np.uint8),
  "t": np.dtype(np.float32),
  "image_kind": np.dtype(np.int32),
  "image_weight": np.dtype(np.float32),
  "image_positions": np.dtype(np.int32),
  "num_skipped": np.dtype(np.int32),
}


def shapes(
  batch_size: int, seq_len: int, slots_per_row: int, tokens_per_image: int, image_size: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every array the step consumes (ROW_KEYS + IMAGE_KEYS), without building one."""
  b, s, m, n, hw = batch_size, seq_len, batch_size * slots_per_row, tokens_per_image, image_size
  shape = {
    **{k: (b, s) for k in ROW_KEYS},
    "pixels": (m, hw, hw, 3),
    "t": (m,),
    "image_kind": (m,),
    "image_weight": (m,),
    "image_positions": (m, n),
  }
  return {k: (v, DTYPES[k]) for k, v in shape.items()}


def pad_samples(
  ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-sample ids and labels -> right-padded int64 (ids, labels, attention_mask), padded as the
  reference collator does: ids with 0, labels with -100, mask 0; ready for `sequence.assemble`."""
  b, width = len(ids), max(len(x) for x in ids)
  out_ids = np.zeros((b, width), np.int64)
  out_labels = np.full((b, width), IGNORE_INDEX, np.int64)
  mask = np.zeros((b, width), np.int64)
  for i, (x, y) in enumerate(zip(ids, labels)):
    out_ids[i, : len(x)], out_labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
  return out_ids, out_labels, mask


def image_slots(assembled: AssembledBatch, slots_per_row: int) -> np.ndarray:
  """The slot of each assembled image: image k, the i-th of row b (in image order), goes to slot b*K + i."""
  rows = assembled.image_row.astype(np.int64)
  order = np.argsort(rows, kind="stable")
  rank = np.empty(len(rows), np.int64)
  rank[order] = np.arange(len(rows)) - np.searchsorted(rows[order], rows[order], side="left")
  if len(rows) and rank.max() >= slots_per_row:
    raise AssertionError(f"a row has more than {slots_per_row} images (image slots per row)")
  return rows * slots_per_row + rank


def from_samples(
  assembled: AssembledBatch,
  samples: Sequence[Mapping[str, Any]],
  tokens_per_image: int,
  slots_per_row: int,
  num_skipped: int = 0,
) -> dict[str, Any]:
  """`from_assembled` with the images of the assembled prepared samples (the pipeline's: pixels, t and
  image_kind of each, in the samples' order, which must be the assembly's)."""
  kinds = np.concatenate([x["image_kind"] for x in samples])
  if not np.array_equal(kinds, assembled.image_kind):
    raise AssertionError(f"image order mismatch: samples {kinds}, assembled {assembled.image_kind}")
  return from_assembled(
    assembled,
    tokens_per_image,
    slots_per_row,
    np.concatenate([x["pixels"] for x in samples]),
    np.concatenate([x["t"] for x in samples]),
    num_skipped,
  )


def from_assembled(
  assembled: AssembledBatch,
  tokens_per_image: int,
  slots_per_row: int,
  pixels: np.ndarray,
  t: np.ndarray,
  num_skipped: int = 0,
) -> dict[str, Any]:
  """The contract's batch from `sequence.assemble`'s output and each image's uint8 pixels (n, H, W, 3)
  and t (n,), in assembly order (images across the batch, in order)."""
  if np.asarray(pixels).dtype != np.uint8:
    raise TypeError(f"pixels must be uint8 (the images as decoded), got {np.asarray(pixels).dtype}")
  n_tok, per = tokens_per_image, slots_per_row
  b, s = assembled.token_ids.shape
  m, hw = b * per, pixels.shape[1]
  slot = image_slots(assembled, per)
  idx = assembled.image_index
  image_index = np.where(idx >= 0, slot[idx // n_tok] * n_tok + idx % n_tok, -1)
  placed_pixels = np.zeros((m, hw, hw, 3), np.uint8)
  placed_pixels[slot] = pixels
  placed_t = np.ones((m,), np.float32)
  placed_t[slot] = t
  image_kind = np.zeros((m,), np.int32)
  image_kind[slot] = assembled.image_kind
  image_weight = np.zeros((m,), np.float32)
  image_weight[slot] = 1.0
  # Padding slots point at their own row's first position (always valid; weight 0 ignores it).
  image_positions = np.repeat((np.arange(m) // per * s)[:, None], n_tok, axis=1).astype(np.int32)
  image_positions[slot] = assembled.image_positions(n_tok)
  return {
    "token_ids": assembled.token_ids.astype(np.int32),
    "image_index": image_index.astype(np.int32),
    "image_mask": assembled.image_mask.astype(np.int32),
    "positions": assembled.positions.astype(np.int32),
    "segment_ids": assembled.segment_ids.astype(np.int32),
    "targets": assembled.targets.astype(np.int32),
    "valid": assembled.valid.astype(bool),
    "pixels": placed_pixels,
    "t": placed_t,
    "image_kind": image_kind,
    "image_weight": image_weight,
    "image_positions": image_positions,
    "num_skipped": np.asarray(num_skipped, np.int32),
  }
