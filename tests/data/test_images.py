"""Image preprocessing against the oracle goldens (reference UMMImageProcessor) plus loader errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cheers_jax.data.images import (
  BadImageError,
  dummy_inference_image,
  load_image,
  preprocess_generation,
  preprocess_understanding,
)
from tests.oracle import instance_params


@pytest.fixture(scope="module", params=instance_params())
def golden(request):
  with np.load(request.param / "golden.npz", allow_pickle=False) as g:
    return {k: g[k] for k in g.files if k.startswith("preprocess.")}


@pytest.mark.parametrize("mode, fn", [("und", preprocess_understanding), ("gen", preprocess_generation)])
def test_preprocess_matches_golden(golden, mode, fn):
  img = golden["preprocess.image_uint8"]
  want = golden[f"preprocess.{mode}.pixel_values"][0]
  out = fn(Image.fromarray(img), resolution=want.shape[-1])
  assert out.pixel_values.dtype == np.float32 and out.pixel_values.shape == want.shape
  assert np.abs(out.pixel_values - want).max() <= 1e-6
  assert out.grid_hw == (want.shape[1] // 16, want.shape[2] // 16)
  if mode == "und":
    assert out.grid_hw == tuple(golden["preprocess.und.grid_hws"][0].tolist())
  # a numpy array is accepted as well
  np.testing.assert_array_equal(fn(img, resolution=want.shape[-1]).pixel_values, out.pixel_values)


def _gradient(h: int, w: int) -> Image.Image:
  y, x = np.mgrid[0:h, 0:w]
  return Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256 | 1], -1).astype(np.uint8))


def test_understanding_pads_black_centred_with_floor_offset():
  out = preprocess_understanding(Image.new("RGB", (100, 37), (255, 255, 255)), resolution=64)
  px = out.pixel_values
  # 100x37 -> 64x24 (round(37 * 0.64) = 24): pad 40 rows, 20 on top, 20 below
  rows = px[0].max(axis=1) > 0
  assert rows.sum() == 24 and rows.argmax() == 20
  assert px.shape == (3, 64, 64) and px.min() == 0.0 and px.max() == 1.0
  # odd pad: 64 x 25 image -> pad 39 columns, 19 left, 20 right
  px = preprocess_understanding(Image.new("RGB", (25, 64), (255, 0, 0)), resolution=64).pixel_values
  cols = px[0].max(axis=0) > 0
  assert cols.sum() == 25 and cols.argmax() == 19


def test_generation_centre_crop_offsets():
  src = _gradient(51, 70)  # shorter side already 51: scale 1, crop 70 -> 51 columns from left = 19 // 2 = 9
  px = preprocess_generation(src, resolution=51).pixel_values
  want = np.asarray(src)[:, 9:60].transpose(2, 0, 1) / 255
  np.testing.assert_allclose(px, want, atol=1e-7)
  assert preprocess_generation(_gradient(300, 200), resolution=96).grid_hw == (6, 6)


def test_non_rgb_inputs_are_converted():
  for mode in ("L", "RGBA", "P"):
    img = _gradient(40, 30).convert(mode)
    assert preprocess_understanding(img, 32).pixel_values.shape == (3, 32, 32)
    assert preprocess_generation(img, 32).pixel_values.shape == (3, 32, 32)


def test_dummy_inference_image():
  a = dummy_inference_image(np.random.RandomState(5), resolution=64)
  noise = np.random.RandomState(5).randint(0, 256, (256, 256, 3), dtype=np.uint8)
  np.testing.assert_array_equal(a.pixel_values, preprocess_understanding(Image.fromarray(noise), 64).pixel_values)
  np.testing.assert_array_equal(dummy_inference_image(5, resolution=64).pixel_values, a.pixel_values)
  b = dummy_inference_image(np.random.default_rng(0))
  assert b.pixel_values.shape == (3, 512, 512) and b.grid_hw == (32, 32)
  assert 0.0 <= b.pixel_values.min() and b.pixel_values.max() <= 1.0 and b.pixel_values.std() > 0.1


def test_load_image(tmp_path):
  good = tmp_path / "ok.png"
  _gradient(20, 30).convert("RGBA").save(good)
  im = load_image(good)
  assert im.mode == "RGB" and im.size == (30, 20)

  with pytest.raises(BadImageError, match="missing.png"):
    load_image(tmp_path / "missing.png")

  junk = tmp_path / "junk.jpg"
  junk.write_bytes(b"definitely not an image")
  with pytest.raises(BadImageError, match="junk.jpg"):
    load_image(junk)

  truncated = tmp_path / "cut.png"
  data = good.read_bytes()
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(BadImageError, match="cut.png"):
    load_image(truncated)
  assert issubclass(BadImageError, ValueError)


def write_bomb_png(path, side: int = 20000) -> str:
  """A 100-byte PNG whose header claims side x side pixels: over 2 x PIL's MAX_IMAGE_PIXELS, so
  Image.open raises DecompressionBombError (the pixel data is never there)."""
  import struct
  import zlib

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  png = (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    + chunk(b"IDAT", zlib.compress(b"\x00" * 4))
    + chunk(b"IEND", b"")
  )
  with open(path, "wb") as f:
    f.write(png)
  return str(path)


def test_image_over_the_pixel_limit_is_a_bad_image_naming_the_file(tmp_path):
  """Issue 13 item 1: PIL's DecompressionBombError (limit kept) is a BadImageError naming the file,
  for paths and for encoded bytes, so training skips it and the CLIs print one line."""
  bomb = write_bomb_png(tmp_path / "huge.png")
  assert Image.MAX_IMAGE_PIXELS and 20000**2 > 2 * Image.MAX_IMAGE_PIXELS  # the limit itself stays
  with pytest.raises(BadImageError, match=r"huge\.png.*too large"):
    load_image(bomb)
  with pytest.raises(BadImageError, match=r"huge\.png"):
    load_image(open(bomb, "rb").read(), name="huge.png")
  from cheers_jax.data.pipeline import preprocess_image

  with pytest.raises(BadImageError, match="too large"):
    preprocess_image(open(bomb, "rb").read(), "und", 32)
