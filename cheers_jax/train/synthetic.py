"""Synthetic inputs for measuring the train step (sweep, AOT, bench): batches in the batch contract
and a train state of the right shapes, built without data or a real initialisation.

- `BatchSpec` / `synthetic_batch`: the reference timing's batch (time_reference_gpu.py): a share of
  generation samples, the rest understanding, one image each, padded to a static length; built with
  `cheers_jax.data.batch` like the pipeline's batches. `batch_shapes` / `abstract_batch` give the same
  without building it (AOT lowering).
- `synthetic_train_state`: deterministic pseudo-random params and a fresh optimizer state, created
  already sharded, in one small program (seconds, where the real init takes minutes on a CPU).
- `BatchOptions`: how a tool asks for a batch; its size comes from the layout being measured. With
  `mix`, the samples' lengths follow the realistic mix of `cheers_jax.data.packing.length_mix`, padded to
  the config's bucket of the longest, or with data.packing=True packed into as few rows as hold them
  (the same samples either way: compare the two at the same number of real samples per step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cheers_jax.config import model_config
from cheers_jax.data import batch as batch_lib
from cheers_jax.data import packing
from cheers_jax.data.tokenizer import ALWAYS_LABELLED_IDS
from cheers_jax.errors import UserError
from cheers_jax.infer.loader import fake_constant
from cheers_jax.model.sequence import KIND_GEN, KIND_UND, assemble
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
  SYSTEM_ID,
  USER_ID,
)
from cheers_jax.train import batching
from cheers_jax.train import optimizer as opt_lib
from cheers_jax.train import state as state_lib


# ---- batches ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """A synthetic global batch, built like the reference's timing batch (time_reference_gpu.py).

  Sample i is a generation sample ('user: <text> / assistant: <image_gen>') for `gen_fraction` of the
  indices (evenly interleaved, so every data shard gets the same mix), else an understanding sample
  ('user: <image> <text> / assistant: <text>'); a 6-token system prompt, `text_len` random text tokens,
  one image, labels as the pipeline builds them. Assembled length: text_len + 24 + N tokens (N = tokens
  per image; the chat template adds 24), right-padded to `seq_len`. The reference's timing batch is
  text_len 120 at 512x512: 400 tokens. Every sample is a pure function of (seed, i), so any subset of
  rows can be built on its own.
  """

  batch_size: int  # global rows
  seq_len: int
  image_size: int
  tokens_per_image: int
  text_len: int = 120
  gen_fraction: float = 0.5
  image_slots: int = 1  # image slots per sample (the pipeline's max_images_per_sample); extra = padding
  vocab_size: int = 151936  # ids >= vocab (special tokens of a small test vocabulary) wrap around
  seed: int = 0
  text_lens: tuple[int, ...] = ()  # per-sample text tokens (a length mix) instead of text_len for all
  pack: Optional[packing.PackingSpec] = None  # packed rows (seq_len = pack.row_len) instead of one per sample

  def __post_init__(self):
    if min(self.text_lens or (self.text_len,)) < 2:
      raise UserError(f"text_len={self.text_len}: at least 2 text tokens per sample")
    if self.text_lens and len(self.text_lens) != self.batch_size:
      raise ValueError(f"{len(self.text_lens)} text lengths for {self.batch_size} samples")
    if self.sample_len > self.seq_len:
      raise UserError(
        f"samples of {self.sample_len} tokens ({self.text_len} text + {CHAT_TOKENS} chat + "
        f"{self.tokens_per_image} image) do not fit seq_len={self.seq_len}; lower --text-len "
        "or raise --seq-len"
      )
    if not 0.0 <= self.gen_fraction <= 1.0:
      raise UserError(f"gen_fraction={self.gen_fraction} is not in [0, 1]")
    if self.image_slots < 1:
      raise UserError(f"image_slots={self.image_slots}: at least 1")

  @property
  def sample_len(self) -> int:
    """The longest sample's assembled length."""
    return max(self.text_lens or (self.text_len,)) + CHAT_TOKENS + self.tokens_per_image

  def sample_lens(self) -> list[int]:
    return [self.text_length(i) + CHAT_TOKENS + self.tokens_per_image for i in range(self.batch_size)]

  def text_length(self, i: int) -> int:
    return self.text_lens[i] if self.text_lens else self.text_len

  @property
  def rows(self) -> int:
    return self.pack.rows if self.pack else self.batch_size

  @property
  def slots_per_row(self) -> int:
    return self.pack.row_images if self.pack else self.image_slots

  @property
  def padding(self) -> float:
    """Share of the batch's tokens that are padding."""
    return 1.0 - sum(self.sample_lens()) / (self.rows * self.seq_len)

  def is_gen(self, i: int) -> bool:
    f = self.gen_fraction
    return math.floor((i + 1) * f + 1e-9) - math.floor(i * f + 1e-9) == 1


CHAT_TOKENS = 24  # system prompt + turn markers + image block markers around the text
REFERENCE_TEXT_LEN = 120  # the reference timing's samples: 120 + 24 + 256 = 400 tokens at 512x512


def batch_spec(
  config,
  batch_size: int,
  *,
  seq_len: Optional[int] = None,
  text_len: Optional[int] = None,
  gen_fraction: float = 0.5,
  image_slots: int = 1,
  seed: int = 0,
  mix: bool = False,
) -> BatchSpec:
  """Defaults: seq_len = the config's smallest bucket; text_len = the reference's 120, or what fits.
  mix: `batch_size` samples of the realistic length mix instead (`mix_spec`)."""
  cfg = model_config(config)
  n = cfg.tokens_per_image
  if mix:
    return mix_spec(config, batch_size, gen_fraction=gen_fraction, image_slots=image_slots, seed=seed)
  seq_len = int(seq_len or min(config.data.seq_buckets))
  text_len = int(text_len or max(2, min(REFERENCE_TEXT_LEN, seq_len - CHAT_TOKENS - n)))
  return BatchSpec(
    int(batch_size),
    seq_len,
    cfg.vision.image_size,
    n,
    text_len,
    float(gen_fraction),
    int(image_slots),
    cfg.text.vocab_size,
    int(seed),
  )


def _sample(spec: BatchSpec, i: int) -> tuple[list[int], list[int], float]:
  rng = np.random.default_rng([spec.seed, i])
  words = lambda k: [int(x) for x in rng.integers(0, min(spec.vocab_size, 151000), k)]
  n = spec.text_length(i)
  sys_ids = [CHAT_START_ID, SYSTEM_ID, NEWLINE_ID] + words(6) + [CHAT_END_ID, NEWLINE_ID]
  if spec.is_gen(i):
    user = words(n)
    asst = [IM_START_ID, IMAGE_GEN_TOKEN_INDEX, IM_END_ID]
    t = float(np.clip(rng.uniform(), 1e-6, 1 - 1e-6))
  else:
    user = [IM_START_ID, IMAGE_TOKEN_INDEX, IM_END_ID, NEWLINE_ID] + words(n // 2)
    asst = words(n - n // 2)
    t = 1.0
  u = [CHAT_START_ID, USER_ID, NEWLINE_ID] + user + [CHAT_END_ID, NEWLINE_ID]
  a = [CHAT_START_ID, ASSISTANT_ID, NEWLINE_ID] + asst + [CHAT_END_ID, NEWLINE_ID]
  ids = sys_ids + u + a
  labels = [IGNORE_INDEX] * (len(sys_ids) + len(u)) + a  # the tokenizer's rule (build_conversation)
  labels = [x if x in ALWAYS_LABELLED_IDS else lab for x, lab in zip(ids, labels)]
  labels = [IGNORE_INDEX if lab in (IMAGE_TOKEN_INDEX, IMAGE_GEN_TOKEN_INDEX) else lab for lab in labels]
  return ids, labels, t


def synthetic_batch(spec: BatchSpec, rows: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
  """The numpy batch of samples `rows` (default: all), indexed locally exactly as the data pipeline
  collates a per-process batch (cheers_jax/data/pipeline.py `collate`): flat positions b*S + s and
  image slots b*K + i count from this batch's first row."""
  if spec.pack is not None:
    if rows is not None:
      raise ValueError("a packed synthetic batch is built whole")
    return _packed_batch(spec)
  rows = list(range(spec.batch_size)) if rows is None else list(rows)
  samples = [_sample(spec, i) for i in rows]
  b, n_tok, hw = len(rows), spec.tokens_per_image, spec.image_size
  ids, labels, mask = batch_lib.pad_samples([s[0] for s in samples], [s[1] for s in samples])
  lay = assemble(ids, n_tok, attention_mask=mask, labels=labels, seq_len=spec.seq_len, check_fm_positions=True)
  assert lay.num_images == b and np.array_equal(lay.image_sample, np.arange(b))  # one image per sample
  pixels = np.stack([np.random.default_rng([spec.seed, i, 1]).integers(0, 256, (hw, hw, 3), np.uint8) for i in rows])
  out = batch_lib.from_assembled(lay, n_tok, spec.image_slots, pixels, np.asarray([s[2] for s in samples]))
  return _wrap_vocab(out, spec.vocab_size)


def _wrap_vocab(batch: dict, vocab_size: int) -> dict:
  for key in ("token_ids", "targets"):  # ids >= vocab (special tokens of a small test vocabulary) wrap around
    batch[key] = np.where(batch[key] >= vocab_size, batch[key] % vocab_size, batch[key]).astype(np.int32)
  return batch


def _packed_batch(spec: BatchSpec) -> dict[str, np.ndarray]:
  """All of spec's samples packed into spec.pack's rows (first fit), as the pipeline packs them."""
  hw, samples = spec.image_size, []
  for i in range(spec.batch_size):
    ids, labels, t = _sample(spec, i)
    pixels = np.random.default_rng([spec.seed, i, 1]).integers(0, 256, (1, hw, hw, 3), np.uint8)
    samples.append(
      {
        "input_ids": np.asarray(ids),
        "labels": np.asarray(labels),
        "pixels": pixels,
        "t": np.asarray([t], np.float32),
        "image_kind": np.asarray([KIND_GEN if spec.is_gen(i) else KIND_UND], np.int32),
      }
    )
  placements = packing.first_fit(spec.sample_lens(), [1] * spec.batch_size, spec.pack)
  if len(placements) != 1:
    raise UserError(f"{spec.batch_size} samples do not fit {spec.pack.rows} packed rows")
  return _wrap_vocab(packing.collate_packed(samples, placements[0], spec.pack, spec.tokens_per_image), spec.vocab_size)


def batch_shapes(spec: BatchSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of every array the step consumes, without building the batch."""
  return batch_lib.shapes(spec.rows, spec.seq_len, spec.slots_per_row, spec.tokens_per_image, spec.image_size)


def abstract_batch(spec: BatchSpec, mesh) -> dict:
  """ShapeDtypeStructs carrying the step's batch shardings (for AOT lowering: nothing is allocated)."""
  shapes = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in batch_shapes(spec).items()}
  shardings = batching.batch_shardings(mesh, shapes)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in shapes.items()}


def global_device_batch(full: Mapping[str, np.ndarray], mesh) -> dict:
  """A GLOBAL numpy batch (e.g. `synthetic_batch(spec)`) as sharded jax arrays. Right under any process
  count: every process holds the whole numpy batch and hands each of its devices that device's block
  (unlike the pipeline's per-process batches, whose indices are local)."""
  shardings = batching.batch_shardings(mesh, full)
  return {
    k: jax.make_array_from_callback(np.shape(full[k]), shardings[k], lambda idx, x=full[k]: x[idx]) for k in shardings
  }


# ---- the train state ----------------------------------------------------------------------------
def _mix32(x):
  """A 32-bit integer hash (murmur3's finaliser): cheap pseudo-random bits from an iota."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def synthetic_train_state(config, mesh, seed: int = 0):
  """(state, shardings): a TrainState of the right shapes, created already sharded, with deterministic
  pseudo-random params (U(-a, a), std 0.02; norm weights 1, biases 0, BatchNorm mean 0 / var 1) and a
  fresh optimizer state. One small elementwise program: compiles in seconds where the real init (which
  traces every module) takes minutes on a CPU. Only for measuring: the values are not a trained model's.
  """
  abstract, shardings = state_lib.abstract_train_state(config, mesh)
  tx = opt_lib.make_optimizer(config.train)

  def fill(path, leaf, salt):
    constant = fake_constant(path)
    if constant is not None:
      return jnp.full(leaf.shape, constant, leaf.dtype)
    # flat index from broadcasted iotas (not a reshaped 1-D iota): partitions without gathers
    index = jnp.full(leaf.shape, salt * 0x9E3779B1 % 2**32, jnp.uint32)
    stride = 1
    for d in reversed(range(len(leaf.shape))):
      index = index + jax.lax.broadcasted_iota(jnp.uint32, leaf.shape, d) * jnp.uint32(stride % 2**32)
      stride *= leaf.shape[d]
    u = (_mix32(index) >> 8).astype(jnp.float32) * (2.0 / 2**24) - 1.0  # U(-1, 1)
    return (0.02 * math.sqrt(3.0) * u).astype(leaf.dtype)

  def build():
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
      {"params": abstract.params, "batch_stats": abstract.batch_stats}
    )
    filled = jax.tree_util.tree_unflatten(treedef, [fill(p, l, i + 1) for i, (p, l) in enumerate(leaves)])
    params = filled["params"]
    trainable, _ = opt_lib.partition(params, opt_lib.trainable_mask(params, config.train.trainable))
    return state_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=filled["batch_stats"],
      opt_state=tx.init(trainable),
      rng=jax.random.PRNGKey(seed),
    )

  return jax.jit(build, out_shardings=shardings)(), shardings


def mix_spec(config, batch_size: int, *, gen_fraction: float = 0.5, image_slots: int = 1, seed: int = 0) -> BatchSpec:
  """`batch_size` samples with lengths drawn from `packing.length_mix` (the config's data.mix), one image
  each: padded to the bucket of the longest (data.seq_buckets), or with data.packing=True packed into as
  few rows as hold them (data.pack_len x data.pack_images)."""
  cfg = model_config(config)
  n = cfg.tokens_per_image
  lengths = packing.length_mix(batch_size, n, seed, dict(config.data.mix))
  buckets = tuple(int(b) for b in config.data.seq_buckets)
  if lengths.max() > max(buckets):
    raise UserError(
      f"the length mix has samples of up to {lengths.max()} tokens, over the largest bucket "
      f"{max(buckets)}: pass e.g. --config.data.seq_buckets='(512,1024,2048,4096)'"
    )
  text_lens = tuple(int(x) - CHAT_TOKENS - n for x in lengths)
  pack = packing.resolve(config.data, n, rows=batch_size)
  if pack is None:
    seq_len = packing.bucket_of(int(lengths.max()), buckets)
  else:
    [placement] = packing.first_fit(lengths, np.ones(batch_size, np.int64), pack)  # rows = samples: one batch
    pack = dataclasses.replace(pack, rows=1 + max(row for row, _ in placement))
    seq_len = pack.row_len
  return BatchSpec(
    int(batch_size),
    seq_len,
    cfg.vision.image_size,
    n,
    min(text_lens),
    float(gen_fraction),
    int(image_slots),
    cfg.text.vocab_size,
    int(seed),
    text_lens,
    pack,
  )


@dataclasses.dataclass(frozen=True)
class BatchOptions:
  """How to build the synthetic batch of a layout (its batch size comes from the layout)."""

  seq_len: Optional[int] = None
  text_len: Optional[int] = None
  gen_fraction: float = 0.5
  image_slots: int = 1
  mix: bool = False  # samples of the realistic length mix (packed with data.packing=True): `mix_spec`

  @classmethod
  def from_args(cls, args) -> "BatchOptions":
    """From the flags of cli.add_batch_shape_flags."""
    return cls(args.seq_len, args.text_len, args.gen_fraction, args.image_slots, args.mix)

  def spec(self, config, batch_size: int) -> BatchSpec:
    return batch_spec(
      config,
      batch_size,
      seq_len=self.seq_len,
      text_len=self.text_len,
      gen_fraction=self.gen_fraction,
      image_slots=self.image_slots,
      seed=int(config.seed),
      mix=self.mix,
    )
