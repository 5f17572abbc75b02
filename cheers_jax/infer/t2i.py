"""Text-to-image and image editing: the image half of the reference `Cheers.generate`.

The conditional and unconditional (CFG) prompts are prefilled as ONE batch of 2B rows, each with its
image (the dummy noise image for plain T2I, the source image for editing) at t = 1. Then an Euler ODE
runs in one `lax.scan` inside one jit: each step decodes x_t through the tokenizer path ONCE
(`vae_decoder_projector` -> SigLIP -> und projector; x_t is the same for cond and uncond), writes the N
image tokens into the N cache slots after the prompt (overwritten every step; the prompt's keys are
computed once), runs the LLM and the CFM head on the 2B rows and combines
v = v_u + s (v_c - v_u). Steps: t_i = shift(linspace(0, 1, N)), x <- x + v (t_{i+1} - t_i), and at the
last point (t = 1) one extra step of 1/N: final = x(1) + v(1) / N. The cache then holds the image tokens
of x(1) (as the reference keeps them); `<im_end>` is appended and text decoding may continue on the
conditional rows. The final latent goes through `vae_model.decode`, clamped to [0, 1].

Editing: z = 0.1 encode(src) + 0.9 noise, steps = int(0.9 N), t_i = shift(linspace(0.1, 1, steps)), last
step 1/steps; the source image is also in the prompt as an understanding image.

Differences from the reference, on purpose: prompts of unequal length batch correctly (per-sample
positions and a cache validity mask, see decode.py; the reference drops the shorter prompts'
<im_start> and lets image tokens attend to padding), the latent is integrated in fp32 even when the
model runs in bf16, and text after the image uses only the conditional rows (the reference also
samples unconditional text, which only matters for a second image; one image per call here).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from cheers_jax.data.tokenizer import IM_END_ID, IM_START_ID, UND_IMAGE_TEXT, CheersTokenizer, uncond_ids
from cheers_jax.infer.decode import (
  GREEDY,
  DecodeState,
  GenerationError,
  SamplingConfig,
  _feed,
  _prefill,
  decode,
  prefill,
  prepare_prompts,
  round_up,
  text_ids,
)
from cheers_jax.model.cheers import Cheers

Array = jax.Array

EDIT_START_T = 0.1  # the reference's editing starts from 10 % source latent


def shift_time(t: np.ndarray, alpha: float) -> np.ndarray:
  """shift(t) = a t / (1 + (a - 1) t), in fp32 as the reference computes it."""
  t = np.asarray(t, np.float32)
  a = np.float32(alpha)
  return (a * t / (np.float32(1.0) + (a - np.float32(1.0)) * t)).astype(np.float32)


def _schedule(start: float, steps: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  t = shift_time(np.linspace(start, 1.0, steps, dtype=np.float64).astype(np.float32), alpha)
  dt = np.append(np.diff(t), np.float32(1.0 / steps)).astype(np.float32)  # last: the extra 1/N step at t = 1
  return t, dt


def t2i_schedule(steps: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """(t at each velocity evaluation, step size after it), both (steps,) fp32."""
  return _schedule(0.0, steps, alpha)


def edit_steps(steps: int, start_t: float = EDIT_START_T) -> int:
  """The reference's int(N * (1 - start_t)) (72 for N = 80)."""
  return int(steps * (1 - start_t))


def edit_schedule(steps: int, alpha: float, start_t: float = EDIT_START_T) -> tuple[np.ndarray, np.ndarray]:
  """Editing: int(0.9 N) evaluations over shift(linspace(0.1, 1, .)), last step 1/that."""
  return _schedule(start_t, edit_steps(steps, start_t), alpha)


def t2i_prompt(tokenizer: CheersTokenizer, text: str) -> np.ndarray:
  """The T2I prompt of Inference/T2I.py: chat template + `<im_start>`."""
  return tokenizer.build_prompt(text, add_im_start=True)


def edit_prompt(tokenizer: CheersTokenizer, instruction: str) -> np.ndarray:
  """An editing prompt: the source image as an understanding image, the instruction, `<im_start>`."""
  return tokenizer.build_prompt(f"{UND_IMAGE_TEXT}\n{instruction}", add_im_start=True)


@dataclasses.dataclass
class ImageResult:
  images: np.ndarray  # (B, H, W, 3) in [0, 1]
  image_raw: np.ndarray  # (B, H, W, 3) vae_model.decode output, unclamped
  latent: np.ndarray  # (B, h, w, C): the final latent
  generated_ids: list[np.ndarray]  # per sample: <im_end>, then the text decoded after the image
  step_t: np.ndarray  # (steps,) t of each velocity evaluation
  trace: Optional[dict] = None  # with record=True: x_t, v_cond, v_uncond (steps, B, h, w, C), gate (steps, B, h, w)


def _guided_velocity(
  m: Cheers, x: Array, t: Array, cache: dict, slot: Array, positions: Array, mask: Array, use_cfg: bool
) -> dict:
  """Velocity of x_t for the cond rows (and the uncond rows after them), tokenizer path run once."""
  tok = m.image_tokens(x)
  tokens, pixel_hat = tok["tokens"], tok["pixel_hat"]
  if use_cfg:
    tokens, pixel_hat = (jnp.concatenate([a, a]) for a in (tokens, pixel_hat))
  hidden, cache = m.llm(tokens, positions, mask, cache, slot)
  t1, t2 = m.times(m.quantise_t(jnp.full((tokens.shape[0],), t, jnp.float32)))
  head = m.velocity(hidden, t1, t2, pixel_hat)
  return {"velocity": head["velocity"], "gate": head["gate"], "cache": cache}


@functools.partial(jax.jit, static_argnames=("model", "use_cfg", "record"))
def _sample(
  model: Cheers,
  variables,
  state: DecodeState,
  x: Array,
  t_list: Array,
  dt_list: Array,
  cfg_scale: Array,
  use_cfg: bool,
  record: bool,
):
  """The ODE (one scan), then <im_end> on the cond rows and the VAE decode of the final latent."""
  b, n = x.shape[0], model.cfg.tokens_per_image
  slot = state.cache_index
  idx = jnp.arange(state.kv_valid.shape[1])
  kv_valid = state.kv_valid | ((idx >= slot) & (idx < slot + n))[None]
  rows = kv_valid.shape[0]
  mask = jnp.broadcast_to(kv_valid[:, None, :], (rows, n, kv_valid.shape[1]))
  positions = state.next_position[:, None] + jnp.arange(n, dtype=jnp.int32)[None]

  def step(carry, schedule):
    x, cache = carry
    t, dt = schedule
    out = model.apply(variables, x, t, cache, slot, positions, mask, use_cfg, method=_guided_velocity)
    v_all = out["velocity"].astype(jnp.float32)
    if use_cfg:
      v_cond, v_uncond = v_all[:b], v_all[b:]
      v = v_uncond + cfg_scale * (v_cond - v_uncond)
    else:
      v_cond = v = v_all
      v_uncond = jnp.zeros_like(v_all)
    trace = {"x_t": x, "v_cond": v_cond, "v_uncond": v_uncond, "gate": out["gate"][:b]} if record else {}
    return (x + v * dt, out["cache"]), trace

  (latent, cache), trace = jax.lax.scan(step, (x.astype(jnp.float32), state.cache), (t_list, dt_list))
  cond = DecodeState(
    {k: v[:, :b] for k, v in cache.items()}, kv_valid[:b], state.next_position[:b] + n, slot + n, state.hidden[:b]
  )
  cond = model.apply(variables, cond, jnp.full((b,), IM_END_ID, jnp.int32), method=_feed)
  image_raw = model.apply(variables, latent, method=Cheers.decode).astype(jnp.float32)
  return latent, image_raw, trace, cond


@functools.partial(jax.jit, static_argnames=("model",))
def _edit_latent(model: Cheers, variables, sources: Array, noise: Array, start_t: float) -> Array:
  z = model.apply(variables, sources, method=Cheers.encode).astype(jnp.float32)
  return start_t * z + (1 - start_t) * noise


@functools.partial(jax.jit, static_argnames=("shape",))
def _noise_of_seeds(seeds: Array, shape: tuple[int, ...]) -> Array:
  # vmap draws what a loop of jax.random.normal(PRNGKey(seed)) would (tests/infer/test_t2i.py), in one program:
  # the loop cost 2.6 s for the demo's 144 images on 2 CPU cores
  return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32))(seeds)


def latent_noise(model: Cheers, seeds: Sequence[int]) -> np.ndarray:
  """One N(0, 1) latent per seed: (B, h, w, C), independent of the batch it is drawn in."""
  side = model.cfg.vision.image_size // model.cfg.vision.patch_size
  shape = (side, side, model.cfg.vae.latent_channels)
  if not len(seeds):
    return np.zeros((0, *shape), np.float32)
  return np.asarray(_noise_of_seeds(np.asarray([int(s) for s in seeds], np.int32), shape))


def _generate(
  model: Cheers,
  variables,
  prompts: Sequence[np.ndarray],
  images: Sequence[Sequence[np.ndarray]],
  t_list: np.ndarray,
  dt_list: np.ndarray,
  init_latent,
  noise: Optional[np.ndarray],
  seeds: Optional[Sequence[int]],
  cfg_scale: Optional[float],
  prefix_x0: Optional[np.ndarray],
  max_new_tokens: int,
  sampling: SamplingConfig,
  record: bool,
  bucket: int,
  max_len: Optional[int],
) -> ImageResult:
  cfg = model.cfg
  n_tok = cfg.tokens_per_image
  prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  if not prompts:
    raise GenerationError("no prompts given")
  # an image starts right after <im_start> (the reference's trigger); add it where missing
  prompts = [p if p.size and p[-1] == IM_START_ID else np.append(p, IM_START_ID) for p in prompts]
  b = len(prompts)
  seeds = list(range(b)) if seeds is None else [int(s) for s in seeds]
  if len(seeds) != b:
    raise GenerationError(f"{b} prompts but {len(seeds)} seeds")
  if cfg_scale is not None and not 0.0 <= float(cfg_scale) < float("inf"):  # NaN would give a black image
    raise GenerationError(f"cfg_scale={cfg_scale} must be a finite number >= 0 (1 or None turns guidance off)")
  use_cfg = cfg_scale is not None and float(cfg_scale) != 1.0
  rows, row_images, row_seeds = list(prompts), list(images), list(seeds)
  if use_cfg:
    rows += [uncond_ids(p) for p in prompts]
    row_images, row_seeds = row_images * 2, row_seeds * 2
  after = n_tok + 1 + max_new_tokens  # the image, <im_end>, the text
  batch = prepare_prompts(cfg, rows, row_images, dummy_seeds=row_seeds, bucket=bucket, max_len=max_len, reserve=after)
  cache_len = round_up(batch.seq_len + after, bucket)
  if max_len is not None:
    cache_len = min(cache_len, max_len)
  state = prefill(model, variables, batch, cache_len, prefix_x0)
  if noise is None:
    noise = latent_noise(model, seeds)
  noise = jnp.asarray(noise, jnp.float32)
  x = init_latent(noise)
  latent, image_raw, trace, cond = _sample(
    model,
    variables,
    state,
    x,
    jnp.asarray(t_list),
    jnp.asarray(dt_list),
    jnp.asarray(cfg_scale if use_cfg else 1.0, jnp.float32),
    use_cfg,
    record,
  )
  generated = [np.array([IM_END_ID], np.int64) for _ in range(b)]
  if max_new_tokens > 0:
    text = decode(
      model,
      variables,
      cond,
      max_new_tokens,
      sampling,
      jax.random.PRNGKey(seeds[0]),
      prompt_tokens=text_ids(batch.layout)[:b],
    )
    generated = [np.concatenate([g, ids.astype(np.int64)]) for g, ids in zip(generated, text.ids())]
  image_raw = np.asarray(image_raw)
  trace_np = None
  if record:
    side = latent.shape[1:3]
    trace_np = {k: np.asarray(v) for k, v in trace.items()}
    trace_np["gate"] = trace_np["gate"].reshape(trace_np["gate"].shape[:2] + tuple(side))
  return ImageResult(
    np.clip(image_raw, 0.0, 1.0), image_raw, np.asarray(latent), generated, np.asarray(t_list), trace_np
  )


def _check_flow_args(steps: int, alpha: float) -> None:
  if int(steps) != steps or steps < 1:
    raise GenerationError(f"steps={steps}: need at least 1 denoising step (the published default is 80)")
  if not 0 < alpha < float("inf"):
    raise GenerationError(f"shift alpha={alpha} must be > 0 (the published default is 0.5)")


def text_to_image(
  model: Cheers,
  variables,
  prompts: Sequence[np.ndarray],
  *,
  steps: int = 80,
  cfg_scale: Optional[float] = 9.5,
  alpha: float = 0.5,
  seeds: Optional[Sequence[int]] = None,
  noise: Optional[np.ndarray] = None,
  images: Optional[Sequence[Sequence[np.ndarray]]] = None,
  prefix_x0: Optional[np.ndarray] = None,
  max_new_tokens: int = 0,
  sampling: SamplingConfig = GREEDY,
  record: bool = False,
  bucket: int = 64,
  max_len: Optional[int] = None,
) -> ImageResult:
  """Prompt ids (ending with <im_start>; added if missing) -> images. Defaults are the published ones.

  seeds[b] draws sample b's latent noise (`latent_noise`) and its dummy prompt image, so a sample does
  not depend on the batch it is in; noise (B, h, w, C) overrides the latent noise. images[b] replaces
  sample b's dummy image (e.g. the reference's own). cfg_scale None or 1 turns CFG off.
  prefix_x0: (2B or B, h, w, C) flow noise of the prompt images (irrelevant at t = 1).
  max_new_tokens: text tokens decoded after `<im_end>` (the reference's max_length - N + 1).
  A row's image depends only on its prompt, its seed, the padded prompt length (the longest prompt
  rounded up to `bucket`) and the batch size, never on the other rows' prompts.
  """
  _check_flow_args(steps, alpha)
  t_list, dt_list = t2i_schedule(int(steps), alpha)
  images = images if images is not None else [[] for _ in prompts]
  return _generate(
    model,
    variables,
    prompts,
    images,
    t_list,
    dt_list,
    lambda z: z,
    noise,
    seeds,
    cfg_scale,
    prefix_x0,
    max_new_tokens,
    sampling,
    record,
    bucket,
    max_len,
  )


def edit_images(
  model: Cheers,
  variables,
  prompts: Sequence[np.ndarray],
  sources: np.ndarray,
  *,
  steps: int = 80,
  cfg_scale: Optional[float] = 9.5,
  alpha: float = 0.5,
  seeds: Optional[Sequence[int]] = None,
  noise: Optional[np.ndarray] = None,
  start_t: float = EDIT_START_T,
  max_new_tokens: int = 0,
  sampling: SamplingConfig = GREEDY,
  record: bool = False,
  bucket: int = 64,
  max_len: Optional[int] = None,
) -> ImageResult:
  """Edits sources (B, H, W, 3), preprocessed for understanding, following prompts that hold one
  `<image>` placeholder each (`edit_prompt`)."""
  _check_flow_args(steps, alpha)
  if edit_steps(int(steps), start_t) < 1:
    raise GenerationError(f"steps={steps} gives int({steps} * {1 - start_t:g}) = 0 editing steps: use at least 2")
  t_list, dt_list = edit_schedule(int(steps), alpha, start_t)
  sources = np.asarray(sources, np.float32)
  if len(sources) != len(prompts):
    raise GenerationError(f"{len(prompts)} prompts but {len(sources)} source images")
  src = jnp.asarray(sources)
  init = lambda z: _edit_latent(model, variables, src, z, start_t)
  return _generate(
    model,
    variables,
    prompts,
    [[s] for s in sources],
    t_list,
    dt_list,
    init,
    noise,
    seeds,
    cfg_scale,
    None,
    max_new_tokens,
    sampling,
    record,
    bucket,
    max_len,
  )


def text_to_image_per_device(
  model: Cheers,
  variables,
  prompts: Sequence[np.ndarray],
  seeds: Sequence[int],
  mesh: Mesh,
  *,
  steps: int,
  cfg_scale: float,
  alpha: float,
  bucket: int = 64,
) -> np.ndarray:
  """Plain T2I with guidance (cond and uncond rows; no text after the image), data parallel over `mesh`'s
  data axis: each device's len(prompts) / devices rows are assembled as their own batch (their cond
  rows, then their uncond rows) and the prefill and the ODE run under shard_map, so every device runs
  the one-device computation on its own rows, and an image depends only on its prompt, its seed, the
  padded length and the per-device batch. All prompts must pad to one length (round_up(longest, bucket)).
  Returns the raw decoder output (B, H, W, 3). (XLA:CPU's fake devices still compile it a little
  differently per device count: last-bit differences, docs/evaluation.md.)"""
  _check_flow_args(steps, alpha)
  devices = mesh.shape["data"]
  if len(prompts) % devices or mesh.size != devices:
    raise GenerationError(
      f"{len(prompts)} prompts over a {dict(mesh.shape)} mesh: need a pure data mesh whose size divides the batch"
    )
  if not 0.0 <= float(cfg_scale) < float("inf"):
    raise GenerationError(f"cfg_scale={cfg_scale} must be a finite number >= 0")
  n_tok, per = model.cfg.tokens_per_image, len(prompts) // devices
  prompts = [
    p if p.size and p[-1] == IM_START_ID else np.append(p, IM_START_ID)
    for p in (np.asarray(p, np.int64).reshape(-1) for p in prompts)
  ]
  seq_len = round_up(max(len(p) for p in prompts) + n_tok, bucket)  # a T2I prompt gets the dummy image prepended
  groups = []
  for d in range(devices):
    rows, row_seeds = prompts[d * per : (d + 1) * per], [int(s) for s in seeds[d * per : (d + 1) * per]]
    groups.append(
      prepare_prompts(model.cfg, rows + [uncond_ids(p) for p in rows], dummy_seeds=row_seeds * 2, seq_len=seq_len)
    )
  batch = {k: np.stack([g.batch[k] for g in groups]) for k in groups[0].batch}
  lengths = np.stack([g.lengths for g in groups])
  noise = latent_noise(model, seeds)
  noise = noise.reshape((devices, per) + noise.shape[1:])
  t_list, dt_list = t2i_schedule(int(steps), alpha)
  cache_len = round_up(seq_len + n_tok + 1, bucket)
  raw = _sample_per_device(
    model,
    mesh,
    cache_len,
    variables,
    batch,
    lengths,
    noise,
    jnp.asarray(t_list),
    jnp.asarray(dt_list),
    jnp.asarray(cfg_scale, jnp.float32),
  )
  return np.asarray(raw).reshape((len(prompts),) + raw.shape[2:])


@functools.partial(jax.jit, static_argnames=("model", "mesh", "cache_len"))
def _sample_per_device(
  model: Cheers, mesh: Mesh, cache_len: int, variables, batch, lengths, noise, t_list, dt_list, cfg_scale
):
  def one_device(variables, batch, lengths, noise, t_list, dt_list, cfg_scale):
    batch = {k: v[0] for k, v in batch.items()}
    x0 = jnp.zeros((batch["pixels"].shape[0],) + noise.shape[2:], jnp.float32)  # irrelevant at t = 1
    state = _prefill(model, cache_len, variables, batch, x0, lengths[0])
    _, image_raw, _, _ = _sample(model, variables, state, noise[0], t_list, dt_list, cfg_scale, True, False)
    return image_raw[None]

  rows = P("data")
  return jax.shard_map(
    one_device, mesh=mesh, in_specs=(P(), rows, rows, rows, P(), P(), P()), out_specs=rows, check_vma=False
  )(variables, batch, lengths, noise, t_list, dt_list, cfg_scale)
