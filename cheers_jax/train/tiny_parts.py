r"""Tiny parts made by the project: the embedded default's VAE, pretrained as an autoencoder on shapes.

The paper's stage 1 starts from pretrained parts (FLUX.2 VAE, SigLIP2, Qwen2.5). The embedded default
(`cheers_jax.config.tiny`) starts the same way from parts this module makes:

  python -m cheers_jax.train.tiny_parts --out cheers_jax/assets/tiny_parts   # regenerates the shipped part

- the VAE (encoder + decoder of `cheers_jax.model.vae`, the tiny config's shapes) is trained to
  reconstruct coloured shapes (pixel MSE; the decoder sees the latent with a little noise, so it stays
  smooth around the codes the flow head will sample). The shapes are drawn more widely than the
  training set's (any RGB colour, sizes 0.15-0.95 of the image, some without anti-aliasing), so the
  part is not tied to the six colours. A random VAE's GroupNorms discard each image's colour; a trained
  one keeps it in the latent (the reconstruction error says so).
- its latent BatchNorm statistics are the latents' per-channel mean and variance over training
  images, as a published VAE ships them (`bn.running_mean`, `bn.running_var`).

The part is written in the FLUX.2 layout `checkpoint/parts.py` reads (`ae.safetensors`, BFL names,
`config.json` with the Cheers VAE keys), matrices and kernels in bfloat16, vectors in float32 (~2 MB).
Everything is a function of --seed: the command reproduces the shipped files.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from PIL import Image, ImageDraw

from cheers_jax.checkpoint import parts as parts_lib
from cheers_jax.checkpoint import safetensors_io as st
from cheers_jax.checkpoint.hf import CONFIG_FILE, hf_tensor
from cheers_jax.model.config import ModelConfig
from cheers_jax.model.vae import VAE, patchify

log = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_parts"
SHAPES = ("circle", "square", "triangle")


def draw_shapes(rng: np.random.Generator, count: int, image_size: int) -> np.ndarray:
  """(count, S, S, 3) float32 in [0, 1]: one shape of any colour, size and position on a grey ground."""
  out = np.empty((count, image_size, image_size, 3), np.float32)
  for n in range(count):
    supersample = 4 if rng.random() < 0.7 else 1  # some hard edges
    big = image_size * supersample
    canvas = Image.new("RGB", (big, big), (int(rng.integers(170, 256)),) * 3)
    draw = ImageDraw.Draw(canvas)
    extent = rng.uniform(0.15, 0.95)
    x0, y0 = rng.uniform(0.0, 1.0 - extent, size=2) * big
    x1, y1 = x0 + extent * big, y0 + extent * big
    fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    shape = SHAPES[rng.integers(len(SHAPES))]
    if shape == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
      draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    if supersample > 1:
      canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    out[n] = np.asarray(canvas, np.float32) / 255.0
  return out


def _reconstruct(vae: VAE, pixels, noise, noise_scale: float):
  """Encoder mean -> (+ noise scaled by the batch's latent std) -> decoder; and the latent."""
  z = vae.encoder(pixels)[..., : vae.cfg.z_channels]
  std = jax.lax.stop_gradient(jnp.std(z, axis=(0, 1, 2), keepdims=True))
  return vae.decoder(z + noise_scale * std * noise), z


def chroma(x):
  """The colour of each pixel without its brightness: x minus its channel mean."""
  return x - jnp.mean(x, axis=-1, keepdims=True)


def pretrain_vae(cfg: ModelConfig, image_size: int, *, steps: int = 1500, batch_size: int = 32, lr: float = 2e-3,
                 noise_scale: float = 0.1, latent_l2: float = 1e-4, chroma_weight: float = 5.0,
                 stats_images: int = 1024, seed: int = 0, log_every: int = 50) -> tuple[dict, dict]:
  """Trains `VAE(cfg.vae)` to reconstruct `draw_shapes` images; returns (variables, report).

  variables: {'params': {encoder, decoder}, 'batch_stats': {'bn': running mean / var of the patchified
  latents}}. report: the final reconstruction MSE and per-image mean-colour error on fresh images.
  """
  vae = VAE(cfg.vae)
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  variables = vae.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  params = variables["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = tx.init(params)
  latent_shape = (batch_size, image_size // 8, image_size // 8, cfg.vae.z_channels)

  def loss_fn(p, pixels, noise):
    recon, z = vae.apply({"params": p}, pixels, noise, noise_scale, method=_reconstruct)
    mse = jnp.mean(jnp.square(recon - pixels))
    # the shapes' colour is a small part of the pixel error but all of what captions need: weigh it up
    colour = jnp.mean(jnp.square(chroma(recon) - chroma(pixels)))
    return mse + chroma_weight * colour + latent_l2 * jnp.mean(jnp.square(z)), mse

  @jax.jit
  def step(p, o, pixels, noise):
    (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, pixels, noise)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, mse

  start = time.perf_counter()
  for i in range(steps):
    pixels = draw_shapes(rng, batch_size, image_size)
    noise = jax.random.normal(jax.random.fold_in(key, i), latent_shape)
    params, opt_state, mse = step(params, opt_state, pixels, noise)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
      log.info("vae step %d/%d: reconstruction mse %.5f (%.0f s)", i + 1, steps, float(mse),
               time.perf_counter() - start)

  encode = jax.jit(lambda p, x: patchify(vae.apply({"params": p}, x, method=lambda m, x: m.encoder(x))
                                         [..., : cfg.vae.z_channels]))
  latents = np.concatenate([np.asarray(encode(params, draw_shapes(rng, 128, image_size)))
                            for _ in range(max(1, stats_images // 128))]).reshape(-1, cfg.vae.latent_channels)
  stats = {"running_mean": latents.mean(0).astype(np.float32), "running_var": latents.var(0).astype(np.float32)}
  trained = {"params": params, "batch_stats": {"bn": stats}}

  test = draw_shapes(rng, 256, image_size)
  recon = np.clip(np.asarray(jax.jit(lambda v, x: vae.apply(v, x))(trained, test)), 0.0, 1.0)
  report = {"steps": steps, "reconstruction_mse": float(np.mean(np.square(recon - test))),
            "mean_colour_abs_error": float(np.mean(np.abs(recon.mean((1, 2)) - test.mean((1, 2))))),
            "seconds": round(time.perf_counter() - start, 1)}
  return trained, report


def vae_part_tensors(variables: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The FLUX.2-layout tensors (`parts.part_layouts(cfg)['vae']` names) of a `VAE` module's variables:
  matrices and kernels in bfloat16, vectors (biases, norms, BN statistics) in float32."""
  wrapped = {"params": {"vae_model": variables["params"]}, "batch_stats": {"vae_model": variables["batch_stats"]}}
  out = {}
  for name in parts_lib.part_layouts(cfg)["vae"]:
    if name.endswith(parts_lib.COUNTER):
      continue
    x = np.asarray(hf_tensor(wrapped, parts_lib.cheers_source_name("vae", name)), np.float32)
    out[name] = np.ascontiguousarray(x.astype(ml_dtypes.bfloat16) if x.ndim > 1 else x)
  return out


def write_vae_part(variables: dict, cfg: ModelConfig, out_dir: Path, report: Optional[dict] = None) -> Path:
  """Writes `ae.safetensors` + `config.json` (+ `report.json`) into out_dir/vae; returns that folder."""
  part_dir = Path(out_dir) / "vae"
  part_dir.mkdir(parents=True, exist_ok=True)
  st.save_file(vae_part_tensors(variables, cfg), part_dir / parts_lib.VAE_FILE, {"format": "pt"})
  (part_dir / CONFIG_FILE).write_text(json.dumps(parts_lib.part_config("vae", cfg), indent=2) + "\n")
  if report is not None:
    (part_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  return part_dir


def tiny_model_config(config_name: str = "tiny", overrides: Sequence[str] = ()) -> tuple[ModelConfig, int]:
  from cheers_jax import config as config_lib
  config = config_lib.load(config_name, ["init_from="] + list(overrides))
  return ModelConfig.from_dict(config.model), int(config.data.image_size)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cheers_jax.train.tiny_parts", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder to write the parts into (OUT/vae)")
  parser.add_argument("--config", default="tiny", help="the run config whose model shapes the parts take")
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--chroma_weight", type=float, default=5.0)
  parser.add_argument("--stats_images", type=int, default=1024,
                      help="images the latent BatchNorm statistics are taken over")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE (repeatable)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  from cheers_jax import cli
  return cli.run(lambda _: _make(args), [])


def _make(args) -> int:
  cfg, image_size = tiny_model_config(args.config, args.set)
  variables, report = pretrain_vae(cfg, image_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   chroma_weight=args.chroma_weight, stats_images=args.stats_images, seed=args.seed)
  report.update(command="python -m cheers_jax.train.tiny_parts --out OUT --config {} --steps {} --batch_size {} "
                        "--lr {} --chroma_weight {} --seed {}".format(args.config, args.steps, args.batch_size, args.lr,
                                                                       args.chroma_weight, args.seed)
                        + "".join(f" --set {x}" for x in args.set))
  part_dir = write_vae_part(variables, cfg, Path(args.out), report)
  print(f"wrote {part_dir} (reconstruction mse {report['reconstruction_mse']:.5f}, mean-colour error "
        f"{report['mean_colour_abs_error']:.4f})", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
