"""Pictures out: the model's [0, 1] float images as uint8, grids of them, PNG files.

One home for the conversions every tool writes images with (`generate`, the training samples); the
official benchmarks' own pixel rules (GenEval, DPG) stay with the evaluation that must match them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[0, 1] float (..., H, W, 3) -> uint8, rounding as torchvision's save_image (x * 255 + 0.5, clamped)."""
  return np.clip(np.floor(np.asarray(image, np.float32) * 255 + 0.5), 0, 255).astype(np.uint8)


def make_grid(images: Sequence[np.ndarray], columns: Optional[int] = None, pad: int = 2) -> np.ndarray:
  """uint8 (H, W, 3) images -> one uint8 grid, row-major (default: up to 4 columns), black padding."""
  n = len(images)
  cols = columns or min(n, 4)
  rows = math.ceil(n / cols)
  h, w = images[0].shape[:2]
  grid = np.zeros((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + c * (w + pad)
    grid[y : y + h, x : x + w] = img
  return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
  """A uint8 or [0, 1] float (H, W, 3) image to a PNG file (its folder is created)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = np.asarray(image)
  Image.fromarray(image if image.dtype == np.uint8 else to_uint8(image)).save(path)
  return path
