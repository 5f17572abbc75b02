r"""Tiny parts made by the project: the embedded default's VAE and ViT, pretrained on drawn shapes.

The paper's stage 1 starts from pretrained parts (FLUX.2 VAE, SigLIP2, Qwen2.5). The embedded default
(`cheers_jax.config.tiny`) starts the same way from parts this module makes:

  python -m cheers_jax.train.tiny_parts --out parts        # a VAE and a ViT, 1000 steps each
  python -m cheers_jax.train.tiny_parts --out parts2 --parts siglip --vae parts/vae \
    --siglip_init parts/siglip --siglip_steps 2000 --seed 1   # the shipped ViT: 2000 steps more

- vae: the VAE (encoder + decoder of `cheers_jax.model.vae`, the tiny config's shapes) is trained to
  reconstruct shapes: pixel MSE + 5 x the MSE of the chroma (each pixel minus its channel mean: the
  colour, a small part of the pixel error but all a caption needs); the decoder sees the latent with a
  little noise, so it stays smooth around the codes the flow head will sample. The shapes are drawn
  more widely than the training set's (any RGB colour, sizes 0.15-0.95 of the image, some without
  anti-aliasing). Its latent BatchNorm statistics are the latents' per-channel mean and variance, as a
  published VAE ships them. Measured (the tiny's 2-level VAE, an 8x8 latent): 1000 steps, reconstruction
  mse 0.0029 (pixel MSE alone, 800 steps: grey reconstructions, the colour lost by the GroupNorms).
- siglip: the tiny ViT (`cheers_jax.model.siglip`) is trained to tell the six colours and three shapes
  apart from VAE round-trip images (what Cheers' understanding path feeds it), through weight-decayed
  linear classifiers on its patch tokens. Measured: 1000 steps, held-out colour 100 %, shape 83 % (at
  patch 16 over a 3-level VAE: 73 %, the round trip blurred circles into rounded squares); 2000 steps
  more (the shipped ViT since 2026-12-04): shape 89 %, and the tiny run's captions name the shape 85 %
  of the time in place of 70 % at seed 3.
- the LLM is not made here: its 151,936-row embedding table (39 MB at hidden 64) is too big to ship.

Parts are written in the layouts `checkpoint/parts.py` reads (VAE: `ae.safetensors`, BFL names,
`config.json` with the Cheers VAE keys; SigLIP2: `model.safetensors`, `vision_model.*`, HF config.json),
matrices and kernels in bfloat16, vectors in float32 (1.9 + 0.2 MB), with a report.json of the command
and its figures. Everything is drawn from --seed; on another machine the bits may differ (XLA:CPU).
~13 min (VAE) + ~6 min (ViT) + ~14 min (the ViT's 2000 steps more) on 2 cores.

Opt-in (not in the shipped parts): --readout_weight / --siglip_readout_weight train the decoder's images and
the ViT's patch embeddings to keep the noisy latent x_t (a linear read-out per patch), the flow head's only
view of it; --vae_init / --siglip_init start the VAE / ViT from a part. Measured in docs/tiny_recipe.md
(read-out R^2 at t = 0.1: 0.17 -> 0.54; the FM loss of the tiny run 1.33 -> 0.96), ~5 s per VAE step and
~1.4 s per ViT step.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from cheers_jax import cli, package_data
from cheers_jax import config as config_lib
from cheers_jax.checkpoint import parts as parts_lib
from cheers_jax.checkpoint import safetensors_io as st
from cheers_jax.checkpoint.hf import CONFIG_FILE, hf_tensor
from cheers_jax.demo import shapes as demo_shapes
from cheers_jax.errors import UserError
from cheers_jax.model.config import ModelConfig
from cheers_jax.model.siglip import SigLIP
from cheers_jax.model.vae import VAE, patchify, unpatchify

log = logging.getLogger(__name__)

ASSET_DIR = package_data.TINY_PARTS
SHAPES = demo_shapes.SHAPES


def draw_shapes(
  rng: np.random.Generator, count: int, image_size: int, palette: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images (count, S, S, 3) float32 in [0, 1], colour index, shape index): one shape of any size and
  position on a grey ground, of any RGB colour (colour index -1) or, with `palette`, one of the demo's
  six colours; 30 % drawn without anti-aliasing (hard edges)."""
  out = np.empty((count, image_size, image_size, 3), np.float32)
  colours, shapes = np.full(count, -1, np.int32), np.zeros(count, np.int32)
  palette_rgb = list(demo_shapes.COLOURS.values())
  for n in range(count):
    supersample = 4 if rng.random() < 0.7 else 1  # some hard edges
    background = int(rng.integers(170, 256))
    extent = rng.uniform(0.15, 0.95)
    x0, y0 = rng.uniform(0.0, 1.0 - extent, size=2)
    if palette:
      colours[n] = rng.integers(len(palette_rgb))
      fill = palette_rgb[colours[n]]
    else:
      fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    shapes[n] = rng.integers(len(SHAPES))
    image = demo_shapes.draw_shape(
      image_size, SHAPES[shapes[n]], (x0, y0, x0 + extent, y0 + extent), fill, background, supersample
    )
    out[n] = image.astype(np.float32) / 255.0
  return out, colours, shapes


def _reconstruct(vae: VAE, pixels, noise, noise_scale: float):
  """Encoder mean -> (+ noise scaled by the batch's latent std) -> decoder; and the latent."""
  z = vae.encoder(pixels)[..., : vae.cfg.z_channels]
  std = jax.lax.stop_gradient(jnp.std(z, axis=(0, 1, 2), keepdims=True))
  return vae.decoder(z + noise_scale * std * noise), z


def patch_rows(images, patch: int):
  """(n, H, W, C) -> (n, H/patch * W/patch, patch * patch * C): the pixels each ViT patch embedding reads."""
  n, h, w, c = images.shape
  x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def noisy_latents(z, noise, t):
  """x_t = t z + (1 - t) noise per image, as the flow head is trained (z normalised per channel)."""
  t = t[:, None, None, None]
  return t * z + (1 - t) * noise


def readout_error(features, targets, ridge: float = 1e-2):
  """Held-out error of the best linear read-out: (features (n, r, f), targets (n, r, c)) per image and row;
  an affine map is fitted in closed form (ridge) on the rows of the first half of the images and scored on
  the rest. Returns (mean squared error, R^2: the share of the targets' variance it explains). Differentiable,
  so a part can be trained to keep what a linear map must read (no read-out head to learn on the side)."""
  n = features.shape[0] // 2
  x = features.reshape(features.shape[0], -1, features.shape[-1]).astype(jnp.float32)
  x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), jnp.float32)], -1)
  y = targets.reshape(targets.shape[0], -1, targets.shape[-1]).astype(jnp.float32)
  fit_x, fit_y = x[:n].reshape(-1, x.shape[-1]), y[:n].reshape(-1, y.shape[-1])
  gram = fit_x.T @ fit_x
  scale = jnp.trace(gram) / gram.shape[0]
  w = jnp.linalg.solve(gram + ridge * scale * jnp.eye(gram.shape[0]), fit_x.T @ fit_y)
  test_y = y[n:].reshape(-1, y.shape[-1])
  error = jnp.mean(jnp.square(x[n:].reshape(-1, x.shape[-1]) @ w - test_y))
  return error, 1.0 - error / jnp.mean(jnp.var(test_y, axis=0))


def chroma(x):
  """The colour of each pixel without its brightness: x minus its channel mean."""
  return x - jnp.mean(x, axis=-1, keepdims=True)


def pretrain_vae(
  cfg: ModelConfig,
  image_size: int,
  *,
  steps: int = 1000,
  batch_size: int = 32,
  lr: float = 2e-3,
  noise_scale: float = 0.1,
  latent_l2: float = 1e-4,
  chroma_weight: float = 5.0,
  readout_weight: float = 0.0,
  stats_images: int = 1024,
  init: Optional[dict] = None,
  seed: int = 0,
  log_every: int = 50,
) -> tuple[dict, dict]:
  """Trains `VAE(cfg.vae)` (from `init`'s params when given) to reconstruct `draw_shapes` images.

  Returns (variables, report).

  readout_weight: the decoder is also trained so that a linear map of each ViT patch of its image recovers
  the latent cell it came from, for noisy latents x_t = t z + (1 - t) noise at every t. In Cheers the flow
  head sees x_t only as the decoder's image (through the ViT); a decoder that maps noise to saturated blobs
  leaves it blind at small t (a tiny VAE trained on reconstruction alone: R^2 0.28 at t = 0.1).

  variables: {'params': {encoder, decoder}, 'batch_stats': {'bn': running mean / var of the patchified
  latents}}. report: the final reconstruction MSE, per-image mean-colour error and read-out R^2 on fresh
  images.
  """
  vae = VAE(cfg.vae)
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  variables = init or vae.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  params = variables["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  side = image_size // 2 ** (len(cfg.vae.ch_mult) - 1)  # the encoder halves the image once per level but the last
  patch = 2 * image_size // side  # the pixels of one patchified latent cell (one ViT patch at the tiny shapes)
  latent_shape = (batch_size, side, side, cfg.vae.z_channels)
  state = {"vae": params}
  opt_state = tx.init(state)

  def decode_images(p, z):
    return vae.apply({"params": p}, z, method=lambda m, z: m.decoder(z))

  def read_noisy(st, z, noise, t):
    """How well a linear map of each patch of the decoder's image of x_t recovers x_t's latent cell (x_t
    per-channel normalised as the BatchNorm will): (error, R^2) of `readout_error`."""
    pz = jax.lax.stop_gradient(patchify(z))
    mean, std = jnp.mean(pz, axis=(0, 1, 2)), jnp.std(pz, axis=(0, 1, 2)) + 1e-6
    pz = jnp.tile(pz, (noise.shape[0] // pz.shape[0], 1, 1, 1))  # several noise draws per image: rows to fit
    x_t = noisy_latents((pz - mean) / std, noise, t)
    images = decode_images(st["vae"], unpatchify(x_t * std + mean))
    return readout_error(patch_rows(images, patch), x_t)

  def loss_fn(st, pixels, noise, read_noise, t):
    recon, z = vae.apply({"params": st["vae"]}, pixels, noise, noise_scale, method=_reconstruct)
    mse = jnp.mean(jnp.square(recon - pixels))
    # the shapes' colour is a small part of the pixel error but all of what captions need: weigh it up
    colour = jnp.mean(jnp.square(chroma(recon) - chroma(pixels)))
    read = read_noisy(st, z, read_noise, t)[0] if readout_weight else jnp.zeros(())
    loss = mse + chroma_weight * colour + latent_l2 * jnp.mean(jnp.square(z)) + readout_weight * read
    return loss, (mse, read)

  @jax.jit
  def step(st, o, pixels, noise, read_noise, t):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st, pixels, noise, read_noise, t)
    updates, o = tx.update(grads, o, st)
    return optax.apply_updates(st, updates), o, aux

  start = time.perf_counter()
  patched_shape = (2 * batch_size, side // 2, side // 2, cfg.vae.latent_channels)
  for i in range(steps):
    pixels = draw_shapes(rng, batch_size, image_size)[0]
    noise = jax.random.normal(jax.random.fold_in(key, i), latent_shape)  # as the shipped parts drew it
    k2, k3 = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), 1))
    read_noise, t = jax.random.normal(k2, patched_shape), jax.random.uniform(k3, (2 * batch_size,))
    state, opt_state, (mse, read) = step(state, opt_state, pixels, noise, read_noise, t)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
      log.info(
        "vae step %d/%d: reconstruction mse %.5f, read-out mse %.4f (%.0f s)",
        i + 1,
        steps,
        float(mse),
        float(read),
        time.perf_counter() - start,
      )
  params = state["vae"]

  encode = jax.jit(
    lambda p, x: patchify(vae.apply({"params": p}, x, method=lambda m, x: m.encoder(x))[..., : cfg.vae.z_channels])
  )
  latents = np.concatenate(
    [np.asarray(encode(params, draw_shapes(rng, 128, image_size)[0])) for _ in range(max(1, stats_images // 128))]
  ).reshape(-1, cfg.vae.latent_channels)
  stats = {"running_mean": latents.mean(0).astype(np.float32), "running_var": latents.var(0).astype(np.float32)}
  trained = {"params": params, "batch_stats": {"bn": stats}}

  test = draw_shapes(rng, 256, image_size)[0]
  recon = np.clip(np.asarray(jax.jit(lambda v, x: vae.apply(v, x))(trained, test)), 0.0, 1.0)
  report = {
    "steps": steps,
    "reconstruction_mse": float(np.mean(np.square(recon - test))),
    "mean_colour_abs_error": float(np.mean(np.abs(recon.mean((1, 2)) - test.mean((1, 2))))),
  }
  z = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=lambda m, x: m.encoder(x))[..., : cfg.vae.z_channels])(
    params, test
  )
  noise = jax.random.normal(jax.random.fold_in(key, steps + 1), (len(test),) + patched_shape[1:])
  for t in (0.1, 0.5, 0.9):
    report[f"readout_r2_t{t}"] = float(jax.jit(read_noisy)(state, z, noise, jnp.full((len(test),), t))[1])
  report["seconds"] = round(time.perf_counter() - start, 1)
  return trained, report


def _siglip_tokens(siglip: SigLIP, pixels):
  return siglip.encode(pixels)


def _siglip_embeddings(siglip: SigLIP, pixels):
  return siglip.embeddings(pixels)


def pretrain_siglip(
  cfg: ModelConfig,
  image_size: int,
  vae_variables: dict,
  *,
  steps: int = 1000,
  batch_size: int = 64,
  lr: float = 2e-3,
  head_decay: float = 1e-2,
  readout_weight: float = 0.0,
  init: Optional[dict] = None,
  seed: int = 0,
  log_every: int = 50,
) -> tuple[dict, dict]:
  """Trains the tiny ViT (`SigLIP(cfg.vision)`, from `init`'s params when given) to tell the six colours
  and three shapes apart.

  readout_weight: its patch embeddings are also trained to keep the noisy latent x_t (a linear read-out
  of each embedding recovers the latent cell under it) when they see the decoder's image of x_t, which is
  how the flow head's HiGate sees x_t in Cheers.

  Its inputs are what Cheers' understanding path gives it: drawn shapes after the VAE round trip
  (encoder -> decoder, as `vae_decoder_projector` starts out). Two linear classifiers (colour, shape)
  read the concatenated patch tokens (what the 2x2 pixel-unshuffle projector sees); their weight decay
  makes the tokens themselves carry the classes with a large margin, so the image token a random
  projector makes from them differs from image to image (a random ViT's tokens are nearly the same for
  every shape: the LLM then cannot read them). Returns ({'params'}, report with held-out accuracies).
  """
  siglip, vae = SigLIP(cfg.vision), VAE(cfg.vae)
  rng = np.random.default_rng(seed + 1)
  key = jax.random.PRNGKey(seed + 1)
  params = (init or siglip.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32)))["params"]
  width = cfg.vision.grid**2 * cfg.vision.hidden_size
  latent_channels = cfg.vae.latent_channels
  heads = {
    "colour": jax.random.normal(jax.random.fold_in(key, 1), (width, len(demo_shapes.COLOURS))) * 0.01,
    "shape": jax.random.normal(jax.random.fold_in(key, 2), (width, len(SHAPES))) * 0.01,
  }
  state = {"siglip": params, "heads": heads}
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = tx.init(state)
  round_trip = jax.jit(lambda x: jnp.clip(vae.apply(vae_variables, x), 0.0, 1.0))
  encode = jax.jit(lambda x: vae.apply(vae_variables, x, method=lambda m, x: m.encode(x)))
  decode = jax.jit(lambda z: vae.apply(vae_variables, z, method=lambda m, z: m.decode(z)))  # unclamped, as in the model

  def noisy_images(pixels, k):
    """x_t of the images' normalised latents at uniform t, and the decoder's (unclamped) images of them."""
    z = encode(pixels)
    k1, k2 = jax.random.split(k)
    x_t = noisy_latents(z, jax.random.normal(k1, z.shape), jax.random.uniform(k2, (z.shape[0],)))
    return decode(x_t), x_t.reshape(z.shape[0], -1, latent_channels)

  def read(st, images, x_t):
    return readout_error(siglip.apply({"params": st["siglip"]}, images, method=_siglip_embeddings), x_t)

  def logits(st, pixels):
    tokens = siglip.apply({"params": st["siglip"]}, pixels, method=_siglip_tokens)
    flat = tokens.reshape(tokens.shape[0], -1)
    return flat @ st["heads"]["colour"], flat @ st["heads"]["shape"]

  def loss_fn(st, pixels, colour, shape, noisy, x_t):
    lc, ls = logits(st, pixels)
    ce = (
      optax.softmax_cross_entropy_with_integer_labels(lc, colour).mean()
      + optax.softmax_cross_entropy_with_integer_labels(ls, shape).mean()
    )
    readout = read(st, noisy, x_t)[0] if readout_weight else jnp.zeros(())
    decay = sum(jnp.sum(jnp.square(w)) for w in st["heads"].values())
    return ce + readout_weight * readout + head_decay * decay, (ce, readout)

  @jax.jit
  def step(st, o, pixels, colour, shape, noisy, x_t):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st, pixels, colour, shape, noisy, x_t)
    updates, o = tx.update(grads, o, st)
    return optax.apply_updates(st, updates), o, aux

  start = time.perf_counter()
  for i in range(steps):
    pixels, colour, shape = draw_shapes(rng, batch_size, image_size, palette=True)
    if readout_weight:
      noisy, x_t = noisy_images(pixels, jax.random.fold_in(key, 10 + i))
    else:
      noisy = x_t = jnp.zeros((1,))  # unused
    state, opt_state, (ce, readout) = step(state, opt_state, round_trip(pixels), colour, shape, noisy, x_t)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
      log.info(
        "siglip step %d/%d: colour + shape cross-entropy %.4f, read-out mse %.4f (%.0f s)",
        i + 1,
        steps,
        float(ce),
        float(readout),
        time.perf_counter() - start,
      )
  pixels, colour, shape = draw_shapes(rng, 512, image_size, palette=True)
  lc, ls = jax.jit(logits)(state, round_trip(pixels))
  report = {
    "steps": steps,
    "colour_acc": float(np.mean(np.argmax(lc, -1) == colour)),
    "shape_acc": float(np.mean(np.argmax(ls, -1) == shape)),
  }
  z = encode(pixels)
  for t in (0.1, 0.5, 0.9):
    x_t = noisy_latents(z, jax.random.normal(jax.random.fold_in(key, 5), z.shape), jnp.full((len(z),), t))
    report[f"readout_r2_t{t}"] = float(jax.jit(read)(state, decode(x_t), x_t.reshape(len(z), -1, latent_channels))[1])
  report["seconds"] = round(time.perf_counter() - start, 1)
  return {"params": state["siglip"]}, report


PART_FILES = {"vae": parts_lib.VAE_FILE, "siglip": "model.safetensors"}


def part_tensors(part: str, wrapped: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The part's published-layout tensors (`parts.part_layouts(cfg)[part]` names) from Cheers-shaped
  variables: matrices and kernels in bfloat16, vectors (biases, norms, BN statistics) in float32."""
  out = {}
  for name in parts_lib.part_layouts(cfg)[part]:
    if name.endswith(parts_lib.COUNTER):
      continue
    x = np.asarray(hf_tensor(wrapped, parts_lib.cheers_source_name(part, name)), np.float32)
    out[name] = np.ascontiguousarray(x.astype(ml_dtypes.bfloat16) if x.ndim > 1 else x)
  return out


def write_part(part: str, wrapped: dict, cfg: ModelConfig, out_dir: Path, report: Optional[dict] = None) -> Path:
  """Writes the part's tensors + `config.json` (+ `report.json`) into out_dir/PART; returns that folder."""
  part_dir = Path(out_dir) / part
  part_dir.mkdir(parents=True, exist_ok=True)
  st.save_file(part_tensors(part, wrapped, cfg), part_dir / PART_FILES[part], {"format": "pt"})
  (part_dir / CONFIG_FILE).write_text(json.dumps(parts_lib.part_config(part, cfg), indent=2) + "\n")
  if report is not None:
    (part_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  return part_dir


def write_vae_part(variables: dict, cfg: ModelConfig, out_dir: Path, report: Optional[dict] = None) -> Path:
  """A `VAE` module's variables as the FLUX.2-layout part in out_dir/vae."""
  wrapped = {"params": {"vae_model": variables["params"]}, "batch_stats": {"vae_model": variables["batch_stats"]}}
  return write_part("vae", wrapped, cfg, out_dir, report)


def write_siglip_part(variables: dict, cfg: ModelConfig, out_dir: Path, report: Optional[dict] = None) -> Path:
  """A `SigLIP` module's params as the SigLIP2-layout part (`vision_model.*`) in out_dir/siglip."""
  return write_part("siglip", {"params": {"vision_representation": variables["params"]}}, cfg, out_dir, report)


def tiny_model_config(config_name: str = "tiny", overrides: Sequence[str] = ()) -> tuple[ModelConfig, int]:
  config = config_lib.load(config_name, ["init_from="] + list(overrides))
  return config_lib.model_config(config), int(config.data.image_size)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  parser = cli.ArgumentParser(prog="python -m cheers_jax.train.tiny_parts", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder to write the parts into (OUT/vae, OUT/siglip)")
  parser.add_argument("--config", default="tiny", help="the run config whose model shapes the parts take")
  parser.add_argument("--parts", default="vae,siglip", help="which parts to make: vae, siglip or vae,siglip")
  parser.add_argument(
    "--vae",
    default=str(ASSET_DIR / "vae"),
    help="the VAE part the SigLIP pretraining reads images through when --parts has no vae (default: the shipped one)",
  )
  parser.add_argument(
    "--vae_init", default="", help="a VAE part folder to start the VAE from (default: random weights)"
  )
  parser.add_argument(
    "--siglip_init", default="", help="a SigLIP part folder to start the ViT from (default: random weights)"
  )
  parser.add_argument("--steps", type=int, default=1000, help="VAE steps")
  parser.add_argument("--siglip_steps", type=int, default=1000, help="ViT steps")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--chroma_weight", type=float, default=5.0)
  parser.add_argument(
    "--readout_weight",
    type=float,
    default=0.0,
    help="VAE: weight of the per-patch linear read-out of noisy latents from the decoder's images",
  )
  parser.add_argument(
    "--siglip_readout_weight",
    type=float,
    default=0.0,
    help="ViT: weight of the linear read-out of noisy latents from its patch embeddings",
  )
  parser.add_argument(
    "--stats_images", type=int, default=1024, help="images the latent BatchNorm statistics are taken over"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE (repeatable)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  return _make(args)


def load_vae_variables(part_dir: Path, cfg: ModelConfig) -> dict:
  """A VAE part as the variables of a `VAE` module."""
  v = parts_lib.load_parts({"vae": part_dir}, cfg, jax.random.PRNGKey(0))
  return {"params": v["params"]["vae_model"], "batch_stats": v["batch_stats"]["vae_model"]}


def load_siglip_variables(part_dir: Path, cfg: ModelConfig) -> dict:
  """A SigLIP part as the variables of a `SigLIP` module."""
  v = parts_lib.load_parts({"siglip": part_dir}, cfg, jax.random.PRNGKey(0))
  return {"params": v["params"]["vision_representation"]}


def _make(args) -> int:
  cfg, image_size = tiny_model_config(args.config, args.set)
  which = [p.strip() for p in args.parts.split(",") if p.strip()]
  if not which or any(p not in ("vae", "siglip") for p in which):
    raise UserError(f"--parts {args.parts!r}: give vae, siglip or vae,siglip")
  command = (
    "python -m cheers_jax.train.tiny_parts --out OUT --config {} --parts {} --steps {} --siglip_steps {} "
    "--batch_size {} --lr {} --chroma_weight {} --readout_weight {} --siglip_readout_weight {} --seed {}{}".format(
      args.config,
      args.parts,
      args.steps,
      args.siglip_steps,
      args.batch_size,
      args.lr,
      args.chroma_weight,
      args.readout_weight,
      args.siglip_readout_weight,
      args.seed,
      f" --vae_init {args.vae_init}" if args.vae_init else "",
    )
    + (f" --siglip_init {args.siglip_init}" if args.siglip_init else "")
    + "".join(f" --set {x}" for x in args.set)
  )
  if "vae" in which:
    vae_variables, report = pretrain_vae(
      cfg,
      image_size,
      steps=args.steps,
      batch_size=args.batch_size,
      lr=args.lr,
      chroma_weight=args.chroma_weight,
      readout_weight=args.readout_weight,
      stats_images=args.stats_images,
      init=load_vae_variables(Path(args.vae_init), cfg) if args.vae_init else None,
      seed=args.seed,
    )
    part_dir = write_vae_part(vae_variables, cfg, Path(args.out), {**report, "command": command})
    print(
      f"wrote {part_dir} (reconstruction mse {report['reconstruction_mse']:.5f}, mean-colour error "
      f"{report['mean_colour_abs_error']:.4f})",
      flush=True,
    )
  else:
    vae_variables = load_vae_variables(Path(args.vae), cfg)
  if "siglip" in which:
    variables, report = pretrain_siglip(
      cfg,
      image_size,
      vae_variables,
      steps=args.siglip_steps,
      readout_weight=args.siglip_readout_weight,
      init=load_siglip_variables(Path(args.siglip_init), cfg) if args.siglip_init else None,
      seed=args.seed,
    )
    part_dir = write_siglip_part(variables, cfg, Path(args.out), {**report, "command": command})
    print(f"wrote {part_dir} (held-out colour {report['colour_acc']:.0%}, shape {report['shape_acc']:.0%})", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
