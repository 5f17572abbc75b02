"""The embedded default's own parts and its read-and-draw evaluation.

- the judge of the t2i evaluation reads the training set's images right, sharp and blurred;
- `python -m cheers_jax.train.tiny_parts` runs (a few steps) and writes VAE and SigLIP parts that load;
  the shipped parts (package data) load into the tiny default, keep colour, and the config points at them;
- the labelled grid and eval.json summary;
- heavy: the README's first command from scratch, at the seeds CHEERS_TINY_SEEDS names (default 0: ~8 min on
  2 cores; CI's 45-minute budget holds one run), meets issue 25's targets (captions: colour >= 95 %,
  shape >= 75 %; t2i: colour >= 75 %, shape >= 60 %), and at seed 0 its exported checkpoint answers
  `generate ask` (one batched call, --jsonl) on shapes this test draws itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from PIL import Image, ImageFilter

from cheers_jax import config as config_lib
from cheers_jax.checkpoint import parts as parts_lib
from cheers_jax.data import sources
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.config import ModelConfig
from cheers_jax.model.siglip import SigLIP
from cheers_jax.demo import evaluate as demo_eval
from cheers_jax.demo import shapes as demo_shapes
from cheers_jax.train import tiny_parts

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg() -> ModelConfig:
  return ModelConfig.from_dict(config_lib.load("tiny").model)


def test_judge_reads_the_training_images_sharp_blurred_and_noisy():
  shapes = sources.SyntheticShapes(600, 32, 0)
  wanted = [tuple(shapes.label(i)) for i in range(600)]
  sharp = [shapes.render(i) for i in range(600)]
  assert demo_shapes.judge_image(np.full((32, 32, 3), 0.8, np.float32)) == (None, None)  # grey: nothing drawn
  dots = np.full((32, 32, 3), 0.85, np.float32)
  dots[tuple(np.random.default_rng(0).integers(0, 32, (2, 60)))] = np.asarray(demo_shapes.COLOURS["red"]) / 255
  assert demo_shapes.judge_image(dots) == ("red", None)  # scattered dots: a colour but no shape
  # two shapes of one colour are not one shape
  two = demo_shapes.draw_shape(32, "square", (0.05, 0.05, 0.4, 0.4), demo_shapes.COLOURS["blue"], 230).copy()
  two[18:30, 18:30] = demo_shapes.COLOURS["blue"]
  assert demo_shapes.judge_image(two) == ("blue", None)
  # generated images are blurry (a blurred edge mixes the colour with the grey ground, corners round off)
  # and their ground is speckled: pixel noise of every hue
  blurred = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(2))) for im in sharp]
  rng = np.random.default_rng(0)
  noisy = [np.clip(im / 255.0 + rng.normal(0.0, 0.06, im.shape), 0.0, 1.0).astype(np.float32) for im in sharp]
  for images in (sharp, blurred, noisy):
    judged = [demo_shapes.judge_image(im) for im in images]
    for k, names in ((0, demo_shapes.COLOURS), (1, demo_shapes.SHAPES)):
      for name in names:  # each colour and each shape on its own: no class may hide behind the others
        mine = [i for i, w in enumerate(wanted) if w[k] == name]
        right = sum(judged[i][k] == name for i in mine)
        assert right >= 0.95 * len(mine), (name, right, len(mine))
    scores = demo_shapes.score_generations(wanted, images)
    assert scores["t2i_both_acc"] >= 0.95, scores


def test_t2i_counts_an_image_only_if_colour_and_shape_are_right():
  red_circle = demo_shapes.draw_shape(32, "circle", (0.2, 0.2, 0.7, 0.7), demo_shapes.COLOURS["red"], 230)
  blue_square = demo_shapes.draw_shape(32, "square", (0.3, 0.3, 0.7, 0.7), demo_shapes.COLOURS["blue"], 230)
  wanted = [("red", "circle"), ("red", "square"), ("blue", "square"), ("green", "square")]
  scores = demo_shapes.score_generations(wanted, [red_circle, red_circle, blue_square, blue_square])
  assert scores["t2i_colour_acc"] == 0.75 and scores["t2i_shape_acc"] == 0.75 and scores["t2i_both_acc"] == 0.5


def test_tiny_default_starts_from_the_shipped_parts():
  config = config_lib.load("tiny")
  spec = parts_lib.parse_parts_spec(config.init_from[len("parts:") :])
  assert spec == {"vae": str(tiny_parts.ASSET_DIR / "vae"), "siglip": str(tiny_parts.ASSET_DIR / "siglip")}
  assert all(Path(d).is_absolute() for d in spec.values())  # resolves from any working directory
  size = sum(p.stat().st_size for p in tiny_parts.ASSET_DIR.rglob("*") if p.is_file())
  assert size < 3 * 2**20, f"shipped parts take {size / 2**20:.1f} MiB"


def test_shipped_parts_load_and_keep_colour():
  cfg = tiny_cfg()
  parts = {p: tiny_parts.ASSET_DIR / p for p in ("vae", "siglip")}
  variables = parts_lib.load_parts(parts, cfg, jax.random.PRNGKey(0))
  shapes = sources.SyntheticShapes(64, 32, 1)
  images = np.stack([shapes.render(i) for i in range(64)]).astype(np.float32) / 255.0
  model = Cheers(cfg)
  latents = model.apply(variables, images, method=Cheers.encode)
  assert abs(float(np.std(latents)) - 1.0) < 0.5  # the shipped BatchNorm statistics normalise the latent
  recon = np.clip(np.asarray(model.apply(variables, latents, method=Cheers.decode)), 0.0, 1.0)
  wanted = [tuple(shapes.label(i)) for i in range(64)]
  scores = demo_shapes.score_generations(wanted, recon)
  assert scores["t2i_colour_acc"] >= 0.9, scores  # the round trip keeps the colour (a random VAE: grey)
  # the ViT's tokens differ from image to image more than they share (a random ViT's: 0.2 x their mean)
  tokens = np.asarray(model.apply(variables, latents, method=Cheers.image_tokens)["tokens"]).reshape(64, -1)
  assert tokens.std(0).mean() > np.abs(tokens.mean(0)).mean(), (tokens.std(0).mean(), np.abs(tokens.mean(0)).mean())


def test_readout_error_scores_a_linear_map_on_held_out_images():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((64, 16, 12)).astype(np.float32)
  mixing = rng.standard_normal((12, 5)).astype(np.float32)
  linear = features @ mixing + 0.5
  error, r2 = tiny_parts.readout_error(features, linear)
  assert float(error) < 1e-2 and float(r2) > 0.99, (error, r2)
  _, r2 = tiny_parts.readout_error(features, np.square(features[..., :5]))  # no linear map reads a square
  assert float(r2) < 0.1, r2
  _, r2 = tiny_parts.readout_error(features, rng.standard_normal((64, 16, 5)))  # fitted noise does not carry over
  assert float(r2) < 0.1, r2


def test_pretraining_command_writes_loadable_parts(tmp_path):
  argv = ["--out", str(tmp_path), "--steps", "2", "--siglip_steps", "2", "--batch_size", "4", "--stats_images", "128"]
  argv += ["--readout_weight", "0.1", "--siglip_readout_weight", "1", "--vae_init", str(tiny_parts.ASSET_DIR / "vae")]
  argv += ["--siglip_init", str(tiny_parts.ASSET_DIR / "siglip")]
  assert tiny_parts.main(argv) == 0
  cfg = tiny_cfg()
  for part in ("vae", "siglip"):
    report = json.loads((tmp_path / part / "report.json").read_text())
    assert report["steps"] == 2 and "--vae_init" in report["command"] and "--siglip_init" in report["command"], report
    assert all(-1.0 < report[f"readout_r2_t{t}"] <= 1.0 for t in (0.1, 0.5, 0.9)), report
    files = parts_lib.open_part(part, tmp_path / part, cfg)  # names, shapes, config.json checked against tiny
    assert set(files) == set(parts_lib.open_part(part, tiny_parts.ASSET_DIR / part, cfg))
  # started from the shipped VAE, its decoder's images of nearly clean latents are linearly readable
  assert json.loads((tmp_path / "vae" / "report.json").read_text())["readout_r2_t0.9"] > 0.5
  # --siglip_init hands pretrain_siglip the shipped ViT's params, in the tree a fresh SigLIP has
  shipped = tiny_parts.load_siglip_variables(tiny_parts.ASSET_DIR / "siglip", cfg)["params"]
  fresh = jax.eval_shape(lambda: nn.unbox(SigLIP(cfg.vision).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))))
  assert jax.tree.map(jnp.shape, shipped) == jax.tree.map(lambda a: a.shape, fresh["params"])


def test_labelled_grid_and_summary(tmp_path):
  images = [np.zeros((32, 32, 3), np.float32), np.ones((32, 32, 3), np.float32)] * 2
  wanted = [("red", "circle"), ("red", "circle"), ("blue", "square"), ("blue", "square")]
  grid = demo_eval.labelled_grid(images, wanted, columns=2)  # a row per prompt
  assert grid.dtype == np.uint8 and grid.shape[0] > 2 * 5 * 32 and grid.shape[1] > 2 * 5 * 32
  # the label is written in ink under each image, not left blank
  assert (grid[5 * 32 + 8 : 5 * 32 + 20, 10 : 5 * 32].min(-1) < 100).any()
  caption = dict(
    colour_acc=0.9, shape_acc=0.8, both_acc=0.7, majority_colour=0.2, majority_shape=0.4, well_formed=1.0, num_images=96
  )
  generation = demo_shapes.score_generations([("red", "circle")], images[:1])
  summary = demo_eval.eval_summary(caption, generation, {"steps": 1.0})
  assert set(demo_eval.EVAL_KEYS) <= set(summary) and summary["timing_s"] == {"steps": 1.0}
  demo_eval.write_eval(tmp_path / "eval.json", summary)
  assert json.loads((tmp_path / "eval.json").read_text())["caption_colour_acc"] == 0.9


def draw_own_shapes(count: int, seed: int = 123) -> list[tuple[Image.Image, tuple[str, str]]]:
  """Shapes drawn unlike the training set: 128 px, no supersampling (hard edges), other sizes and greys."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    colour, shape = list(demo_shapes.COLOURS)[i % 6], demo_shapes.SHAPES[(i // 6) % 3]
    background = int(rng.integers(190, 250))
    extent = rng.uniform(0.35, 0.55)
    x0, y0 = rng.uniform(0, 1 - extent, size=2)
    pixels = demo_shapes.draw_shape(
      128, shape, (x0, y0, x0 + extent, y0 + extent), demo_shapes.COLOURS[colour], background, supersample=1
    )
    out.append((Image.fromarray(pixels), (colour, shape)))
  return out


TARGETS = {"caption_colour_acc": 0.95, "caption_shape_acc": 0.75, "t2i_colour_acc": 0.75, "t2i_shape_acc": 0.60}
# seeds 0, 1 and 2 by default (issue 25); CHEERS_TINY_SEEDS=0,1,2,3,4,5 runs the whole sweep of
# docs/tiny_recipe.md (one run each, ~5.5 min on 2 cores)
SEEDS = [int(s) for s in os.environ.get("CHEERS_TINY_SEEDS", "0,1,2").split(",") if s.strip()]


@pytest.mark.heavy
@pytest.mark.parametrize("seed", SEEDS)
def test_readme_first_command_reads_and_draws(tmp_path, seed):
  """The README's first command at each --config.seed of CHEERS_TINY_SEEDS meets every accuracy target of
  issue 25 (its 6-minute bar is a timing, measured in docs/tiny_recipe.md, not asserted here), each well
  above its blind baseline; at seed 0, `generate ask` with its export names 36 shapes this test draws."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  work = tmp_path / "w"
  proc = subprocess.run(
    [sys.executable, "-m", "cheers_jax.train", "--config", "tiny", "--workdir", str(work), f"--config.seed={seed}"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,  # ~8 min on this 2-core VM; others ran the same 3x slower
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  ev = json.loads((work / "eval.json").read_text())
  assert list((work / "samples").glob("*.png"))
  assert "t2i_both_acc" in ev, ev
  if not seed:
    _ask_names_what_it_sees(work, tmp_path, env)
  missed = {k: (ev[k], want) for k, want in TARGETS.items() if ev[k] < want}
  missed.update(
    {
      f"{key}_acc > blind + 0.25": (ev[f"{key}_acc"], ev[f"{key}_blind"])
      for key in ("caption_colour", "caption_shape", "t2i_colour", "t2i_shape")
      if ev[f"{key}_acc"] <= ev[f"{key}_blind"] + 0.25
    }
  )
  assert not missed, f"issue 25 targets missed at seed {seed}: {missed}"


def _ask_names_what_it_sees(work, tmp_path, env):
  """`generate ask` with the run's export names the colour and shape of 36 shapes drawn unlike training."""
  folder = tmp_path / "own"
  folder.mkdir()
  labels = {}
  for i, (img, label) in enumerate(draw_own_shapes(36)):
    img.save(folder / f"{i:02d}.png")
    labels[str(folder / f"{i:02d}.png")] = label
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "cheers_jax.generate",
      "ask",
      "--checkpoint",
      str(work / "hf"),
      "--image",
      str(folder),
      "--prompt",
      "Describe the image.",
      "--jsonl",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(answers) == 36
  scores = demo_shapes.score_captions(
    [demo_shapes.ShapeLabel(*labels[a["image"]]) for a in answers], [a["answer"] for a in answers]
  )
  assert scores["colour_acc"] >= 0.85 and scores["shape_acc"] >= 0.70, scores  # the same bar on new images
