"""Does the embedded default read and draw? Scores of a model trained on the synthetic shapes.

- Understanding: greedy captions of held-out shapes (`loop.evaluate_synthetic`), colour and shape
  accuracy beside the best image-blind answer.
- Generation: every colour-shape prompt (`sources.COLOURS` x `sources.SHAPES`, 18) drawn several times,
  each image judged by `judge_image`:
  - colour: the shape's pixels are those whose chroma (max - min channel) exceeds CHROMA_MIN (the
    background is grey); each votes for the six colours' nearest hue; the majority is the colour. Hue,
    not the nearest RGB: a blurred edge mixes the colour with the grey, which keeps its hue but moved
    orange nearest to yellow in RGB (training images blurred with a 2-px Gaussian: orange judged right
    40 % of the time by RGB, 100 % by hue);
  - shape: the fill ratio of those pixels' bounding box: a circle fills pi/4 ~ 0.785 of it, a square 1,
    a triangle 1/2; the thresholds sit half-way (0.64, 0.89). An image with fewer than MIN_PIXELS such
    pixels has no colour and no shape (counted wrong).
  On the training set's own images the judge is right about 99 % of the time on colour and shape
  (tests/train/test_tiny.py checks >= 95 %).
The sample grid (each prompt under its image) goes to a PNG and TensorBoard; the scores to eval.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cheers_jax.data import sources

CHROMA_MIN = 0.25       # max - min channel in [0, 1]: every palette colour has >= 0.55, grey 0
MIN_PIXELS = 4
FILL_TRIANGLE_BELOW = 0.64
FILL_SQUARE_ABOVE = 0.89
EVAL_KEYS = ("caption_colour_acc", "caption_shape_acc", "t2i_colour_acc", "t2i_shape_acc")


def all_prompts() -> list[tuple[str, str]]:
  return [(c, s) for c in sources.COLOURS for s in sources.SHAPES]


def hue(rgb: np.ndarray) -> np.ndarray:
  """Hue in [0, 1) of (..., 3) RGB values in [0, 1] (the HSV hue; 0 for greys)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  top, spread = rgb.max(-1), np.maximum(rgb.max(-1) - rgb.min(-1), 1e-6)
  sector = np.where(top == r, ((g - b) / spread) % 6, np.where(top == g, (b - r) / spread + 2, (r - g) / spread + 4))
  return sector / 6


_NAMES = list(sources.COLOURS)
_PALETTE_HUES = hue(np.asarray([sources.COLOURS[n] for n in _NAMES], np.float32) / 255.0)


def judge_image(image: np.ndarray) -> tuple[Optional[str], Optional[str]]:
  """(colour, shape) that an image (H, W, 3) in [0, 1] (or uint8) shows, each None when unclear."""
  x = np.asarray(image, np.float32)
  if x.dtype != np.float32 or x.max() > 1.5:
    x = x / 255.0
  x = np.clip(x, 0.0, 1.0)
  mask = (x.max(-1) - x.min(-1)) > CHROMA_MIN
  if mask.sum() < MIN_PIXELS:
    return None, None
  gap = np.abs(hue(x[mask])[:, None] - _PALETTE_HUES[None])
  nearest = np.argmin(np.minimum(gap, 1.0 - gap), axis=1)  # hue is circular
  colour = _NAMES[int(np.bincount(nearest, minlength=len(_NAMES)).argmax())]
  ys, xs = np.nonzero(mask)
  box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
  fill = mask.sum() / box
  shape = "triangle" if fill < FILL_TRIANGLE_BELOW else "square" if fill > FILL_SQUARE_ABOVE else "circle"
  return colour, shape


def score_generations(wanted: Sequence[tuple[str, str]], images: Sequence[np.ndarray]) -> dict[str, float]:
  judged = [judge_image(im) for im in images]
  n = float(len(images))
  return {"t2i_colour_acc": sum(j[0] == w[0] for j, w in zip(judged, wanted)) / n,
          "t2i_shape_acc": sum(j[1] == w[1] for j, w in zip(judged, wanted)) / n,
          "t2i_both_acc": sum(tuple(j) == tuple(w) for j, w in zip(judged, wanted)) / n,
          "t2i_judged_none": sum(j[0] is None for j in judged) / n,
          # a prompt-blind generator draws the same thing for every prompt: one colour in six, one shape in three
          "t2i_colour_blind": 1 / len(sources.COLOURS), "t2i_shape_blind": 1 / len(sources.SHAPES),
          "t2i_images": int(n)}


def labelled_grid(images: Sequence[np.ndarray], labels: Sequence[str], columns: int, scale: int = 4) -> np.ndarray:
  """uint8 grid: each image enlarged `scale` times (nearest) with its label written under it."""
  from PIL import Image, ImageDraw
  h, w = np.asarray(images[0]).shape[:2]
  cell_w, text_h, pad = w * scale, 14, 4
  rows = -(-len(images) // columns)
  canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (h * scale + text_h + pad) + pad), (255,) * 3)
  draw = ImageDraw.Draw(canvas)
  for i, (img, label) in enumerate(zip(images, labels)):
    r, c = divmod(i, columns)
    x, y = pad + c * (cell_w + pad), pad + r * (h * scale + text_h + pad)
    arr = np.asarray(img)
    arr = arr if arr.dtype == np.uint8 else (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    canvas.paste(Image.fromarray(arr).resize((cell_w, h * scale), Image.Resampling.NEAREST), (x, y))
    draw.text((x + 1, y + h * scale + 1), label, fill=(0, 0, 0))
  return np.asarray(canvas)


def eval_summary(caption: Optional[dict], generation: Optional[dict]) -> dict:
  """The eval.json content: the four accuracies (fractions) and their image-/prompt-blind baselines."""
  out: dict = {}
  if caption is not None:
    out.update(caption_colour_acc=caption["colour_acc"], caption_shape_acc=caption["shape_acc"],
               caption_both_acc=caption["both_acc"], caption_colour_blind=caption["majority_colour"],
               caption_shape_blind=caption["majority_shape"], caption_well_formed=caption["well_formed"],
               caption_images=caption["num_images"])
  if generation is not None:
    out.update({k: v for k, v in generation.items() if k.startswith("t2i_")})
  return out


def write_eval(path: Path, summary: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def generation_report(ev: dict) -> str:
  return (f"text-to-image ({ev['t2i_images']} images, 18 prompts): colour {ev['t2i_colour_acc']:.0%} "
          f"(prompt-blind {ev['t2i_colour_blind']:.0%}), shape {ev['t2i_shape_acc']:.0%} "
          f"(prompt-blind {ev['t2i_shape_blind']:.0%}), both {ev['t2i_both_acc']:.0%}")
