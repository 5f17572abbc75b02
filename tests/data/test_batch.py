"""The batch contract's pixels: uint8 on the host, divided by 255 on the device exactly as the reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from cheers_jax.data import batch as batch_lib
from cheers_jax.data.images import generation_image, understanding_image
from cheers_jax.model.cheers import unit_pixels
from cheers_jax.model.sequence import assemble
from tests.oracle import instance_params, load_golden


def reference_rescale(x: np.ndarray) -> np.ndarray:
  """transformers' rescale, as the reference processor applies it: float64 x * (1/255), then float32."""
  return (x.astype(np.float64) * (1 / 255)).astype(np.float32)


def test_unit_pixels_on_the_device_equal_the_reference_rescale_bit_for_bit():
  every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  got = np.asarray(jax.jit(unit_pixels)(every))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, reference_rescale(every))
  floats = reference_rescale(every)  # float pixels (inference) pass unchanged
  np.testing.assert_array_equal(np.asarray(jax.jit(unit_pixels)(floats)), floats)


@pytest.mark.parametrize("instance", instance_params())
def test_uint8_training_images_on_the_device_equal_the_reference_processor(instance):
  """The oracle's image through the pipeline's uint8 path (understanding_image / generation_image), divided
  on the device, gives the reference processor's pixel values bit for bit. (The golden train and forward
  groups feed float pixels, which `unit_pixels` passes unchanged: their parity cannot move.)"""
  golden = load_golden(instance)
  image = Image.fromarray(golden["preprocess.image_uint8"])
  size = golden["preprocess.und.pixel_values"].shape[-1]
  for name, fn in (("und", understanding_image), ("gen", generation_image)):
    as_uint8 = np.asarray(fn(image, size), np.uint8)[None]
    want = golden[f"preprocess.{name}.pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(jax.jit(unit_pixels)(as_uint8)), want)


def test_the_constructor_refuses_float_pixels():
  lay = assemble(np.array([[1, -200, 2]]), 4)
  t = np.ones(1, np.float32)
  ok = batch_lib.from_assembled(lay, 4, 1, np.zeros((1, 32, 32, 3), np.uint8), t)
  assert ok["pixels"].dtype == np.uint8
  with pytest.raises(TypeError, match="uint8"):
    batch_lib.from_assembled(lay, 4, 1, np.zeros((1, 32, 32, 3), np.float32), t)
