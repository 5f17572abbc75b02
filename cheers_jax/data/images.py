"""Image loading and preprocessing (numpy + PIL), matching the reference UMMImageProcessor.

Pixels are divided by 255 only: range [0, 1]. The processor stores mean/std 0.5 but never applies them.
`preprocess_*` give float32 CHW arrays with grid_hw = (H // 16, W // 16); `understanding_image` and
`generation_image` give the same pixels as the uint8 image they come from (training batches carry those:
the division by 255 happens on the device, `cheers_jax.model.cheers.unit_pixels`).

One deliberate difference: images are converted to RGB before resizing. The reference processor resizes
in the source mode and converts afterwards, which only matters for non-RGB inputs (RGBA resizes with
premultiplied alpha, palette images with nearest neighbour, and greyscale crashes its padding step); the
reference training loader converts to RGB first, as done here.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from cheers_jax.errors import UserError

PATCH_SIZE = 16
DEFAULT_RESOLUTION = 512  # preprocessor_config.json scale_resolution
DUMMY_NOISE_SIDE = 256  # the processor's noise image for `images=[None]` is 256x256 before resizing


class BadImageError(UserError):
  """An image file is missing, unreadable or corrupt; `reason` says why without naming the file."""

  def __init__(self, message: str, reason: str = ""):
    super().__init__(message)
    self.reason = reason or message


class Preprocessed(NamedTuple):
  pixel_values: np.ndarray  # float32 (3, H, W) in [0, 1]
  grid_hw: tuple[int, int]  # (H // 16, W // 16)


def open_image(
  source: str | os.PathLike | bytes | bytearray, name: str | None = None, mode: str | None = None
) -> Image.Image:
  """THE one place images are decoded: a file path or encoded bytes -> a fully loaded PIL image, in
  `mode` (default: its own), loaded here so truncation shows up here, not later. Any decoder failure,
  PIL's decompression-bomb guard included (a header claiming more than 2 x Image.MAX_IMAGE_PIXELS
  pixels; the limit stays), is a BadImageError naming the file (`name` for bytes)."""
  is_bytes = isinstance(source, (bytes, bytearray))
  shown = name or ("image bytes" if is_bytes else os.fspath(source))
  try:
    with Image.open(io.BytesIO(source) if is_bytes else source) as im:
      im.load()
      return im.convert(mode) if mode else im.copy()
  except FileNotFoundError as e:
    raise BadImageError(f"image file not found: {shown!r}", "file not found") from e
  except Image.DecompressionBombError as e:
    reason = f"too large to decode safely: {e}"
    raise BadImageError(f"image {shown!r} is {reason}", reason) from e
  except Exception as e:  # noqa: BLE001 -- PIL's decoders raise many types (OSError, SyntaxError, ValueError, ...)
    reason = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
    reason = reason or type(e).__name__
    raise BadImageError(f"cannot read image {shown!r}: {reason}", reason) from e


def load_image(source: str | os.PathLike | bytes | bytearray, name: str | None = None) -> Image.Image:
  """`open_image` as RGB (what every model input is made from)."""
  return open_image(source, name, mode="RGB")


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  return image if image.mode == "RGB" else image.convert("RGB")


def _to_chw_unit(image: Image.Image) -> np.ndarray:
  # transformers' rescale: upcast to float64, multiply by the float 1/255, cast to float32. Dividing by
  # 255 instead can differ in the last bit.
  hwc = np.asarray(image, dtype=np.uint8)
  return (hwc.astype(np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1).copy()


def _finish(image: Image.Image, patch_size: int) -> Preprocessed:
  px = _to_chw_unit(image)
  return Preprocessed(px, (px.shape[1] // patch_size, px.shape[2] // patch_size))


def understanding_image(image: Image.Image | np.ndarray, resolution: int = DEFAULT_RESOLUTION) -> Image.Image:
  """Image to understand, as the RGB `resolution` square the model sees: bicubic resize so the longer side
  is `resolution`, then black padding with the image at left/top = pad // 2 (the extra pixel of an odd
  pad goes right/bottom)."""
  image = _as_rgb(image)
  w, h = image.size
  scale = min(resolution / h, resolution / w)
  # Python round (half to even) as the reference; max(1, .) only where the reference would crash (0 px side).
  new_w, new_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
  resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  canvas = Image.new("RGB", (resolution, resolution), (0, 0, 0))
  canvas.paste(resized, ((resolution - new_w) // 2, (resolution - new_h) // 2))
  return canvas


def generation_image(image: Image.Image | np.ndarray, resolution: int = DEFAULT_RESOLUTION) -> Image.Image:
  """Image to generate (training target), as the RGB `resolution` square: bicubic resize so the shorter
  side is `resolution`, then a centre crop with offsets (size - resolution) // 2 (rounded down, as
  transformers' center_crop)."""
  image = _as_rgb(image)
  w, h = image.size
  scale = resolution / min(h, w)
  new_w, new_h = int(round(w * scale)), int(round(h * scale))
  resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  # round(s * (S / s)) == S, so the shorter side is exactly `resolution` and no padding is ever needed.
  top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
  return resized.crop((left, top, left + resolution, top + resolution))


def preprocess_understanding(
  image: Image.Image | np.ndarray, resolution: int = DEFAULT_RESOLUTION, patch_size: int = PATCH_SIZE
) -> Preprocessed:
  """`understanding_image` as the processor's float32 CHW pixel values."""
  return _finish(understanding_image(image, resolution), patch_size)


def preprocess_generation(
  image: Image.Image | np.ndarray, resolution: int = DEFAULT_RESOLUTION, patch_size: int = PATCH_SIZE
) -> Preprocessed:
  """`generation_image` as the processor's float32 CHW pixel values."""
  return _finish(generation_image(image, resolution), patch_size)


def dummy_inference_image(
  rng: np.random.RandomState | np.random.Generator | int | None = None,
  resolution: int = DEFAULT_RESOLUTION,
  patch_size: int = PATCH_SIZE,
) -> Preprocessed:
  """The image the processor makes for `images=[None]` (T2I/T2T prompts without an image): uniform uint8
  noise of 256x256x3, preprocessed for understanding (so bicubic-upscaled to `resolution`).

  With a `RandomState` (or an int seed) the draw equals the reference's `np.random.randint(0, 256,
  (256, 256, 3), dtype=np.uint8)` after `np.random.seed(seed)`.
  """
  if rng is None or isinstance(rng, (int, np.integer)):
    rng = np.random.RandomState(rng)
  shape = (DUMMY_NOISE_SIDE, DUMMY_NOISE_SIDE, 3)
  if isinstance(rng, np.random.Generator):
    noise = rng.integers(0, 256, shape, dtype=np.uint8)
  else:
    noise = rng.randint(0, 256, shape, dtype=np.uint8)
  return preprocess_understanding(Image.fromarray(noise), resolution, patch_size)
