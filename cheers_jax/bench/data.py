"""python -m cheers_jax.bench data: the input pipeline's start-up, throughput and cost per stage.

  python -m cheers_jax.bench data --records 2000 --workers 0,1,2 --steps 20
  python -m cheers_jax.bench data --startup-records 10000000 --jsonl-startup-records 500000

Generated data in a temporary folder (or --workdir): --records official-format records (understanding,
generation, editing and text-only, in turn, as in the official Training/data/format.jsonl) with JPEGs
of several sizes, as a JSONL and as prepared shards of the same records. Then:
- start-up: seconds from building the pipeline to its first batch, JSONL source vs shards;
  --startup-records N adds shards of N tiny text-only records written straight by the shard writer
  (the start-up reads the indexes only, so record size does not matter to it; the JSONL source parses
  every line, so it is timed on --jsonl-startup-records lines and scaled linearly to N);
- throughput: samples/s and tokens/s (text tokens + image tokens of the assembled batch, padding
  excluded) of the whole pipeline at --image-size, per data.worker_count in --workers, both sources;
- stages: mean milliseconds per sample of read (the source's __getitem__: a JSONL line + image files,
  or a shard record), decode (JPEG -> RGB), preprocess (resize / crop / pad, to float), tokenise
  (training template) and assemble (collate one batch, per sample), in one process.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from cheers_jax import cli
from cheers_jax import config as config_lib
from cheers_jax.data import pipeline
from cheers_jax.data import prepare as prepare_lib
from cheers_jax.data import shards as shards_lib
from cheers_jax.data import sources as sources_lib
from cheers_jax.data.images import load_image
from cheers_jax.data.tokenizer import CheersTokenizer

IMAGE_SIZES = ((640, 480), (1024, 768), (512, 512), (480, 800), (320, 240))  # (W, H) JPEGs, in turn
KINDS = ("und", "gen", "edit", "text")


def _conversation(kind: str, i: int) -> list[dict[str, str]]:
  human = lambda v: {"from": "human", "value": v}
  gpt = lambda v: {"from": "gpt", "value": v}
  if kind == "und":
    return [human("<im_start><image><im_end>\nWhat is this?"), gpt(f"Picture number {i}, a blurred colour field.")]
  if kind == "gen":
    return [human(f"Colour field {i}.\nBased on the above description, generate an image."),
            gpt("<im_start><image_gen><im_end>")]
  if kind == "edit":
    return [human(f"<im_start><image><im_end>\nMake it look like picture {i}."), gpt("<im_start><image_gen><im_end>")]
  return [human(f"Please say something about the number {i}."), gpt(f"{i} is a number.")]


def _image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
  """Smooth colour noise (a 12x12 field upscaled): compresses like a photograph, unlike white noise."""
  small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
  return small.resize(size, Image.Resampling.BICUBIC)


def write_dataset(folder: str, count: int, seed: int = 0, kinds: Sequence[str] = KINDS,
                  image_sizes: Sequence[tuple[int, int]] = IMAGE_SIZES, num_images: Optional[int] = None,
                  start: int = 0) -> str:
  """`count` official-format records (kinds in turn; ids KIND-i, i from `start`, in the text too) in
  FOLDER/data.jsonl, their JPEGs in
  FOLDER/images (num_images distinct files, reused in turn; default: a file per use). Returns the JSONL."""
  images = os.path.join(folder, "images")
  os.makedirs(images, exist_ok=True)
  rng = np.random.default_rng(seed)
  used = 0

  def next_image() -> str:
    nonlocal used
    k = used if num_images is None else used % num_images
    used += 1
    name = f"{k:07d}.jpg"
    if not os.path.exists(os.path.join(images, name)):
      _image(rng, image_sizes[k % len(image_sizes)]).save(os.path.join(images, name), quality=90)
    return name

  path = os.path.join(folder, "data.jsonl")
  with open(path, "w") as f:
    for i in range(start, start + count):
      kind = kinds[(i - start) % len(kinds)]
      record: dict[str, Any] = {"id": f"{kind}-{i}", "conversations": _conversation(kind, i)}
      if kind in ("und", "gen"):
        record["image"] = next_image()
      elif kind == "edit":
        record["image"] = f"{next_image()}, {next_image()}"
      f.write(json.dumps(record) + "\n")
  return path
