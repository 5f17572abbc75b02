"""Metric writers: TensorBoard events without TensorFlow (the runtime requirements leave it out)."""

from __future__ import annotations

import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from cheers_jax.train import metrics as metrics_lib


def _read(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
  acc.Reload()
  return acc


def test_tensorboard_writer_writes_scalars_images_and_texts(tmp_path):
  w = metrics_lib.TensorBoardWriter(tmp_path)
  w.write_scalars(3, {"loss": 1.5, "lr": 0.25})
  w.write_scalars(7, {"loss": 0.5})
  grid = np.zeros((2, 6, 4, 3), np.float32)
  grid[1, :, :, 0] = 1.0
  w.write_images(7, {"samples": grid, "one": np.full((1, 5, 5, 3), 200, np.uint8)})
  w.write_texts(7, {"captions": "a red circle"})
  w.close()
  acc = _read(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 1.5), (7, 0.5)]
  assert acc.Scalars("lr")[0].value == 0.25
  tags = acc.Tags()
  assert {"samples/0", "samples/1", "one"} <= set(tags["images"])
  img = acc.Images("samples/1")[0]
  assert (img.step, img.width, img.height) == (7, 4, 6)
  text = acc.Tensors("captions")[0]
  assert text.step == 7 and text.tensor_proto.string_val == [b"a red circle"]


def test_without_tensorflow_the_metric_writer_still_writes_tensorboard(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "clu", None)  # `from clu import ...` raises ImportError, as without TF
  w = metrics_lib.MetricWriter(tmp_path)
  w.write_scalars(1, {"loss": 2.0, "note": "text is kept out of the scalars"})
  w.close()
  assert w.backend == "tensorboard"
  assert [(e.step, e.value) for e in _read(tmp_path).Scalars("loss")] == [(1, 2.0)]
  assert metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 2.0
