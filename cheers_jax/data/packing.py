"""Packed rows (data.packing=True): several samples share one row of a static length, and the padding
figure with and without packing.

Without packing every sample has a row of its own and the batch is padded to the bucket of its longest
sample (`pipeline.collate`). With packing a batch is train.batch_size rows of data.pack_len tokens and
data.pack_images image slots each; samples are placed in stream order, each into the first row with
room for its tokens and its images (first fit), and the batch is closed when a sample fits no row
(that sample opens the next batch). Each sample of a row is its own segment (`segment_ids` 1, 2, ...):
the omni mask applies per segment and no segment sees another (`model.qwen2.omni_mask`), positions
restart at 0, and targets, images, t and loss weights are the sample's own, so a packed batch gives the
loss and gradients of the same samples unpacked (tests/data/test_packing.py). The number of samples per
step varies with their lengths (the loss is normalised by the batch's own counts, as without packing).

Keys: data.packing (default False), data.pack_len (row length; 0 = the largest of data.seq_buckets),
data.pack_images (image slots per row; 0 = max(max_images_per_sample, pack_len // (2 x tokens per
image))). A row must hold any sample the pipeline accepts: pack_len >= the largest bucket and
pack_images >= max_images_per_sample, else a ConfigError naming the keys.

The padding figure: `PaddingCounter` counts real and padded tokens (and image slots) of batches;
`length_mix` draws a realistic mix of assembled sample lengths (captions of 20-300 tokens + the image's
tokens, understanding answers up to 1,500 tokens, text) and `padding_figures` packs it both ways
(`python -m cheers_jax.bench train --padding` prints it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from cheers_jax.data import batch as batch_lib
from cheers_jax.errors import ConfigError
from cheers_jax.model.sequence import AssembledBatch, assemble


# ------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class PackingSpec:
  """Row geometry of packed batches."""

  rows: int  # rows per batch (per process)
  row_len: int  # tokens per row
  row_images: int  # image slots per row


def resolve(data: Any, tokens_per_image: int, rows: int) -> Optional[PackingSpec]:
  """The PackingSpec data.packing asks for (None when off), checked: a row must hold the longest bucket
  and the sample with the most images. data: the config's data section."""
  if not bool(data.get("packing", False)):
    return None
  buckets = tuple(int(b) for b in data.seq_buckets)
  longest = max(buckets)
  max_images = int(data.max_images_per_sample)
  row_len = int(data.get("pack_len", 0)) or longest
  row_images = int(data.get("pack_images", 0)) or max(max_images, row_len // (2 * tokens_per_image))
  if row_len < longest:
    raise ConfigError(
      f"data.pack_len={row_len} cannot hold the longest bucket (data.seq_buckets={buckets}): a "
      f"sample of {longest} tokens would fit no row; set data.pack_len >= {longest} (0 = {longest})"
    )
  if row_images < max_images:
    raise ConfigError(
      f"data.pack_images={row_images} cannot hold a sample with data.max_images_per_sample="
      f"{max_images} images; set data.pack_images >= {max_images} (0 = automatic)"
    )
  return PackingSpec(int(rows), row_len, row_images)


# --------------------------------------------------------------------------------------- placement
class RowFiller:
  """First-fit placement of samples into `spec.rows` rows: a sample goes to the first row with room for
  its tokens and images, after the samples already there."""

  def __init__(self, spec: PackingSpec) -> None:
    self.spec = spec
    self.used = np.zeros(spec.rows, np.int64)
    self.images = np.zeros(spec.rows, np.int64)
    self.placement: list[tuple[int, int]] = []  # (row, offset) of each placed sample, in order

  def fits_empty(self, length: int, images: int) -> bool:
    return length <= self.spec.row_len and images <= self.spec.row_images

  def place(self, length: int, images: int) -> bool:
    """Place a sample; False (nothing changes) when no row has room for it."""
    room = (self.used + length <= self.spec.row_len) & (self.images + images <= self.spec.row_images)
    if not room.any():
      return False
    row = int(np.argmax(room))
    self.placement.append((row, int(self.used[row])))
    self.used[row] += length
    self.images[row] += images
    return True


def first_fit(lengths: Sequence[int], images: Sequence[int], spec: PackingSpec) -> list[list[tuple[int, int]]]:
  """Batches of (row, offset) placements of samples taken in order, as the pipeline packs them (each
  batch closes at the first sample that fits none of its rows). Every sample must fit an empty row."""
  batches, filler = [], RowFiller(spec)
  for length, n_img in zip(lengths, images):
    if not filler.fits_empty(length, n_img):
      raise ValueError(f"a sample of {length} tokens and {n_img} images fits no row of {spec}")
    if not filler.place(length, n_img):
      batches.append(filler.placement)
      filler = RowFiller(spec)
      filler.place(length, n_img)
  if filler.placement:
    batches.append(filler.placement)
  return batches


# ------------------------------------------------------------------------------------------ layout
def packed_layout(
  ids: np.ndarray,
  labels: np.ndarray,
  attention_mask: np.ndarray,
  placement: Sequence[tuple[int, int]],
  spec: PackingSpec,
  tokens_per_image: int,
  max_seq_len: int = 4096,
) -> AssembledBatch:
  """The samples of a padded (ids, labels, attention_mask) batch (`batch.pad_samples`), assembled each on
  its own (`sequence.assemble`, with its FM-position check) and placed at (row, offset): one segment each,
  positions from 0, targets shifted within the sample. Image numbering stays the samples' order."""
  one = assemble(
    ids,
    tokens_per_image,
    attention_mask=attention_mask,
    labels=labels,
    max_seq_len=max_seq_len,
    check_fm_positions=True,
  )
  r, s = spec.rows, spec.row_len
  token_ids = np.zeros((r, s), np.int32)
  image_index = np.full((r, s), -1, np.int32)
  image_mask = np.zeros((r, s), np.int32)
  valid = np.zeros((r, s), bool)
  positions = np.broadcast_to(np.arange(s, dtype=np.int32), (r, s)).copy()
  lab = np.full((r, s), batch_lib.IGNORE_INDEX, np.int32)
  targets = np.full((r, s), batch_lib.IGNORE_INDEX, np.int32)
  segment_ids = np.zeros((r, s), np.int32)
  lengths = one.valid.sum(1)
  rows = np.asarray([p[0] for p in placement], np.int32)
  offsets = np.asarray([p[1] for p in placement], np.int32)
  for b, (row, off) in enumerate(placement):
    n = int(lengths[b])
    if off + n > s:
      raise AssertionError(f"sample {b} ({n} tokens) placed at {off} overflows a row of {s}")
    span = slice(off, off + n)
    token_ids[row, span], image_index[row, span] = one.token_ids[b, :n], one.image_index[b, :n]
    image_mask[row, span], valid[row, span] = one.image_mask[b, :n], True
    positions[row, span], lab[row, span] = one.positions[b, :n], one.labels[b, :n]
    targets[row, span] = one.targets[b, :n]
    segment_ids[row, span] = int(segment_ids[row].max()) + 1
  return AssembledBatch(
    token_ids,
    image_index,
    image_mask,
    valid,
    positions,
    lab,
    targets,
    one.image_kind,
    one.image_sample,
    offsets[one.image_sample] + one.image_start,
    segment_ids,
    rows[one.image_sample],
  )


def collate_packed(
  samples: Sequence[Mapping[str, Any]],
  placement: Sequence[tuple[int, int]],
  spec: PackingSpec,
  tokens_per_image: int,
  max_seq_len: int = 4096,
  num_skipped: int = 0,
) -> dict[str, np.ndarray]:
  """Prepared samples (the pipeline's: input_ids, labels, pixels, t, image_kind) at their placements ->
  one packed batch of `cheers_jax.data.batch`'s contract (rows x row_len, row_images slots per row)."""
  ids, labels, mask = batch_lib.pad_samples([x["input_ids"] for x in samples], [x["labels"] for x in samples])
  lay = packed_layout(ids, labels, mask, placement, spec, tokens_per_image, max_seq_len)
  return batch_lib.from_samples(lay, samples, tokens_per_image, spec.row_images, num_skipped)


# ------------------------------------------------------------------------------------ the padding figure
class PaddingCounter:
  """Real and padded tokens (and image slots) of the batches it is shown (the contract's)."""

  def __init__(self) -> None:
    self.tokens = self.real_tokens = self.slots = self.real_images = self.samples = self.batches = 0

  def add(self, batch: Mapping[str, np.ndarray]) -> None:
    valid = np.asarray(batch["valid"])
    self.add_counts(
      valid.size,
      int(valid.sum()),
      int(np.size(batch["image_weight"])),
      int(np.sum(np.asarray(batch["image_weight"]) > 0)),
      samples_in(batch),
    )

  def add_counts(self, tokens: int, real_tokens: int, slots: int, real_images: int, samples: int) -> None:
    self.tokens += tokens
    self.real_tokens += real_tokens
    self.slots += slots
    self.real_images += real_images
    self.samples += samples
    self.batches += 1

  @property
  def padding(self) -> float:
    """Share of the batches' tokens that are padding."""
    return 1.0 - self.real_tokens / self.tokens if self.tokens else 0.0

  @property
  def slot_padding(self) -> float:
    """Share of the image slots that hold no image (each still costs an image's compute)."""
    return 1.0 - self.real_images / self.slots if self.slots else 0.0

  def summary(self) -> dict[str, float]:
    return {
      "padding": self.padding,
      "slot_padding": self.slot_padding,
      "batches": self.batches,
      "samples": self.samples,
      "tokens": self.tokens,
      "real_tokens": self.real_tokens,
    }


def samples_in(batch: Mapping[str, np.ndarray]) -> int:
  """Samples a contract batch holds (a row's segments are numbered 1..n)."""
  return int(np.sum(np.max(np.asarray(batch["segment_ids"]), axis=1)))


# Assembled sample lengths of a realistic mix (no tokenizer or images needed: only lengths matter here).
CHAT_TOKENS = 24  # system turn, turn markers and the image block's <im_start>/<im_end> (synthetic.CHAT_TOKENS)
MIX = {"und": 3.0, "gen": 6.0, "text": 1.0}  # the stage recipes' data.mix (und : gen : text)


def length_mix(n: int, tokens_per_image: int, seed: int = 0, mix: Mapping[str, float] = MIX) -> np.ndarray:
  """n assembled sample lengths, one image each (a text-only sample's prepended dummy included):
  generation = caption U{20..300} + image; understanding = question U{5..60} + image + answer U{1..1500};
  text = U{20..1500} + the dummy image; each + CHAT_TOKENS. Kinds drawn by `mix`."""
  rng = np.random.default_rng(seed)
  names = list(mix)
  p = np.asarray([float(mix[k]) for k in names])
  kind = np.asarray(names)[rng.choice(len(names), size=n, p=p / p.sum())]
  caption = rng.integers(20, 301, n)
  question, answer = rng.integers(5, 61, n), rng.integers(1, 1501, n)
  text = rng.integers(20, 1501, n)
  body = np.where(kind == "gen", caption, np.where(kind == "und", question + answer, text))
  return (CHAT_TOKENS + tokens_per_image + body).astype(np.int64)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if length <= b:
      return int(b)
  raise ValueError(f"{length} tokens exceed the largest bucket {max(buckets)}")


def padding_figures(
  lengths: np.ndarray, buckets: Sequence[int], batch_size: int, slots_per_sample: int, spec: PackingSpec
) -> dict:
  """Padding of `lengths` (one image each) batched as the pipeline does: unpacked (batch_size rows of
  slots_per_sample image slots, each batch padded to the bucket of its longest sample; and the best case,
  every sample padded alone to its own bucket) and packed (first fit into spec's rows). Samples longer
  than the largest bucket are left out (the pipeline skips them)."""
  lengths = lengths[lengths <= max(buckets)]
  unpacked, alone, packed = PaddingCounter(), PaddingCounter(), PaddingCounter()
  for i in range(0, len(lengths) - batch_size + 1, batch_size):
    chunk = lengths[i : i + batch_size]
    width = bucket_of(int(chunk.max()), buckets)
    unpacked.add_counts(width * len(chunk), int(chunk.sum()), slots_per_sample * len(chunk), len(chunk), len(chunk))
  for length in lengths:
    alone.add_counts(bucket_of(int(length), buckets), int(length), slots_per_sample, 1, 1)
  start = 0
  for placement in first_fit(lengths, np.ones(len(lengths), np.int64), spec):
    chunk = lengths[start : start + len(placement)]
    start += len(placement)
    packed.add_counts(spec.rows * spec.row_len, int(chunk.sum()), spec.rows * spec.row_images, len(chunk), len(chunk))
  return {"unpacked": unpacked.summary(), "unpacked_alone": alone.summary(), "packed": packed.summary()}
