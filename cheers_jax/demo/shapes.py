"""The shapes world: one coloured circle, square or triangle on a grey ground, its caption and prompt,
and a judge that tells which colour and shape an image shows.

- `sample_shape(seed, index, placement)`: the shape of one training example (everything follows from the
  pair, so any process redraws the same example): anywhere at any size, or 'centred' (one size, in the
  middle: what the tiny recipe's generation examples draw, as the prompt names only colour and shape);
  `draw_shape` draws any shape (the one drawing routine of the project: the training source, the tiny
  parts' pretraining, the judge's templates and the tests use it).
- captions are 'a red circle' (`describe`, read back by `parse_caption`, scored by `score_captions`);
  T2I prompts are the caption in capitals, 'A RED CIRCLE' (`prompt_text`): capitals tokenize differently,
  so the prompt's word vectors are not the ones the captions are predicted with. With a from-scratch
  2-layer LLM and tied embeddings, shared words left the image positions unable to read the prompt.
- `judge_image`: the colour is the majority of the coloured pixels' nearest palette hue (hue, not RGB:
  a blurred edge mixes the colour with the grey, which keeps its hue); the shape is the one whose drawn
  template, placed and blurred to match the coverage of the one shape the image shows, fits it best, and
  none when the colour forms several shapes or no template explains it (`shape_coverage`, `judge_shape`).
  On the training images, on the same images blurred with a 2-px Gaussian and on them with pixel noise
  it is right >= 95 % of the time on each (tests/train/test_tiny.py).
"""

from __future__ import annotations

import collections
import re
from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

COLOURS: dict[str, tuple[int, int, int]] = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 200, 30),
  "purple": (140, 60, 180),
  "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges


class ShapeLabel(NamedTuple):
  colour: str
  shape: str


class Shape(NamedTuple):
  colour: str
  shape: str
  box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image side
  background: int  # grey level of the ground

  @property
  def label(self) -> ShapeLabel:
    return ShapeLabel(self.colour, self.shape)


def all_labels() -> list[ShapeLabel]:
  """Every colour-shape pair (18), colour-major."""
  return [ShapeLabel(c, s) for c in COLOURS for s in SHAPES]


# ---- drawing ---------------------------------------------------------------------------------------
PLACEMENTS = ("random", "centred")
CENTRED_EXTENT = 0.5  # the centred placement's side / diameter, as a fraction of the image


def sample_shape(seed: int, index: int, placement: str = "random") -> Shape:
  """The shape of training example `index` of the source drawn with `seed`.

  placement 'random': size 0.3-0.6 of the side, anywhere in the image; 'centred': size CENTRED_EXTENT in the
  middle (colour, shape and ground are the random placement's, so only the box differs)."""
  if placement not in PLACEMENTS:
    raise ValueError(f"placement {placement!r}: choose one of {PLACEMENTS}")
  rng = np.random.default_rng([int(seed), int(index)])
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  extent = rng.uniform(0.3, 0.6)  # side / diameter as a fraction of the image
  x0, y0 = rng.uniform(0.0, 1.0 - extent, size=2)
  background = int(rng.integers(200, 256))
  if placement == "centred":
    extent = CENTRED_EXTENT
    x0 = y0 = (1.0 - extent) / 2
  return Shape(colour, shape, (x0, y0, x0 + extent, y0 + extent), background)


def draw_shape(
  image_size: int,
  shape: str,
  box: Sequence[float],
  fill: tuple[int, int, int],
  background: int | tuple[int, int, int],
  supersample: int = SUPERSAMPLE,
) -> np.ndarray:
  """uint8 (image_size, image_size, 3): `shape` filling `box` (x0, y0, x1, y1, fractions of the side;
  a triangle has its apex at the top middle) in `fill` on a plain `background` (a grey level or RGB).
  supersample > 1 draws that many times larger and downsamples (anti-aliased edges); 1: hard edges."""
  if shape not in SHAPES:
    raise ValueError(f"shape {shape!r}: choose one of {SHAPES}")
  big = image_size * supersample
  ground = (background,) * 3 if isinstance(background, (int, np.integer)) else tuple(background)
  canvas = Image.new("RGB", (big, big), tuple(int(v) for v in ground))
  draw = ImageDraw.Draw(canvas)
  x0, y0, x1, y1 = (v * big for v in box)
  fill = tuple(int(v) for v in fill)
  if shape == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=fill)
  elif shape == "square":
    draw.rectangle((x0, y0, x1, y1), fill=fill)
  else:
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
  if supersample > 1:
    canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
  return np.asarray(canvas, np.uint8)


def render(shape: Shape, image_size: int) -> np.ndarray:
  """uint8 (image_size, image_size, 3) image of a sampled shape (the training source's drawing)."""
  return draw_shape(image_size, shape.shape, shape.box, COLOURS[shape.colour], shape.background)


# ---- text ------------------------------------------------------------------------------------------
def describe(label: ShapeLabel | tuple[str, str]) -> str:
  """The caption of a shape: ('red', 'circle') -> 'a red circle'."""
  colour, shape = label
  return f"a {colour} {shape}"


def prompt_text(caption: str) -> str:
  """What a T2I prompt asks for: the caption in capitals ('a red circle' -> 'A RED CIRCLE')."""
  return caption.upper()


def parse_caption(text: str) -> ShapeLabel | None:
  """The (colour, shape) a caption names, or None when it names not exactly one colour and one shape."""
  words = re.findall(r"[a-z]+", text.lower())
  colours = {w for w in words if w in COLOURS}
  shapes = {w for w in words if w in SHAPES}
  if len(colours) != 1 or len(shapes) != 1:
    return None
  return ShapeLabel(colours.pop(), shapes.pop())


def score_captions(wanted: Sequence[ShapeLabel], texts: Sequence[str]) -> dict[str, float]:
  """Accuracy of captions against the shapes they describe, with what an image-blind captioner scores.

  colour_acc / shape_acc / both_acc: the caption names the right colour / shape / both.
  well_formed: it names exactly one colour and one shape (the text template was learnt).
  distinct: the number of different (colour, shape) pairs named: 1 means every image got the same caption.
  *_chance: what a uniform guess scores (1/6, 1/3, 1/18); majority_*: what always answering the most
  common true colour / shape / pair of these images scores (the best image-blind constant answer).
  """
  if len(wanted) != len(texts) or not texts:
    raise ValueError(f"need one caption per image, got {len(texts)} captions for {len(wanted)} images")
  parsed = [parse_caption(t) for t in texts]
  n = float(len(texts))
  hits = lambda f: sum(p is not None and f(p, w) for p, w in zip(parsed, wanted)) / n
  top = lambda keys: max(collections.Counter(keys).values()) / n
  return {
    "colour_acc": hits(lambda p, w: p.colour == w.colour),
    "shape_acc": hits(lambda p, w: p.shape == w.shape),
    "both_acc": hits(lambda p, w: p == w),
    "well_formed": sum(p is not None for p in parsed) / n,
    "distinct": float(len({p for p in parsed if p is not None})),
    "colour_chance": 1 / len(COLOURS),
    "shape_chance": 1 / len(SHAPES),
    "both_chance": 1 / (len(COLOURS) * len(SHAPES)),
    "majority_colour": top([w.colour for w in wanted]),
    "majority_shape": top([w.shape for w in wanted]),
    "majority_both": top([tuple(w) for w in wanted]),
  }


# ---- the judge -------------------------------------------------------------------------------------
CHROMA_MIN = 0.25  # max - min channel in [0, 1]: every palette colour has >= 0.55, grey 0
MIN_PIXELS = 4  # fewer coloured pixels: nothing drawn (no colour, no shape)
CORE_LEVEL = 0.5  # coverage at and above which a pixel is inside the shape (a blurred edge's midpoint)
EDGE_PIXELS = 3  # the shape's support: its core grown by this many pixels (keeps a blurred edge)
SINGLE_SHARE = 0.8  # the largest core must hold this share of all the cores' coverage: one shape, not several
# The best template must explain the coverage map up to this share of its energy (sum of squares), or the
# image shows no single shape. Measured: training images <= 0.02 (blurred by 2 px <= 0.01); the noise a
# 2-step model draws >= 0.3.
SHAPE_FIT_MAX = 0.15


def hue(rgb: np.ndarray) -> np.ndarray:
  """Hue in [0, 1) of (..., 3) RGB values in [0, 1] (the HSV hue; 0 for greys)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  top, spread = rgb.max(-1), np.maximum(rgb.max(-1) - rgb.min(-1), 1e-6)
  sector = np.where(top == r, ((g - b) / spread) % 6, np.where(top == g, (b - r) / spread + 2, (r - g) / spread + 4))
  return sector / 6


_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[n] for n in _NAMES], np.float32) / 255.0
_PALETTE_HUES = hue(_PALETTE)
# per shape: (side from the area, the box's top above the centroid in sides, variance x / side^2, y / side^2)
_GEOMETRY = {
  "circle": (lambda a: np.sqrt(4.0 * a / np.pi), 0.5, 1 / 16, 1 / 16),
  "square": (lambda a: np.sqrt(a), 0.5, 1 / 12, 1 / 12),
  "triangle": (lambda a: np.sqrt(2.0 * a), 2 / 3, 1 / 24, 1 / 18),
}


def _as_unit(image: np.ndarray) -> np.ndarray:
  x = np.asarray(image)
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 or x.max() > 1.5 else x.astype(np.float32)
  return np.clip(x, 0.0, 1.0)


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
  """(n, n) Gaussian blur along one axis (rows normalised: no darkening at the border)."""
  if sigma < 1e-3:
    return np.eye(n, dtype=np.float32)
  i = np.arange(n)
  g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
  return (g / g.sum(1, keepdims=True)).astype(np.float32)


def judge_shape(coverage: np.ndarray) -> Optional[str]:
  """The shape a coverage map (H, W) in [0, 1] shows (1 = all shape; see `shape_coverage`), None when no
  template fits it within SHAPE_FIT_MAX.

  For each shape, the template is placed from the map's mass (area and centroid), blurred by the
  Gaussian that its second moments leave unexplained (a blur adds its variance to the shape's, and
  keeps area and centroid), scaled to the map by least squares, and compared with it: the smallest
  squared error wins. A blurred square has round corners and a blurred triangle a round apex, but
  neither fits the blurred circle's template as well as its own."""
  p = np.asarray(coverage, np.float32)
  n = p.shape[0]
  area = max(float(p.sum()), 1e-6)
  ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
  cx, cy = float((p * xs).sum() / area), float((p * ys).sum() / area)
  var = float((p * ((xs - cx) ** 2 + (ys - cy) ** 2)).sum() / area)
  best, best_err = None, np.inf
  for shape, (side_of, top, fx, fy) in _GEOMETRY.items():
    side = side_of(area)
    box = np.asarray([cx - side / 2, cy - top * side, cx + side / 2, cy - top * side + side]) / n
    template = draw_shape(n, shape, box, (255, 255, 255), 0)[..., 0].astype(np.float32) / 255.0
    blur = _blur_matrix(n, np.sqrt(max((var - (fx + fy) * side * side) / 2, 0.0)))
    template = blur @ template @ blur.T
    scale = float((p * template).sum() / max(float((template * template).sum()), 1e-6))
    err = float(((p - scale * template) ** 2).sum())
    if err < best_err:
      best, best_err = shape, err
  return best if best_err <= SHAPE_FIT_MAX * max(float((p * p).sum()), 1e-6) else None


def shape_coverage(x: np.ndarray, colour_index: int, coloured: np.ndarray) -> Optional[np.ndarray]:
  """How much of each pixel of x (H, W, 3) in [0, 1] is the palette colour `colour_index`, restricted to
  the one shape the image shows; None when its coloured pixels form several shapes.

  Coverage is the pixel's step from the ground (the median of the uncoloured pixels) towards the colour,
  as a share of the whole step: a blurred edge mixes the two linearly, and noise of any hue averages out
  instead of adding up as chroma does. The shape is the largest 4-connected core (coverage >=
  CORE_LEVEL) grown by EDGE_PIXELS; faint colour elsewhere (a generated image's speckled ground) is not
  part of it. Cores that share the mass (no one with SINGLE_SHARE of it) are several shapes."""
  ground_pixels = x[~coloured] if (~coloured).sum() >= MIN_PIXELS else x.reshape(-1, 3)
  ground = np.median(ground_pixels, axis=0)
  step = _PALETTE[colour_index] - ground
  coverage = np.clip(((x - ground) @ step) / max(float(step @ step), 1e-6), 0.0, 1.0)
  cores, count = ndimage.label(coverage >= CORE_LEVEL)
  if count == 0:
    return None
  mass = np.asarray(ndimage.sum(coverage, cores, index=np.arange(1, count + 1)))
  largest = int(np.argmax(mass))
  if mass[largest] < SINGLE_SHARE * mass.sum():
    return None
  support = ndimage.binary_dilation(cores == largest + 1, iterations=EDGE_PIXELS)
  return np.where(support, coverage, 0.0).astype(np.float32)


def judge_image(image: np.ndarray) -> tuple[Optional[str], Optional[str]]:
  """(colour, shape) that an image (H, W, 3) in [0, 1] (or uint8) shows, both None when nothing coloured
  is drawn (fewer than MIN_PIXELS pixels with chroma > CHROMA_MIN), the shape None when the coloured
  pixels form no single shape (`shape_coverage`, `judge_shape`)."""
  x = _as_unit(image)
  chroma = x.max(-1) - x.min(-1)
  mask = chroma > CHROMA_MIN
  if mask.sum() < MIN_PIXELS:
    return None, None
  gap = np.abs(hue(x[mask])[:, None] - _PALETTE_HUES[None])
  nearest = np.argmin(np.minimum(gap, 1.0 - gap), axis=1)  # hue is circular
  index = int(np.bincount(nearest, minlength=len(_NAMES)).argmax())
  coverage = shape_coverage(x, index, mask)
  return _NAMES[index], None if coverage is None else judge_shape(coverage)


def score_generations(wanted: Sequence[tuple[str, str]], images: Sequence[np.ndarray]) -> dict[str, float]:
  """T2I accuracy of images drawn for `wanted` (colour, shape) pairs, by `judge_image`. An image counts
  for t2i_both_acc only if its colour AND its shape are right."""
  judged = [judge_image(im) for im in images]
  n = float(len(images))
  return {
    "t2i_colour_acc": sum(j[0] == w[0] for j, w in zip(judged, wanted)) / n,
    "t2i_shape_acc": sum(j[1] == w[1] for j, w in zip(judged, wanted)) / n,
    "t2i_both_acc": sum(tuple(j) == tuple(w) for j, w in zip(judged, wanted)) / n,
    "t2i_judged_none": sum(j[0] is None for j in judged) / n,  # nothing coloured drawn
    "t2i_judged_no_shape": sum(j[1] is None for j in judged) / n,  # no colour, or no single shape
    # a prompt-blind generator draws the same thing for every prompt: one colour in six, one shape in three
    "t2i_colour_blind": 1 / len(COLOURS),
    "t2i_shape_blind": 1 / len(SHAPES),
    "t2i_both_blind": 1 / (len(COLOURS) * len(SHAPES)),
    "t2i_images": int(n),
  }
