"""Analytical FLOPs, MFU, and the metric writer (TensorBoard + console via CLU, always metrics.jsonl).

FLOPs follow torch's FlopCounterMode conventions (what the oracle's count_flops.py measured): only
matrix multiplies, convolutions and attention count, at 2 FLOPs per multiply-add; norms, activations
and elementwise ops are free. With T tokens of width D:
  linear D->E:                 2 T D E
  conv k x k, C->C' at HxW out: 2 H W C C' k^2
  attention (all heads):       4 T^2 D_heads   (QK^T and PV, full square: masks save nothing)
Per training sample (one sequence of `seq_len` tokens and `images_per_sample` images):
  F = sum over modules of factor(module) * forward FLOPs(module)
with factor 3 (forward + backward with weight gradients) for trainable modules, 2 for frozen modules
that gradients must pass through (the LLM in the `align` stage: activation gradients only), and 1
(forward only) for modules with nothing trainable upstream (the frozen VAE encoder; in `align` also
the decoder projector and SigLIP). The SigLIP pooling head is not counted (our port never computes
it; the reference does, 0.5% of its SigLIP count).
At full size, 512x512, seq 400, all_but_vae this gives 16.2 TFLOP, the oracle's figure.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from cheers_jax import targets
from cheers_jax.infer import images as images_lib
from cheers_jax.model.config import ModelConfig, TextConfig, VAEConfig, VisionConfig


# ---- FLOPs ----------------------------------------------------------------------------------------
def _conv(h: int, w: int, cin: int, cout: int, k: int) -> float:
  return 2.0 * h * w * cin * cout * k * k


def _resnet(res: int, cin: int, cout: int) -> float:
  f = _conv(res, res, cin, cout, 3) + _conv(res, res, cout, cout, 3)
  return f + (_conv(res, res, cin, cout, 1) if cin != cout else 0.0)


def _vae_mid(res: int, c: int) -> float:
  t = res * res
  return 2 * _resnet(res, c, c) + 4 * _conv(res, res, c, c, 1) + 4.0 * t * t * c


def vae_encoder_flops(v: VAEConfig, size: int) -> float:
  f, res, c = _conv(size, size, v.in_channels, v.ch, 3), size, v.ch
  for level, mult in enumerate(v.ch_mult):
    for _ in range(v.num_res_blocks):
      f += _resnet(res, c, v.ch * mult)
      c = v.ch * mult
    if level != len(v.ch_mult) - 1:
      res //= 2
      f += _conv(res, res, c, c, 3)  # stride-2 conv: output resolution
  f += _vae_mid(res, c)
  f += _conv(res, res, c, 2 * v.z_channels, 3) + _conv(res, res, 2 * v.z_channels, 2 * v.z_channels, 1)
  return f


def vae_decoder_flops(v: VAEConfig, size: int) -> float:
  res = size // 2 ** (len(v.ch_mult) - 1)
  c = v.ch * v.ch_mult[-1]
  f = _conv(res, res, v.z_channels, v.z_channels, 1) + _conv(res, res, v.z_channels, c, 3)
  f += _vae_mid(res, c)
  for level in reversed(range(len(v.ch_mult))):
    for _ in range(v.num_res_blocks + 1):
      f += _resnet(res, c, v.ch * v.ch_mult[level])
      c = v.ch * v.ch_mult[level]
    if level != 0:
      res *= 2
      f += _conv(res, res, c, c, 3)
  return f + _conv(res, res, c, v.out_ch, 3)


def siglip_flops(v: VisionConfig, size: int) -> float:
  t, d = (size // v.patch_size) ** 2, v.hidden_size
  layer = 2.0 * t * d * d * 4 + 4.0 * t * t * d + 2 * 2.0 * t * d * v.intermediate_size
  return 2.0 * t * 3 * v.patch_size**2 * d + v.num_layers * layer


def siglip_embedding_flops(v: VisionConfig, size: int) -> float:
  t = (size // v.patch_size) ** 2
  return 2.0 * t * 3 * v.patch_size**2 * v.hidden_size


def und_projector_flops(v: VisionConfig, t_cfg: TextConfig, size: int) -> float:
  n, d4 = (size // v.patch_size) ** 2 // 4, 4 * v.hidden_size
  return 2.0 * n * d4 * d4 + 2.0 * n * d4 * t_cfg.hidden_size


def llm_flops(t: TextConfig, seq_len: int) -> float:
  d, kv = t.hidden_size, t.num_kv_heads * t.head_dim
  layer = 2.0 * seq_len * d * (2 * d + 2 * kv) + 4.0 * seq_len**2 * d + 3 * 2.0 * seq_len * d * t.intermediate_size
  return t.num_layers * layer


def lm_head_flops(t: TextConfig, seq_len: int) -> float:
  return 2.0 * seq_len * t.hidden_size * t.vocab_size


def dit_flops(width: int, heads: int, kv_heads: int, layers: int, tokens: int, out: int) -> float:
  hd = width // heads
  block = (
    2.0 * tokens * width * (2 * width + 2 * kv_heads * hd)
    + 4.0 * tokens**2 * width
    + 3 * 2.0 * tokens * width * 4 * width
    + 2.0 * width * 6 * width
  )
  return layers * block + 2.0 * width * 2 * width + 2.0 * tokens * width * out


def time_embed_flops(t: TextConfig, v: VisionConfig) -> float:
  return sum(2.0 * 256 * d + 2.0 * d * d for d in (t.hidden_size, v.hidden_size))


def forward_flops(cfg: ModelConfig, seq_len: int, image_size: int) -> dict[str, float]:
  """Forward FLOPs per module: the sequence part for `seq_len` tokens, the image parts per image."""
  t, v = cfg.text, cfg.vision
  n_img = (image_size // v.patch_size) ** 2 // 4
  return {
    "vae_encoder": vae_encoder_flops(cfg.vae, image_size),
    "vae_decoder_projector": vae_decoder_flops(cfg.vae, image_size),
    "siglip": siglip_flops(v, image_size) + siglip_embedding_flops(v, image_size),  # + hi_gate's embeddings
    "und_projector": und_projector_flops(v, t, image_size),
    "llm": llm_flops(t, seq_len),
    "lm_head": lm_head_flops(t, seq_len),
    "time_embed": time_embed_flops(t, v),
    "gen_projector": dit_flops(t.hidden_size, t.num_heads, t.num_kv_heads, cfg.gen_layers, n_img, 4 * v.hidden_size),
    "hi_gate": 2.0 * 4 * n_img * v.hidden_size * (v.hidden_size + 1),
    "hi_projector": dit_flops(v.hidden_size, v.num_heads, t.num_kv_heads, cfg.hi_layers, 4 * n_img, cfg.vae.ch),
  }


SEQUENCE_MODULES = ("llm", "lm_head")


def training_factors(trainable: str = "all_but_vae") -> dict[str, int]:
  """3 = forward + full backward, 2 = forward + activation gradients, 1 = forward only."""
  if trainable == "all_but_vae":
    return {
      "vae_encoder": 1,
      "vae_decoder_projector": 3,
      "siglip": 3,
      "und_projector": 3,
      "llm": 3,
      "lm_head": 3,
      "time_embed": 3,
      "gen_projector": 3,
      "hi_gate": 3,
      "hi_projector": 3,
    }
  if trainable == "all_but_vision_tokenizer":
    return {
      "vae_encoder": 1,
      "vae_decoder_projector": 1,
      "siglip": 1,
      "und_projector": 3,
      "llm": 3,
      "lm_head": 3,
      "time_embed": 3,
      "gen_projector": 3,
      "hi_gate": 3,
      "hi_projector": 3,
    }
  if trainable == "align":
    return {
      "vae_encoder": 1,
      "vae_decoder_projector": 1,
      "siglip": 1,
      "und_projector": 3,
      "llm": 2,
      "lm_head": 3,
      "time_embed": 3,
      "gen_projector": 3,
      "hi_gate": 3,
      "hi_projector": 3,
    }
  raise ValueError(f"unknown trainable set '{trainable}'")


def flops_breakdown(
  cfg: ModelConfig, seq_len: int, image_size: int, images_per_sample: float = 1.0, trainable: str = "all_but_vae"
) -> dict[str, float]:
  """Training FLOPs per sample, per module (factor x forward x count)."""
  fwd = forward_flops(cfg, seq_len, image_size)
  factors = training_factors(trainable)
  return {k: factors[k] * f * (1.0 if k in SEQUENCE_MODULES else images_per_sample) for k, f in fwd.items()}


def flops_per_sample(
  cfg: ModelConfig, seq_len: int, image_size: int, images_per_sample: float = 1.0, trainable: str = "all_but_vae"
) -> float:
  """Training FLOPs (forward + backward) of one sample; see the module docstring for the formula."""
  return float(sum(flops_breakdown(cfg, seq_len, image_size, images_per_sample, trainable).values()))


# ---- MFU (peak throughput per device: the hardware table, targets.CHIPS) ---------------------------
def mfu(flops_per_second: float, num_devices: int, device_kind: str) -> Optional[float]:
  peak = targets.peak_flops_per_device(device_kind)
  if peak is None or num_devices <= 0:
    return None
  return flops_per_second / (peak * num_devices)


# ---- writers ----------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
  if value is None:
    return None
  arr = np.asarray(value)
  if arr.ndim == 0:
    x = arr.item()
    return None if isinstance(x, float) and not np.isfinite(x) else x
  return arr.tolist()


class ConsoleWriter:
  """The last fallback (no CLU with TensorFlow, no tensorboard package): scalars to the log, images ignored."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()))
    logging.info("[%d] %s", step, text)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for k, v in texts.items():
      logging.info("[%d] %s: %s", step, k, v)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """TensorBoard event files without TensorFlow (the `tensorboard` package's own event writer and protos),
  scalars and texts also to the log: the writer when CLU cannot be used (CLU's imports TensorFlow, which
  the runtime requirements leave out: 1.3 GB and ~40 s of every install)."""

  def __init__(self, logdir: str | os.PathLike):
    self._events = EventFileWriter(str(logdir))
    self._console = ConsoleWriter()

  def _add(self, step: int, values: list) -> None:
    self._events.add_event(
      event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
    )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])
    self._console.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> (N, H, W, C) floats in [0, 1] or uint8; image i of N is tagged 'name/i' as CLU's."""
    values = []
    for name, batch in images.items():
      batch = np.asarray(batch)
      if batch.dtype != np.uint8:
        batch = images_lib.to_uint8(batch)
      for i, img in enumerate(batch):
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, format="PNG")
        h, w, c = img.shape
        png = summary_pb2.Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())
        values.append(summary_pb2.Summary.Value(tag=f"{name}/{i}" if len(batch) > 1 else name, image=png))
    self._add(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])
    values = [
      summary_pb2.Summary.Value(
        tag=k,
        metadata=meta,
        tensor=tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[str(v).encode()], tensor_shape=shape),
      )
      for k, v in texts.items()
    ]
    self._add(step, values)
    self._console.write_texts(step, texts)

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


class MetricWriter:
  """CLU's default writer (TensorBoard + console) plus `workdir/metrics.jsonl` (one line per write).

  Only process 0 writes. CLU is imported lazily (it imports TensorFlow); without TensorFlow the same
  TensorBoard events come from `TensorBoardWriter`, and without the tensorboard package either, the
  console; metrics.jsonl is written in every case.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.workdir = Path(workdir)
    self._jsonl = None
    self._writer: Any = ConsoleWriter()
    self._opening: Optional[threading.Thread] = None
    self.backend = "console"
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
    if tensorboard:
      # CLU imports TensorFlow (seconds): done in a thread, so it overlaps the first step's compilation;
      # the first write waits for it
      self._opening = threading.Thread(target=self._open_clu, name="clu-writer", daemon=True)
      self._opening.start()

  def _open_clu(self) -> None:
    try:
      from clu import metric_writers  # imports TensorFlow

      self._writer = metric_writers.create_default_writer(str(self.workdir), asynchronous=False)
      self.backend = "clu"
    except ImportError:  # no TensorFlow (the runtime requirements leave it out): TensorBoard without it
      try:
        self._writer = TensorBoardWriter(self.workdir)
        self.backend = "tensorboard"
      except ImportError as e:
        logging.warning("TensorBoard writer unavailable (%s); logging to the console and metrics.jsonl", e)

  @property
  def writer(self) -> Any:
    if self._opening is not None:
      self._opening.join()
      self._opening = None
    return self._writer

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _jsonable(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    self.writer.write_scalars(int(step), numeric)

  def drop_after(self, step: int) -> int:
    """Removes metrics.jsonl's rows of steps after `step`, and a last line cut short by a kill: a run
    resumed from checkpoint `step` replays those steps, so the file never holds a step twice. Returns
    the number of rows dropped."""
    if not self.enabled:
      return 0
    path = self.workdir / "metrics.jsonl"
    self._jsonl.close()
    kept, dropped = [], 0
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
          keep = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):  # a line cut short by SIGKILL
          keep = False
        if keep:
          kept.append(line if line.endswith("\n") else line + "\n")
        elif line.strip():
          dropped += 1
    if dropped:
      tmp = path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(kept))
      os.replace(tmp, path)
    self._jsonl = open(path, "a", buffering=1)
    return dropped

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> (N, H, W, C) or (H, W, C) floats in [0, 1] or uint8."""
    if not self.enabled:
      return
    batch = {k: (v[None] if np.ndim(v) == 3 else v) for k, v in images.items()}
    self.writer.write_images(int(step), batch)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **texts}) + "\n")
    if hasattr(self.writer, "write_texts"):
      self.writer.write_texts(int(step), dict(texts))

  def flush(self) -> None:
    if self.enabled:
      self.writer.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.writer.flush()
      self.writer.close()
      self._jsonl.close()
      self.enabled = False


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
