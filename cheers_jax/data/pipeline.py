"""Training input pipeline (grain): sources -> mixed, shuffled, tokenised, preprocessed static-shape batches.

    it = make_train_iterator(config, process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                  # dict of numpy arrays: cheers_jax.data.batch's contract
    state = it.get_state()            # JSON-serialisable; save it with the model
    it.set_state(state)               # a resumed run continues with the next batch, bit for bit

Steps: source (`config.data.sources`, several by weight, or `config.data.source`) -> examples split by
category (und: only images to understand; gen: at least one image to generate, editing included; text:
no image) and mixed by `config.data.mix` (und : gen : text; each category reshuffled every epoch and
repeated forever; with several sources, each category's records of each source mixed by the sources'
weights) ->
window shuffle of the mixed stream -> this process's slice (global index g = process_index + k *
process_count) -> per sample, with an RNG seeded by (seed, g): tokenisation (`build_conversation`,
the training template), checks, image preprocessing at `config.data.image_size` (understanding:
resize long side + black pad; generation: resize short side + centre crop), t per image
(`<image_gen>` U(0,1) clamped to [1e-6, 1-1e-6], `<image>` 1.0, no image: 0.0 with a black dummy
image), CFG dropout with probability `cfg_data_rate` on samples holding a -300 (ids only) -> batching
with `sequence.assemble(..., seq_len=bucket, check_fm_positions=True)`, bucket = the smallest of
`config.data.seq_buckets` that holds the longest sample of the batch.

Bad data never crashes the run and never yields a wrong sample: an unreadable record (malformed JSONL
line), a missing or corrupt image, an over-long sample (longer than the largest bucket after truncation
to `config.model.max_seq_len`, or with an image cut by that truncation), a sample with more images
than `max_images_per_sample`, or one whose labels do not place the flow-matching states on its images
is skipped and replaced by the next one; each skip logs ONE warning line with the sample id and the
reason, and is counted in `iterator.skipped` ({reason: count}, checkpointed with the state) and in
the batch's `num_skipped`. Records the source finds unusable while indexing (a JSONL line that is cut
off, has no `conversations`, or images that do not match its placeholders: category `sources.BAD`)
are never drawn; process 0 names each once (with its line number) before the first batch and counts
them as 'malformed', whatever data.mix draws. An image PIL refuses (its decompression-bomb limit
included) is a bad image like any other.

Batches follow the contract of `cheers_jax.data.batch` (keys, dtypes, shapes and slot placement), with
B = per-process batch = train.batch_size // process_count, S = bucket and K = max_images_per_sample;
with data.packing, B rows of S = data.pack_len tokens and K = data.pack_images slots, each row holding
as many whole samples as fit (`cheers_jax.data.packing`).
Micro-batching for grad_accum is the train step's job. With data.worker_count > 0, a worker process that
dies (killed for memory, crashed) is a DataWorkerError at the next batch, never a wait; the other
workers are stopped with it.

Config keys read: data.{sources, source, jsonl_path, image_root, tfds_*, synthetic_size, image_size,
seq_buckets, max_images_per_sample, mix, cfg_data_rate, shuffle, worker_count, packing, pack_len,
pack_images}, train.batch_size, model.max_seq_len, seed; optional data.num_threads (reader threads,
default 8) and data.prefetch (samples read ahead).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import grain
from absl import flags
import numpy as np
from PIL import Image

from cheers_jax.data import batch as batch_lib
from cheers_jax.data import packing as packing_lib
from cheers_jax.data import sources as sources_lib
from cheers_jax.data.images import BadImageError, generation_image, load_image, understanding_image
from cheers_jax.data.tokenizer import (
  DEFAULT_MAX_SEQ_LEN,
  IMAGE_GEN_TOKEN_INDEX,
  IMAGE_TOKEN_INDEX,
  CheersTokenizer,
  cfg_dropout_ids,
)
from cheers_jax.errors import UserError
from cheers_jax.model.sequence import KIND_GEN, KIND_PREPENDED, KIND_UND, SequenceError, assemble

log = logging.getLogger(__name__)

T_MIN, T_MAX = 1e-6, 1.0 - 1e-6
SKIP_REASONS = ("malformed", "bad_image", "too_long", "too_many_images", "bad_sequence")
SHUFFLE_WINDOW = 1024  # shuffle window over the mixed stream (an index permutation, no buffer): the
# mix ratios hold exactly over each window
_PLACEHOLDER_OF_KIND = {"und": IMAGE_TOKEN_INDEX, "gen": IMAGE_GEN_TOKEN_INDEX}
_SEQ_KIND_OF_KIND = {"und": KIND_UND, "gen": KIND_GEN}


class DataWorkerError(RuntimeError):
  """A grain worker process of the pipeline died (killed, crashed); raised instead of waiting for it."""


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """Everything the per-sample and per-batch steps need (plain values, picklable)."""

  batch_size: int  # per process
  image_size: int
  seq_buckets: tuple[int, ...]
  max_images_per_sample: int
  max_seq_len: int  # the model's truncation length (reference: 4096)
  cfg_data_rate: float
  seed: int
  patch_size: int = 16  # the model's ViT patch (= latent cell); the und projector merges 2x2 patches per token
  packing: packing_lib.PackingSpec | None = None  # data.packing: rows of several samples (data/packing.py)

  def __post_init__(self) -> None:
    if self.image_size % self.token_pixels:
      raise ValueError(
        f"image_size {self.image_size} must be a multiple of {self.token_pixels} (one LLM token per "
        f"2x2 patches of {self.patch_size} pixels)"
      )
    if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)):
      raise ValueError(f"seq_buckets must be strictly increasing, got {self.seq_buckets}")
    if self.seed < 0:
      raise ValueError("seed must be >= 0")

  @property
  def token_pixels(self) -> int:
    return 2 * self.patch_size

  @property
  def tokens_per_image(self) -> int:
    return (self.image_size // self.token_pixels) ** 2

  @property
  def max_bucket(self) -> int:
    return self.seq_buckets[-1]

  @property
  def image_slots(self) -> int:
    return self.batch_size * self.max_images_per_sample

  @property
  def max_sample_len(self) -> int:
    """The longest sample a batch holds: the largest bucket, or a packed row."""
    return self.packing.row_len if self.packing else self.max_bucket

  def bucket_for(self, length: int) -> int:
    for b in self.seq_buckets:
      if length <= b:
        return b
    raise ValueError(f"{length} tokens exceed the largest bucket {self.max_bucket}")


def spec_from_config(config: Any, *, seed: int | None = None, process_count: int = 1) -> PipelineSpec:
  data = config.data
  if config.train.batch_size % process_count:
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by {process_count} processes")
  model = config.get("model", None)
  max_seq_len = int(model.get("max_seq_len", 4096)) if model is not None else 4096  # reference: 4096
  spec = PipelineSpec(
    batch_size=config.train.batch_size // process_count,
    image_size=int(data.image_size),
    seq_buckets=tuple(int(b) for b in data.seq_buckets),
    max_images_per_sample=int(data.max_images_per_sample),
    max_seq_len=max_seq_len,
    cfg_data_rate=float(data.cfg_data_rate),
    seed=int(config.seed if seed is None else seed),
    patch_size=int((model.get("vision", None) or {}).get("patch_size", 16)) if model is not None else 16,
  )
  return dataclasses.replace(spec, packing=packing_lib.resolve(data, spec.tokens_per_image, spec.batch_size))


# ------------------------------------------------------------------------------------ per sample
def skip_record(sample_id: str, reason: str, message: str) -> dict[str, str]:
  assert reason in SKIP_REASONS, reason
  return {"id": sample_id, "skip": reason, "message": message}


def _to_rgb(image: Any) -> Image.Image:
  """A path, encoded bytes or a uint8 array -> RGB PIL image; BadImageError when unreadable."""
  if isinstance(image, (str, os.PathLike)):
    return load_image(image)
  if isinstance(image, (bytes, bytearray)):
    return load_image(image)
  arr = np.asarray(image)
  if (
    arr.dtype != np.uint8
    or arr.ndim not in (2, 3)
    or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4))
    or 0 in arr.shape
  ):
    raise BadImageError(f"image array must be uint8 (H, W[, 1|3|4]), got {arr.dtype} {arr.shape}")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  return Image.fromarray(arr).convert("RGB")


def preprocess_image(image: Any, kind: str, image_size: int) -> np.ndarray:
  """uint8 (H, W, 3): understanding = long side + pad, generation = short side + crop (the model divides
  by 255 on the device)."""
  fn = understanding_image if kind == "und" else generation_image
  return np.asarray(fn(_to_rgb(image), resolution=image_size), np.uint8)


class PrepareExample:
  """Raw example + global stream index -> prepared sample, or a skip record (grain map_with_index).

  Prepared sample: {"id", "input_ids" int64 (L,), "labels" int64 (L,), "pixels" uint8 (n, H, W, 3),
  "t" float32 (n,), "image_kind" int32 (n,), "length" (assembled length), "category", "cfg_dropped"}.
  """

  def __init__(self, spec: PipelineSpec, tokenizer: CheersTokenizer | None = None) -> None:
    self.spec = spec
    self.tokenizer = tokenizer or CheersTokenizer()

  def __call__(self, index: int, raw: Mapping[str, Any]) -> dict[str, Any]:
    spec, n_tok = self.spec, self.spec.tokens_per_image
    sid = str(raw.get("id", index))
    if sources_lib.is_marker(raw):
      return skip_record(sid, "malformed", str(raw["error"]))
    kinds = list(raw.get("image_kinds", []))
    images = list(raw.get("images", []))
    if len(kinds) != len(images) or any(k not in _PLACEHOLDER_OF_KIND for k in kinds):
      return skip_record(sid, "malformed", f"image_kinds {kinds} do not match {len(images)} images")
    rng = np.random.default_rng([spec.seed, int(index)])

    # Tokens first: the cheap checks run before any image is decoded.
    try:
      ids, labels = self.tokenizer.build_conversation(raw["messages"])  # keeps the last 8192 as the reference
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      return skip_record(sid, "malformed", f"bad messages: {type(e).__name__}: {e}")
    is_ph = (ids == IMAGE_TOKEN_INDEX) | (ids == IMAGE_GEN_TOKEN_INDEX)
    if ids[is_ph].tolist() != [_PLACEHOLDER_OF_KIND[k] for k in kinds]:
      if len(ids) == DEFAULT_MAX_SEQ_LEN:
        return skip_record(
          sid,
          "too_long",
          f"the template's truncation to the last {DEFAULT_MAX_SEQ_LEN} tokens removed an image placeholder",
        )
      return skip_record(
        sid, "malformed", f"placeholders in the text {ids[is_ph].tolist()} do not match the image kinds {kinds}"
      )
    n_img = max(1, len(kinds))  # a text-only sample carries the prepended dummy image
    if n_img > spec.max_images_per_sample:
      return skip_record(sid, "too_many_images", f"{n_img} images > max_images_per_sample {spec.max_images_per_sample}")
    # Assembled length: each placeholder becomes N tokens; no placeholder = N prepended tokens.
    ph_at = np.flatnonzero(is_ph)
    starts = ph_at + np.arange(len(ph_at)) * (n_tok - 1) if len(ph_at) else np.zeros(1, np.int64)
    full = len(ids) + len(ph_at) * (n_tok - 1) + (0 if len(ph_at) else n_tok)
    if np.any(starts + n_tok > spec.max_seq_len):
      return skip_record(
        sid, "too_long", f"an image is cut by the truncation to max_seq_len={spec.max_seq_len} ({full} tokens)"
      )
    length = min(full, spec.max_seq_len)
    if length > spec.max_sample_len:
      where = "a packed row" if spec.packing else "the largest bucket"
      return skip_record(sid, "too_long", f"{length} tokens do not fit {where} ({spec.max_sample_len})")
    try:
      assemble(ids[None], n_tok, labels=labels[None], max_seq_len=spec.max_seq_len, check_fm_positions=True)
    except SequenceError as e:
      return skip_record(sid, "bad_sequence", str(e))

    # Images and t (an image to understand is clean: t = 1; one to generate: t ~ U(0, 1)).
    pixels, t = [], []
    for image, kind in zip(images, kinds):
      try:
        pixels.append(preprocess_image(image, kind, spec.image_size))
      except BadImageError as e:
        return skip_record(sid, "bad_image", str(e))
      t.append(float(np.clip(rng.uniform(), T_MIN, T_MAX)) if kind == "gen" else 1.0)
    if not kinds:  # the reference's black dummy at t = 0 (pure-noise latent)
      pixels.append(np.zeros((spec.image_size, spec.image_size, 3), np.uint8))
      t.append(0.0)

    cfg_dropped = bool(np.any(ids == IMAGE_GEN_TOKEN_INDEX)) and rng.uniform() < spec.cfg_data_rate
    if cfg_dropped:
      ids = cfg_dropout_ids(ids)  # labels unchanged, as the reference
    return {
      "id": sid,
      "input_ids": ids,
      "labels": labels,
      "pixels": np.stack(pixels),
      "t": np.asarray(t, np.float32),
      "image_kind": np.asarray([_SEQ_KIND_OF_KIND[k] for k in kinds] or [KIND_PREPENDED], np.int32),
      "length": int(length),
      "category": sources_lib.category_of_kinds(kinds),
      "cfg_dropped": cfg_dropped,
    }


# ------------------------------------------------------------------------------------- per batch
def collate(samples: Sequence[Mapping[str, Any]], spec: PipelineSpec, num_skipped: int = 0) -> dict[str, np.ndarray]:
  """Prepared samples -> one batch of `cheers_jax.data.batch`'s contract (static shapes per bucket)."""
  n_tok = spec.tokens_per_image
  ids, labels, mask = batch_lib.pad_samples([s["input_ids"] for s in samples], [s["labels"] for s in samples])
  bucket = spec.bucket_for(max(int(s["length"]) for s in samples))
  lay = assemble(
    ids,
    n_tok,
    attention_mask=mask,
    labels=labels,
    seq_len=bucket,
    max_seq_len=spec.max_seq_len,
    check_fm_positions=True,
  )
  return batch_lib.from_samples(lay, samples, n_tok, spec.max_images_per_sample, num_skipped)


class _BatchIterator(grain.DatasetIterator):
  """Pulls prepared samples, sets skip records aside, collates B good ones, or with packing fills B rows
  (`packing.RowFiller`) until a sample fits none: that sample is held for the next batch, and the state
  is then the parent's from before it, so a restored iterator reads it again. State = the parent's."""

  _MUTATES_ELEMENT_SPEC = True

  def __init__(self, parent: grain.DatasetIterator, spec: PipelineSpec) -> None:
    super().__init__(parent)
    self._spec = spec
    self._pending: tuple[dict, Any] | None = None  # (sample, parent state before it)

  def _take(self) -> tuple[dict, Any]:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      return pending
    before = copy.deepcopy(self._parent.get_state()) if self._spec.packing else None
    return next(self._parent), before

  def __next__(self) -> dict[str, Any]:
    spec = self._spec
    filler = packing_lib.RowFiller(spec.packing) if spec.packing else None
    samples, skips = [], []
    limit = 10 * spec.batch_size + 100  # all-bad data must fail loudly, not loop forever
    while filler is not None or len(samples) < spec.batch_size:
      item, before = self._take()
      if "skip" in item:
        skips.append((item["id"], item["skip"], item["message"]))
        if len(skips) > limit:
          reasons = collections.Counter(reason for _, reason, _ in skips)
          raise UserError(
            f"{len(skips)} consecutive samples were skipped while filling one batch "
            f"({', '.join(f'{r}: {n}' for r, n in reasons.items())}); the data looks broken. "
            f"Last: {skips[-1][0]}: {skips[-1][2]}"
          )
      elif filler is not None and not filler.place(int(item["length"]), len(item["image_kind"])):
        if not samples:  # PrepareExample and packing.resolve make every accepted sample fit an empty row
          raise AssertionError(f"sample {item['id']} fits no empty row of {spec.packing}")
        self._pending = (item, before)  # it opens the next batch
        break
      else:
        samples.append(item)
    if filler is None:
      batch = collate(samples, spec)
    else:
      batch = packing_lib.collate_packed(
        samples, filler.placement, spec.packing, spec.tokens_per_image, spec.max_seq_len
      )
    batch["_skips"] = skips
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._pending[1] if self._pending is not None else self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)
    self._pending = None


class _BatchIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, spec: PipelineSpec) -> None:
    super().__init__(parent)
    self._spec = spec

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), self._spec)


class TrainIterator(grain.DatasetIterator):
  """The pipeline's outer iterator: logs and counts skips (in the main process, once each) and stamps
  `num_skipped`. `get_state()` is JSON-serialisable (grain's orbax CheckpointHandler accepts it)."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.DatasetIterator, source_report: Any = None) -> None:
    super().__init__(parent)
    self.skipped: dict[str, int] = {r: 0 for r in SKIP_REASONS}
    self.recent_skips: collections.deque = collections.deque(maxlen=256)  # (id, reason, message)
    # Records the sources found unusable while indexing or preparing (never drawn), [(named, total, name)]:
    # reported with the first batch, one line each, and counted once as 'malformed' (a resumed state
    # already holds the count).
    self._source_report = source_report
    self._source_counted = False

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def _report_source(self) -> None:
    reports, self._source_report = self._source_report, None
    for named, total, name in reports:
      for line in named:
        message = f"line {line.line_number} of {name}: {line.error}"
        log.warning("skipped sample %s (%s): %s", line.id, "malformed", message)
        self.recent_skips.append((line.id, "malformed", message))
      if total > len(named):
        log.warning(
          "skipped %d more unusable lines of %s (only the first %d are named)", total - len(named), name, len(named)
        )
      if not self._source_counted:
        self.skipped["malformed"] += total
    self._source_counted = True

  def __next__(self) -> dict[str, np.ndarray]:
    if self._source_report is not None:
      self._report_source()
    try:
      batch = next(self._parent)
    except RuntimeError as e:
      if "Worker process was terminated" not in str(e):  # grain's words for a worker that died
        raise
      self._parent.close()  # stops the other workers: none outlives the run
      raise DataWorkerError(
        f"a data loader process (data.worker_count) died: {e} If it was killed for memory, "
        "lower data.worker_count or data.prefetch; the run resumes from its last checkpoint"
      ) from e
    for sid, reason, message in batch.pop("_skips"):
      log.warning("skipped sample %s (%s): %s", sid, reason, message)
      self.skipped[reason] += 1
      self.recent_skips.append((sid, reason, message))
    batch["num_skipped"] = np.asarray(self.num_skipped, np.int32)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "skipped": dict(self.skipped)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self.skipped = {r: 0 for r in SKIP_REASONS}
    self.skipped.update({k: int(v) for k, v in state["skipped"].items()})
    self._source_counted = True  # the saved counts include the source's unusable records


class _TrainIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, source_report: Any = None) -> None:
    super().__init__(parent)
    self._source_report = source_report

  def __iter__(self) -> TrainIterator:
    return TrainIterator(self._parent.__iter__(), self._source_report)


# ------------------------------------------------------------------------------------ the stream
class _Subset:
  """Random-access view of some indices of a source (picklable, unlike a lambda)."""

  def __init__(self, source: Any, indices: np.ndarray) -> None:
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Any:
    return self.source[int(self.indices[i])]


def _derived_seed(seed: int, *salt: int) -> int:
  return int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0])  # < 2**32, as grain wants


def _pool(source: Any, idx: np.ndarray, seed: int, shuffle: bool, *salt: int) -> grain.MapDataset:
  ds = grain.MapDataset.source(_Subset(source, idx))
  if shuffle:
    ds = ds.shuffle(seed=_derived_seed(seed, 1, *salt))
  return ds.repeat()


def _category_pool(source: Any, idx: np.ndarray, c: int, seed: int, shuffle: bool) -> grain.MapDataset | None:
  """The endless stream of one category: its records reshuffled every epoch; with several weighted
  sources (sources_lib.MultiSource with weights), each source's records of the category mixed by weight."""
  weights = getattr(source, "weights", None)
  if weights is None:
    return _pool(source, idx, seed, shuffle, c)
  pools, pool_weights = [], []
  ends = list(source.starts()[1:]) + [len(source)]
  for k, (start, end, weight) in enumerate(zip(source.starts(), ends, weights)):
    part = idx[(idx >= start) & (idx < end)]
    if weight > 0 and len(part):
      pools.append(_pool(source, part, seed, shuffle, c, k))
      pool_weights.append(weight)
  if not pools:
    return None
  return pools[0] if len(pools) == 1 else grain.MapDataset.mix(pools, pool_weights)


def _unused_parts(source: Any, cats: np.ndarray, mix: Mapping[str, float]) -> list[str]:
  """The weighted sources nothing is drawn from (weight 0, or only kinds data.mix leaves out)."""
  weights = getattr(source, "weights", None)
  if weights is None:
    return []
  drawn = [c for c, name in enumerate(sources_lib.CATEGORIES) if float(mix.get(name, 0.0)) > 0]
  ends = list(source.starts()[1:]) + [len(source)]
  has = lambda start, end: np.bincount(cats[start:end], minlength=len(sources_lib.CATEGORIES) + 1)[drawn].any()
  return [
    sources_lib.source_label(part)
    for part, start, end, weight in zip(source.parts, source.starts(), ends, weights)
    if weight <= 0 or not has(start, end)
  ]


def mixed_stream(source: Any, mix: Mapping[str, float], seed: int, shuffle: bool = True) -> grain.MapDataset:
  """Infinite MapDataset of raw examples: categories mixed by ratio, each reshuffled every epoch (and,
  for weighted sources, the sources mixed by weight within each category). Samples of a kind the mix
  gives weight 0 are not drawn (said once); unusable records (category sources.BAD) never are. No
  usable sample of a wanted kind is a UserError that says what there is."""
  cats = np.asarray(source.categories())
  counts = {name: int(np.sum(cats == c)) for c, name in enumerate(sources_lib.CATEGORIES)}
  bad = int(np.sum(cats == sources_lib.BAD))
  pools, weights = [], []
  for c, name in enumerate(sources_lib.CATEGORIES):
    weight = float(mix.get(name, 0.0))
    idx = np.flatnonzero(cats == c)
    if weight > 0 and len(idx) == 0:
      log.warning("data.mix gives %r weight %g but the source has no %r samples; ignored", name, weight, name)
      continue
    if weight <= 0:
      if len(idx):
        log.warning(
          "%d %r samples of %s are not drawn: data.mix.%s=%g",
          len(idx),
          name,
          sources_lib.source_label(source),
          name,
          weight,
        )
      continue
    ds = _category_pool(source, idx, c, seed, shuffle)
    if ds is None:
      log.warning(
        "data.mix gives %r weight %g but no source of positive weight has %r samples; ignored", name, weight, name
      )
      continue
    pools.append(ds)
    weights.append(weight)
  for name in _unused_parts(source, cats, mix):
    log.warning("nothing is drawn from data source %s: its weight is 0 or data.mix leaves out all its kinds", name)
  if not pools:
    wanted = [name for name in sources_lib.CATEGORIES if float(mix.get(name, 0.0)) > 0]
    have = ", ".join(f"{n} {k}" for k, n in counts.items()) + (f", {bad} unusable" if bad else "")
    raise UserError(
      f"{sources_lib.source_label(source)} has no usable sample of the kinds data.mix draws "
      f"({', '.join(wanted) or 'none'}): it holds {have}; "
      + (
        "fix the data or give the kinds it has a positive data.mix weight"
        if len(cats) > bad
        else "the source has no usable record at all"
      )
    )
  if len(pools) == 1:
    return pools[0]
  ds = grain.MapDataset.mix(pools, weights)
  if shuffle:  # the mix interleaves in a fixed pattern; shuffle it so no slice of the stream is one category
    ds = grain.experimental.WindowShuffleMapDataset(ds, window_size=SHUFFLE_WINDOW, seed=_derived_seed(seed, 2))
  return ds


class _Sequenced:
  """Random access over `first`'s first `count` records, then `rest` from its start (a two-phase stream)."""

  def __init__(self, first: grain.MapDataset, count: int, rest: grain.MapDataset) -> None:
    self.first, self.count, self.rest = first, int(count), rest

  def __len__(self) -> int:
    return len(self.rest)

  def __getitem__(self, i: int) -> Any:
    return self.first[i] if i < self.count else self.rest[i - self.count]


def phased_stream(source: Any, data: Any, seed: int) -> grain.MapDataset:
  """`mixed_stream` by data.mix, or, with data.first_samples > 0, its first data.first_samples records
  (global, before the split over processes) drawn by data.first_mix and the rest by data.mix."""
  shuffle = bool(data.get("shuffle", True))
  rest = mixed_stream(source, data.mix, seed, shuffle)
  first_samples = int(data.get("first_samples", 0))
  if first_samples <= 0:
    return rest
  first = mixed_stream(source, data.first_mix, _derived_seed(seed, 3), shuffle)
  return grain.MapDataset.source(_Sequenced(first, first_samples, rest))


def make_train_dataset(
  config: Any,
  *,
  seed: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  tokenizer: CheersTokenizer | None = None,
  source: Any = None,
) -> grain.IterDataset:
  """The pipeline as a grain IterDataset (iterate it, or use `make_train_iterator`). `source` overrides
  the one `config.data.source` names."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  spec = spec_from_config(config, seed=seed, process_count=process_count)
  data = config.data
  if source is None:
    source = sources_lib.make_source(data, spec.seed)
  ds = phased_stream(source, data, spec.seed)
  ds = ds.map_with_index(PrepareExample(spec, tokenizer))  # the index is the global stream index
  ds = ds[process_index::process_count]
  threads = int(data.get("num_threads", 8))
  prefetch = int(data.get("prefetch", min(max(spec.batch_size, 16), 256)))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  batched: grain.IterDataset = _BatchIterDataset(it_ds, spec)
  workers = int(data.get("worker_count", 0))
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app none parsed them
      flags.FLAGS.mark_as_parsed()
    batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  report = None
  if process_index == 0:  # one process reports and counts the records the sources found unusable
    report = [
      (list(leaf.bad_lines), int(leaf.num_bad_lines), sources_lib.source_label(leaf))
      for leaf in sources_lib.leaf_sources(source)
      if getattr(leaf, "num_bad_lines", 0)
    ] or None
  return _TrainIterDataset(batched, report)


def make_train_iterator(
  config: Any,
  *,
  seed: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  tokenizer: CheersTokenizer | None = None,
  source: Any = None,
) -> TrainIterator:
  """Iterator over this process's batches (see the module docstring); `get_state` / `set_state`
  checkpoint it. seed defaults to config.seed; the data order depends on seed, process_count and
  data.worker_count (a state restores into an iterator built with the same three)."""
  return iter(
    make_train_dataset(
      config, seed=seed, process_index=process_index, process_count=process_count, tokenizer=tokenizer, source=source
    )
  )
