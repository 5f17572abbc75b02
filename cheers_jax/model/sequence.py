"""Host-side sequence assembly (numpy): placeholders -> image token slots, labels, targets.

This is the reference's `prepare_inputs_labels_for_multimodal` plus the label rebuild of
`Cheers.forward`, done once on the host so the jitted model only gathers: every output is a
static-shape integer array.

Rules (the reference's sequence assembly and training loss):
- tokens with attention_mask 0 are dropped; each -200 / -300 placeholder becomes the next image's N
  tokens (images are consumed in order across the batch); image tokens are bidirectional within
  their block (image_mask 1);
- a sample without a placeholder gets its image's N tokens PREPENDED with image_mask 0 (causal);
- sequences are truncated to `max_seq_len`, re-padded on the right; positions are 0..S-1; row b holds
  sample b (segment id 1 on its tokens, 0 on padding; `cheers_jax.data.packing` puts several samples
  in a row, each its own segment with positions restarting at 0);
- targets: labels shifted left by one, then per sample IM_START -> [IM_START, -100], IM_END dropped,
  -200/-300 -> -100. So the token before <im_start> predicts it, <im_start> and the image tokens
  predict nothing, <im_end> is never a target and the <im_end> position predicts the next token.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from cheers_jax.errors import UserError
from cheers_jax.tokens import IGNORE_INDEX, IM_END_ID, IM_START_ID, IMAGE_GEN_TOKEN_INDEX, IMAGE_TOKEN_INDEX

KIND_PREPENDED, KIND_UND, KIND_GEN = 0, 1, 2


class SequenceError(UserError):
  """A sample cannot be assembled as the reference would (the message says why and what to do)."""


@dataclasses.dataclass
class AssembledBatch:
  """Static-shape description of an assembled batch (all numpy, int32 unless noted)."""

  token_ids: np.ndarray  # (B, S) text ids, 0 at image and pad positions
  image_index: np.ndarray  # (B, S) k*N + j for token j of image k, -1 elsewhere
  image_mask: np.ndarray  # (B, S) 1 on placeholder images (bidirectional blocks), 0 elsewhere
  valid: np.ndarray  # (B, S) bool
  positions: np.ndarray  # (B, S) 0..S-1
  labels: np.ndarray  # (B, S) expanded, unshifted labels (image tokens -200/-300)
  targets: np.ndarray  # (B, S) next-token target of each position after the rebuild; -100 = none
  image_kind: np.ndarray  # (n_img,) KIND_PREPENDED / KIND_UND / KIND_GEN
  image_sample: np.ndarray  # (n_img,) sample each image belongs to
  image_start: np.ndarray  # (n_img,) position of the image's first token in its row
  segment_ids: np.ndarray  # (B, S) 1.. = the row's samples in order, 0 on padding
  image_row: np.ndarray  # (n_img,) row each image lies in (= image_sample: one sample per row)

  @property
  def num_images(self) -> int:
    return len(self.image_kind)

  def image_positions(self, tokens_per_image: int) -> np.ndarray:
    """(n_img, N) flat positions b*S + s of every image token, in image order."""
    s = self.token_ids.shape[1]
    return (self.image_row[:, None] * s + self.image_start[:, None] + np.arange(tokens_per_image)[None]).astype(
      np.int32
    )


def rebuild_targets(labels: np.ndarray) -> np.ndarray:
  """Shifted, re-labelled targets for one sample (length preserved; see module docstring)."""
  n = len(labels)
  shifted = labels[1:]
  counts = 1 + (shifted == IM_START_ID).astype(np.int64) - (shifted == IM_END_ID).astype(np.int64)
  offsets = np.cumsum(counts) - counts
  values = np.where((shifted == IMAGE_TOKEN_INDEX) | (shifted == IMAGE_GEN_TOKEN_INDEX), IGNORE_INDEX, shifted)
  keep = (shifted != IM_END_ID) & (offsets < n - 1)
  out = np.full(n, IGNORE_INDEX, np.int64)
  out[offsets[keep]] = values[keep]
  return out


def reference_fm_positions(targets: np.ndarray, tokens_per_image: int) -> np.ndarray:
  """The reference's FM position mask (`mask_img_de`) over shifted positions, for one sample."""
  mask = np.zeros(len(targets), bool)
  for start in np.flatnonzero(targets == IM_START_ID):
    mask[start + 2 : start + 2 + tokens_per_image] = True
  if not mask.any():
    mask[:tokens_per_image] = True
  return mask


def assemble(
  input_ids: np.ndarray,
  tokens_per_image: int,
  attention_mask: Optional[np.ndarray] = None,
  labels: Optional[np.ndarray] = None,
  seq_len: Optional[int] = None,
  max_seq_len: int = 4096,
  check_fm_positions: bool = False,
) -> AssembledBatch:
  """Assemble a batch. seq_len: static output length (>= the longest sample); None = the longest.

  check_fm_positions: verify that the reference's label-derived FM positions are exactly the image
  tokens (true for every well-formed training sample); raise SequenceError otherwise.
  """
  input_ids = np.asarray(input_ids)
  batch = input_ids.shape[0]
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  if labels is None:
    labels = np.full_like(input_ids, IGNORE_INDEX)
  n_tok = tokens_per_image

  rows, kinds, samples, starts = [], [], [], []
  for b in range(batch):
    keep = np.asarray(attention_mask[b]).astype(bool)
    ids, labs = np.asarray(input_ids[b])[keep], np.asarray(labels[b])[keep]
    is_ph = (ids == IMAGE_TOKEN_INDEX) | (ids == IMAGE_GEN_TOKEN_INDEX)
    if not is_ph.any():  # the sample's image is prepended, causal (image_mask 0)
      k = len(kinds)
      kinds.append(KIND_PREPENDED), samples.append(b), starts.append(0)
      tok = np.concatenate([np.zeros(n_tok, np.int64), ids])
      img_local = np.concatenate([k * n_tok + np.arange(n_tok), np.full(len(ids), -1)])
      img_mask = np.zeros(len(tok), np.int64)
      lab = np.concatenate([np.full(n_tok, IMAGE_TOKEN_INDEX), labs])
    else:  # each placeholder expands to N slots; vectorised over tokens
      width = np.where(is_ph, n_tok, 1)
      offsets = np.cumsum(width) - width
      src = np.repeat(np.arange(len(ids)), width)  # source token of every output position
      within = np.arange(len(src)) - offsets[src]  # index inside an image block
      image_no = len(kinds) + np.cumsum(is_ph) - 1  # global image number of each placeholder
      on_image = is_ph[src]
      tok = np.where(on_image, 0, ids[src])
      img_local = np.where(on_image, image_no[src] * n_tok + within, -1)
      img_mask = on_image.astype(np.int64)
      lab = np.where(on_image, ids[src], labs[src])
      for i in np.flatnonzero(is_ph):
        kinds.append(KIND_UND if ids[i] == IMAGE_TOKEN_INDEX else KIND_GEN), samples.append(b)
        starts.append(int(offsets[i]))
    row = [x[:max_seq_len] for x in (tok, img_local, img_mask, lab)]
    rows.append(row)

  lengths = [len(r[0]) for r in rows]
  s = max(lengths) if seq_len is None else seq_len
  if max(lengths) > s:
    raise SequenceError(
      f"assembled sequence of {max(lengths)} tokens does not fit seq_len={s}; raise "
      "seq_len / the bucket sizes or drop the sample"
    )
  token_ids = np.zeros((batch, s), np.int32)
  image_index = np.full((batch, s), -1, np.int32)
  image_mask = np.zeros((batch, s), np.int32)
  valid = np.zeros((batch, s), bool)
  lab_out = np.full((batch, s), IGNORE_INDEX, np.int32)
  targets = np.full((batch, s), IGNORE_INDEX, np.int32)
  for b, (tok, img, msk, lab) in enumerate(rows):
    n = len(tok)
    token_ids[b, :n], image_index[b, :n], image_mask[b, :n], lab_out[b, :n] = tok, img, msk, lab
    valid[b, :n] = True
    targets[b, :s] = rebuild_targets(lab_out[b])
  kinds = np.asarray(kinds, np.int32)
  starts = np.asarray(starts, np.int32)
  samples = np.asarray(samples, np.int32)
  # an image cut by truncation cannot be used (the reference crashes there)
  for k in range(len(kinds)):
    if starts[k] + n_tok > lengths[samples[k]]:
      raise SequenceError(
        f"sample {samples[k]}: image {k} is cut by truncation at max_seq_len={max_seq_len}; shorten the "
        "sample or raise max_seq_len"
      )
  positions = np.broadcast_to(np.arange(s, dtype=np.int32), (batch, s)).copy()
  layout = AssembledBatch(
    token_ids,
    image_index,
    image_mask,
    valid,
    positions,
    lab_out,
    targets,
    kinds,
    samples,
    starts,
    valid.astype(np.int32),
    samples.copy(),
  )
  if check_fm_positions:
    _check_fm_positions(layout, n_tok)
  return layout


def _check_fm_positions(layout: AssembledBatch, n_tok: int) -> None:
  s = layout.token_ids.shape[1]
  expected = np.zeros(layout.token_ids.shape, bool)
  flat = layout.image_positions(n_tok).reshape(-1)
  expected.reshape(-1)[flat] = True
  for b in range(layout.token_ids.shape[0]):
    ref = np.zeros(s, bool)
    ref[: s - 1] = reference_fm_positions(layout.targets[b, : s - 1], n_tok)[: s - 1]
    if not np.array_equal(ref, expected[b]):
      raise SequenceError(
        f"sample {b}: the labels do not mark every image with an <im_start> label (151667) right "
        "before it, so the reference would take flow-matching states from other positions; label "
        "<im_start>/<im_end> in every turn as the rae_qwen template does"
      )
