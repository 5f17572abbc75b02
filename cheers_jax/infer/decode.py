"""Text generation with a static-size KV cache (the text half of the reference `Cheers.generate`).

`prepare_prompts` assembles right-padded layouts (with the prompt's images, or the reference's dummy
noise image for a prompt without a placeholder), `prefill` runs them into a cache of static length and
`decode` samples in one jitted `lax.while_loop` (one compile per batch size, cache length and sampling
config).

Batches of unequal prompt lengths: a deliberate difference from the reference, which cannot batch them
(it decides from batch 0's last id and lets every row attend to the padding). Here prompts are
right-padded to P, the k-th new token of every sample is written at the shared cache slot P + k, its
RoPE position continues from the sample's own length, and a per-sample validity mask over the cache
slots keeps the padding out of attention. Each sample gets the ids it would get alone.

Reference semantics kept: temperature <= 1e-6 is argmax, otherwise softmax(logits / T) with optional
top-p; the stop id `<|im_end|>` is kept in the output; stopping is per sample (the reference stops the
whole batch on batch 0's token). `reference_max_new_tokens` converts the reference's `max_length`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cheers_jax.data.images import dummy_inference_image
from cheers_jax.data.tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID
from cheers_jax.errors import UserError
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.config import ModelConfig
from cheers_jax.model.layers import dtype_of
from cheers_jax.model.qwen2 import init_cache
from cheers_jax.model.sequence import IMAGE_GEN_TOKEN_INDEX, IMAGE_TOKEN_INDEX, AssembledBatch, assemble

Array = jax.Array


class GenerationError(UserError):
  """Bad generation input (empty prompt, too long for the cache, missing image...): the message says what to do."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen. Defaults are `Cheers.generate`'s (temperature 0.7, no top-p)."""

  temperature: float = 0.7  # <= 1e-6: greedy (argmax)
  top_p: float = 1.0  # nucleus sampling; 1.0 = off
  top_k: int = 0  # 0 = off (an extra: the reference's generate never uses it)
  repetition_penalty: float = 1.0  # 1.0 = off (an extra): seen ids' logits / p if > 0, * p otherwise

  @property
  def greedy(self) -> bool:
    return self.temperature <= 1e-6

  def validate(self) -> "SamplingConfig":
    if not 0.0 <= self.temperature < float("inf"):  # NaN fails too: it would sample garbage
      raise GenerationError(f"temperature={self.temperature} must be a finite number >= 0 (<= 1e-6 is greedy)")
    if not 0.0 < self.top_p <= 1.0:
      raise GenerationError(f"top_p={self.top_p} must be in (0, 1] (1 turns it off)")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      raise GenerationError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
    if not 0.0 < self.repetition_penalty < float("inf"):
      raise GenerationError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 turns it off)")
    return self


GREEDY = SamplingConfig(temperature=0.0)


def reference_max_new_tokens(max_length: int, tokens_before: int = 0) -> int:
  """Text tokens the reference's `generate(max_length=...)` produces at most.

  It loops while `cur_time <= max_length`, where cur_time counts generated text tokens and adds N
  (image tokens) per generated image: max_length + 1 tokens for I2T, max_length + 1 - N after an image.
  """
  return max(0, max_length + 1 - tokens_before)


class DecodeState(NamedTuple):
  """Everything decoding needs after a prefill; a pytree (jit carries it)."""

  cache: dict  # {'k', 'v'}: (L, B, S, KV, hd)
  kv_valid: Array  # (B, S) bool: cache slots each sample may attend
  next_position: Array  # (B,) int32: RoPE position of the next token
  cache_index: Array  # () int32: slot the next token is written at (shared by the batch)
  hidden: Array  # (B, D): final-norm state of the last token fed (its logits give the next id)


@dataclasses.dataclass
class PromptBatch:
  """Assembled prompts: the static layout, the arrays `Cheers.prefill` reads, the valid lengths."""

  layout: AssembledBatch
  batch: dict
  lengths: np.ndarray  # (B,) assembled length of each prompt (image tokens included)

  @property
  def size(self) -> int:
    return len(self.lengths)

  @property
  def seq_len(self) -> int:
    return self.layout.token_ids.shape[1]


@dataclasses.dataclass
class DecodeResult:
  tokens: np.ndarray  # (B, T) int32, PAD after each sample's end
  lengths: np.ndarray  # (B,) ids generated per sample (stop id included)
  state: DecodeState  # cache etc. after the last token fed

  def ids(self) -> list[np.ndarray]:
    return [self.tokens[b, :n] for b, n in enumerate(self.lengths)]


def text_ids(layout: AssembledBatch) -> np.ndarray:
  """(B, S) prompt ids with -1 at image and padding slots (what a repetition penalty counts as seen)."""
  return np.where(layout.valid & (layout.image_index < 0), layout.token_ids, -1)


def round_up(n: int, multiple: int) -> int:
  return -(-n // max(1, multiple)) * max(1, multiple)


# ---- prompts -------------------------------------------------------------------------------------
def _count_placeholders(ids: np.ndarray) -> int:
  return int(np.sum((ids == IMAGE_TOKEN_INDEX) | (ids == IMAGE_GEN_TOKEN_INDEX)))


def prepare_prompts(
  cfg: ModelConfig,
  prompts: Sequence[np.ndarray],
  images: Optional[Sequence[Sequence[np.ndarray]]] = None,
  dummy_seeds: Optional[Sequence[int]] = None,
  seq_len: Optional[int] = None,
  bucket: int = 1,
  max_len: Optional[int] = None,
  reserve: int = 0,
) -> PromptBatch:
  """Assembles prompts (ids with -200/-300 placeholders) and their images for `prefill`.

  images[b]: sample b's images, (H, W, 3) float32 in [0, 1] at the model's resolution (preprocessed
  for understanding), one per placeholder. A prompt without a placeholder gets one image PREPENDED as
  the reference does: images[b][0] if given, else its dummy noise image (`dummy_inference_image`
  seeded with dummy_seeds[b]). Every image is at t = 1. seq_len: static padded length (default: the
  longest prompt rounded up to `bucket`). max_len: raise if a prompt plus `reserve` slots (for what
  is generated after it) is longer; the padding is then cut to leave those slots.
  """
  res, patch = cfg.vision.image_size, cfg.vision.patch_size
  n_tok = cfg.tokens_per_image
  if not prompts:
    raise GenerationError("no prompts given")
  images = list(images) if images is not None else [[] for _ in prompts]
  dummy_seeds = list(dummy_seeds) if dummy_seeds is not None else list(range(len(prompts)))
  if len(images) != len(prompts) or len(dummy_seeds) != len(prompts):
    raise GenerationError(f"{len(prompts)} prompts but {len(images)} image lists / {len(dummy_seeds)} seeds")
  ids_list, pixels = [], []
  for b, (ids, imgs) in enumerate(zip(prompts, images)):
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size == 0:
      raise GenerationError(f"prompt {b} is empty: give some text")
    n_ph = _count_placeholders(ids)
    imgs = list(imgs)
    if n_ph == 0 and not imgs:
      imgs = [dummy_inference_image(dummy_seeds[b], resolution=res, patch_size=patch).pixel_values.transpose(1, 2, 0)]
    if len(imgs) != max(n_ph, 1):
      raise GenerationError(
        f"prompt {b} has {n_ph} image placeholder(s) (<image>/<image_gen>) but "
        f"{len(imgs)} image(s) were given; give one image per placeholder"
      )
    for img in imgs:
      if np.shape(img) != (res, res, 3):
        raise GenerationError(
          f"prompt {b}: image of shape {np.shape(img)}, the model needs ({res}, {res}, 3): "
          "preprocess it with cheers_jax.data.images.preprocess_understanding"
        )
      pixels.append(np.asarray(img, np.float32))
    ids_list.append(ids)
  lengths = np.array(
    [len(x) + (n_tok - 1) * _count_placeholders(x) + (n_tok if _count_placeholders(x) == 0 else 0) for x in ids_list],
    np.int32,
  )
  longest = int(lengths.max())
  if max_len is not None and longest + reserve > max_len:
    b = int(lengths.argmax())
    extra = f" plus {reserve} slots for what is generated after it" if reserve else ""
    raise GenerationError(
      f"prompt {b} is {longest} tokens long (images included, {n_tok} each){extra} and does "
      f"not fit the cache of {max_len}: shorten it, generate less, or raise the cache length "
      "(--max-len)"
    )
  s = seq_len if seq_len is not None else round_up(longest, bucket)
  if max_len is not None:
    s = max(longest, min(s, max_len - reserve))
  width = max(len(x) for x in ids_list)
  ids_arr = np.full((len(ids_list), width), PAD_TOKEN_ID, np.int64)
  attn = np.zeros((len(ids_list), width), np.int64)
  for b, x in enumerate(ids_list):
    ids_arr[b, : len(x)], attn[b, : len(x)] = x, 1
  layout = assemble(ids_arr, n_tok, attention_mask=attn, seq_len=s, max_seq_len=max(s, longest))
  batch = {
    "token_ids": layout.token_ids,
    "image_index": layout.image_index,
    "image_mask": layout.image_mask,
    "valid": layout.valid,
    "positions": layout.positions,
    "pixels": np.stack(pixels),
    "t": np.ones(len(pixels), np.float32),
  }
  return PromptBatch(layout, batch, layout.valid.sum(1).astype(np.int32))


# ---- prefill -------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def _prefill(model: Cheers, cache_len: int, variables, batch: dict, x0: Array, lengths: Array) -> DecodeState:
  b, s = batch["token_ids"].shape
  cache = init_cache(model.cfg.text, b, cache_len, dtype_of(model.cfg.dtype))
  out = model.apply(variables, batch, x0, cache, method=Cheers.prefill)
  last = out["hidden"][jnp.arange(b), lengths - 1]
  kv_valid = jnp.pad(jnp.asarray(batch["valid"], bool), ((0, 0), (0, cache_len - s)))
  return DecodeState(out["cache"], kv_valid, lengths.astype(jnp.int32), jnp.asarray(s, jnp.int32), last)


def prefill(model: Cheers, variables, prompts: PromptBatch, cache_len: int, x0: Optional[Array] = None) -> DecodeState:
  """Runs the prompts into a fresh cache of `cache_len` slots (prompt slots 0..P-1).

  x0: the flow noise of each image (n_img, h, w, C); irrelevant at t = 1 (x_t = z1), zeros by default.
  """
  if cache_len < prompts.seq_len:
    raise GenerationError(f"cache of {cache_len} slots is shorter than the prompt ({prompts.seq_len})")
  n_img, res = prompts.batch["pixels"].shape[0], model.cfg.vision.image_size
  if x0 is None:
    side = res // model.cfg.vision.patch_size
    x0 = np.zeros((n_img, side, side, model.cfg.vae.latent_channels), np.float32)
  return _prefill(
    model, cache_len, variables, prompts.batch, jnp.asarray(x0, jnp.float32), jnp.asarray(prompts.lengths)
  )


# ---- one token -----------------------------------------------------------------------------------
def _feed(m: Cheers, state: DecodeState, tokens: Array) -> DecodeState:
  """Writes `tokens` (B,) at the shared slot `cache_index`; returns the advanced state."""
  slot = jnp.arange(state.kv_valid.shape[1]) == state.cache_index
  kv_valid = state.kv_valid | slot[None]
  hidden, cache = m.llm(
    m.embed(tokens[:, None]), state.next_position[:, None], kv_valid[:, None, :], state.cache, state.cache_index
  )
  return DecodeState(cache, kv_valid, state.next_position + 1, state.cache_index + 1, hidden[:, 0])


def feed_tokens(model: Cheers, variables, state: DecodeState, tokens: Array) -> DecodeState:
  """Feeds one token per sample (e.g. the <im_end> after a generated image); the step runs under jit."""
  return _feed_jit(model, variables, state, jnp.asarray(tokens, jnp.int32))


@functools.partial(jax.jit, static_argnames=("model",))
def _feed_jit(model, variables, state, tokens):
  return model.apply(variables, state, tokens, method=_feed)


# ---- sampling ------------------------------------------------------------------------------------
def sample_logits(logits: Array, key: Array, sampling: SamplingConfig, seen: Optional[Array] = None) -> Array:
  """(B, V) logits -> (B,) int32 ids, as the reference's `_sample_from_logits` plus top-k / penalty.

  The penalty (and top-k) also apply before a greedy argmax; with their defaults (off) greedy is the
  reference's plain argmax.
  """
  logits = logits.astype(jnp.float32)
  if seen is not None and sampling.repetition_penalty != 1.0:
    p = sampling.repetition_penalty
    logits = jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  vocab = logits.shape[-1]
  if 0 < sampling.top_k < vocab:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # drop a token once the mass BEFORE it exceeds top_p: the first one always stays
    remove = jnp.pad(cum[:, :-1] > sampling.top_p, ((0, 0), (1, 0)))
    pick = jax.random.categorical(key, jnp.where(remove, -jnp.inf, sorted_logits), axis=-1)
    return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---- the loop ------------------------------------------------------------------------------------
class _Carry(NamedTuple):
  state: DecodeState
  tokens: Array  # (B, T) int32
  lengths: Array  # (B,) int32
  done: Array  # (B,) bool
  seen: Optional[Array]  # (B, V) bool, only with a repetition penalty
  step: Array  # () int32: next output index
  key: Array


@functools.partial(jax.jit, static_argnames=("model", "sampling", "eos_id"))
def _decode_loop(
  model: Cheers, sampling: SamplingConfig, eos_id: Optional[int], variables, carry: _Carry, stop_at: Array
) -> _Carry:
  """Samples output ids carry.step .. stop_at-1 (or until every sample has stopped)."""

  def cond(c: _Carry):
    return (c.step < stop_at) & ~jnp.all(c.done)

  def body(c: _Carry) -> _Carry:
    logits = model.apply(variables, c.state.hidden, method=Cheers.logits)
    tok = sample_logits(logits, jax.random.fold_in(c.key, c.step), sampling, c.seen)
    tok = jnp.where(c.done, PAD_TOKEN_ID, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(c.tokens, tok[:, None], c.step, axis=1)
    lengths = c.lengths + (~c.done).astype(jnp.int32)
    done = c.done | ((tok == eos_id) if eos_id is not None else jnp.zeros_like(c.done))
    seen = None if c.seen is None else c.seen.at[jnp.arange(tok.shape[0]), tok].set(True)
    # always fed, even the budget's last id: a `cond` around it could make XLA copy the cache each step
    state = model.apply(variables, c.state, tok, method=_feed)
    return _Carry(state, tokens, lengths, done, seen, c.step + 1, c.key)

  return jax.lax.while_loop(cond, body, carry)


def decode(
  model: Cheers,
  variables,
  state: DecodeState,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  rng: Optional[Array] = None,
  eos_id: Optional[int] = EOS_TOKEN_ID,
  prompt_tokens: Optional[np.ndarray] = None,
  stream: Optional[Callable[[list[np.ndarray]], None]] = None,
  chunk: int = 16,
  stop_after: Optional[int] = None,
) -> DecodeResult:
  """Samples up to `max_new_tokens` ids per sample after a prefill; a sample stops at `eos_id` (kept).

  stop_after: end the loop after this many ids even though `max_new_tokens` (the static width of the
  output) is larger; a runtime value, so batches with different budgets share one compiled loop.

  prompt_tokens: (B, P) ids the repetition penalty counts as seen (ignored when it is off; negative
  ids are skipped). stream: called with each sample's new ids after every `chunk` steps (the loop
  then runs chunk by chunk, the same compiled program each time).
  """
  sampling.validate()
  b, slots = state.kv_valid.shape
  if max_new_tokens <= 0:
    return DecodeResult(np.zeros((b, 0), np.int32), np.zeros(b, np.int32), state)
  free = slots - int(state.cache_index)
  if max_new_tokens > free:
    raise GenerationError(
      f"{max_new_tokens} new tokens need as many free cache slots but only {free} are left: "
      "raise the cache length (--max-len) or ask for fewer tokens"
    )
  seen = None
  if sampling.repetition_penalty != 1.0:
    vocab = model.cfg.text.vocab_size
    seen = np.zeros((b, vocab), bool)
    if prompt_tokens is not None:
      for row, ids in enumerate(np.asarray(prompt_tokens)):
        ids = ids[(ids >= 0) & (ids < vocab)]
        seen[row, ids] = True
    seen = jnp.asarray(seen)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  limit = max_new_tokens if stop_after is None else max(0, min(stop_after, max_new_tokens))
  carry = _Carry(
    state,
    jnp.full((b, max_new_tokens), PAD_TOKEN_ID, jnp.int32),
    jnp.zeros(b, jnp.int32),
    jnp.zeros(b, bool),
    seen,
    jnp.asarray(0, jnp.int32),
    rng,
  )
  if stream is None:
    carry = _decode_loop(model, sampling, eos_id, variables, carry, jnp.asarray(limit, jnp.int32))
  else:
    shown = np.zeros(b, np.int64)
    while int(carry.step) < limit and not bool(jnp.all(carry.done)):
      stop = min(int(carry.step) + max(1, chunk), limit)
      carry = _decode_loop(model, sampling, eos_id, variables, carry, jnp.asarray(stop, jnp.int32))
      tokens, lengths = np.asarray(carry.tokens), np.asarray(carry.lengths)
      stream([tokens[i, shown[i] : lengths[i]] for i in range(b)])
      shown = lengths.astype(np.int64)
  return DecodeResult(np.asarray(carry.tokens), np.asarray(carry.lengths), carry.state)


def generate_text(
  model: Cheers,
  variables,
  prompts: Sequence[np.ndarray],
  images: Optional[Sequence[Sequence[np.ndarray]]] = None,
  max_new_tokens: int = 256,
  sampling: SamplingConfig = SamplingConfig(),
  seed: int = 0,
  cache_len: Optional[int] = None,
  max_len: Optional[int] = None,
  bucket: int = 64,
  x0: Optional[np.ndarray] = None,
  dummy_seeds: Optional[Sequence[int]] = None,
  stream: Optional[Callable[[list[np.ndarray]], None]] = None,
  eos_id: Optional[int] = EOS_TOKEN_ID,
) -> list[np.ndarray]:
  """Prompts (ids with placeholders) + their images -> new ids per sample (understanding / chat).

  cache_len: static cache size (default: padded prompt + max_new_tokens, rounded up to `bucket`, at
  most max_len). A prompt or budget that does not fit raises GenerationError.
  """
  limit = cache_len if cache_len is not None else max_len
  batch = prepare_prompts(
    model.cfg, prompts, images, dummy_seeds=dummy_seeds, bucket=bucket, max_len=limit, reserve=max_new_tokens
  )
  needed = batch.seq_len + max_new_tokens
  if cache_len is None:
    cache_len = round_up(needed, bucket) if limit is None else min(round_up(needed, bucket), limit)
  state = prefill(model, variables, batch, cache_len, x0)
  result = decode(
    model,
    variables,
    state,
    max_new_tokens,
    sampling,
    jax.random.PRNGKey(seed),
    eos_id,
    prompt_tokens=text_ids(batch.layout),
    stream=stream,
  )
  return result.ids()
