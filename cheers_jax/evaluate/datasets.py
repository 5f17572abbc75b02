"""The understanding benchmarks of the official `eval.sh`, and VLMEvalKit's TSV files (its LMUData folder).

A TSV row has `index`, `question` and `image`; `image` is a base64 image, another row's `index` (a
pointer: VLMEvalKit resolves any value of at most 64 characters that way), or a Python list literal of
base64 images. MCQ files add the options `A`.., `hint`, `answer`, `category`, `l2-category`, `split`.

Images reach the model as the official pipeline hands them over: VLMEvalKit writes each decoded image
to disk first (`ImageBaseDataset.dump_image`: a single image as `<index>.jpg`, a list as
`<index>_<i>.png`, or the row's `image_path` names; palette/alpha modes become RGB), and the wrapper
reads that file back. A single image therefore goes through a JPEG encode at PIL's default quality;
`decode_image` does the same in memory.
"""

from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import io
import os
import string
from typing import Optional

import numpy as np

from cheers_jax.errors import UserError
from cheers_jax.data.images import BadImageError, open_image, preprocess_understanding

MCQ, YORN, VQA = "MCQ", "Y/N", "VQA"


class DatasetError(UserError):
  """A dataset name or file the harness cannot use; the message says what to do."""


class BadRowImage(UserError):
  """A row's image cannot be decoded: the row is reported and counted, never scored."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  family: str  # VLMEvalKit's DATASET_TYPE: MCQ, Y/N or VQA
  metric: str  # mcq, mcq_circular, mmmu, pope, vqa_score, relaxed_accuracy, ocrbench, judge
  unit: str  # how `overall` is expressed, as VLMEvalKit reports it
  note: str = ""


# The 12 datasets of Evaluation_Understanding/eval.sh. Classes and metrics: vlmeval/dataset/image_mcq.py
# (ImageMCQDataset, MMMUDataset), image_yorn.py (POPE), image_vqa.py (ImageVQADataset, OCRBench, MathVista).
DATASETS = {
  s.name: s
  for s in (
    DatasetSpec(
      "MathVista_MINI",
      VQA,
      "judge",
      "",
      "scored by a GPT judge (gpt-4o-mini) in VLMEvalKit: predictions are written, no score",
    ),
    DatasetSpec("MMBench_DEV_EN_V11", MCQ, "mcq_circular", "fraction"),
    DatasetSpec("SEEDBench_IMG", MCQ, "mcq", "fraction"),
    DatasetSpec("MMStar", MCQ, "mcq", "fraction"),
    DatasetSpec("POPE", YORN, "pope", "percent", "overall = F1 of 'Yes' over all rows"),
    DatasetSpec("RealWorldQA", MCQ, "mcq", "fraction"),
    DatasetSpec("MMMU_DEV_VAL", MCQ, "mmmu", "fraction", "overall = the 'validation' split"),
    DatasetSpec("ScienceQA_TEST", MCQ, "mcq", "fraction"),
    DatasetSpec("AI2D_TEST", MCQ, "mcq", "fraction"),
    DatasetSpec("OCRBench", VQA, "ocrbench", "points of 1000"),
    DatasetSpec("TextVQA_VAL", VQA, "vqa_score", "percent"),
    DatasetSpec("ChartQA_TEST", VQA, "relaxed_accuracy", "percent"),
  )
}


def dataset_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise DatasetError(
      f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} (the names of the "
      "official eval.sh; the name picks the prompt and the scorer)"
    )
  return DATASETS[name]


def read_tsv(path: str | os.PathLike, need_images: bool = True):
  """A VLMEvalKit TSV as a DataFrame of strings (empty cells are NaN, as pandas reads them).

  Rows without an image are dropped as VLMEvalKit does (`skip_noimg`); pointer images are resolved to
  the row they point at. Returns (frame, n_rows_without_image).
  """
  import pandas as pd  # pandas: the evaluation's TSV files only

  try:
    data = pd.read_csv(path, sep="\t", dtype=str)
  except FileNotFoundError as e:
    raise DatasetError(f"data file not found: {os.fspath(path)!r}") from e
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise DatasetError(f"cannot read {os.fspath(path)!r} as a tab-separated file: {e}") from e
  missing = [c for c in ("index", "question") + (("image",) if need_images else ()) if c not in data.columns]
  if missing:
    raise DatasetError(
      f"{os.fspath(path)!r} has no column(s) {', '.join(missing)}: give a VLMEvalKit TSV (index, question, image, ...)"
    )
  if data["index"].isna().any():
    raise DatasetError(f"{os.fspath(path)!r}: some rows have an empty `index`")
  if data["index"].duplicated().any():
    dup = data["index"][data["index"].duplicated()].iloc[0]
    raise DatasetError(f"{os.fspath(path)!r}: index {dup!r} occurs more than once")
  dropped = 0
  if "image" in data.columns:
    keep = ~data["image"].isna()
    dropped = int((~keep).sum())
    data = data[keep].reset_index(drop=True)
    data["image"] = resolve_pointers(list(data["index"]), list(data["image"]))
  return data, dropped


def resolve_pointers(indices: list[str], images: list[str]) -> list[str]:
  """`image` values of at most 64 characters name another row's index; that row's image is used.
  A pointer to a missing row or to another pointer is left as it is (decoding it fails, visibly)."""
  by_index = dict(zip(indices, images))
  out = []
  for img in images:
    target = by_index.get(img) if len(img) <= 64 else None
    out.append(target if target is not None and len(target) > 64 else img)
  return out


def image_cells(row) -> list[tuple[str, str]]:
  """(base64, file name) of each image of a row, with the name VLMEvalKit would write it under."""
  import pandas as pd  # pandas: the evaluation's TSV files only

  value = row["image"]
  if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
    try:
      images = [str(x) for x in ast.literal_eval(value)]
    except (ValueError, SyntaxError) as e:
      raise BadRowImage(f"row {row['index']}: the image cell looks like a list but does not parse: {e}") from e
    if "image_path" in row and not pd.isna(row["image_path"]):
      names = _list_cell(row["image_path"])
    else:
      names = [f"{row['index']}_{i}.png" for i in range(len(images))]
    if len(names) != len(images):
      raise BadRowImage(f"row {row['index']}: {len(images)} images but {len(names)} image_path names")
    return list(zip(images, names))
  name = f"{row['index']}.jpg"
  if "image_path" in row and not pd.isna(row["image_path"]):
    name = _list_cell(row["image_path"])[0]
  return [(str(value), name)]


def _list_cell(value) -> list[str]:
  text = str(value)
  if text.startswith("[") and text.endswith("]"):
    return [str(x) for x in ast.literal_eval(text)]
  return [text]


_SAVE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".gif": "GIF"}


def decode_image(b64: str, file_name: str = "image.jpg"):
  """A base64 image as the wrapper reads it: decoded, palette/alpha modes to RGB, written in the format
  of `file_name`'s extension (JPEG at PIL's defaults for VLMEvalKit's `<index>.jpg`), read back as RGB."""
  shown = b64 if len(b64) <= 64 else b64[:20] + "..."
  try:
    im = open_image(base64.b64decode(b64, validate=False), name=file_name)
  except (binascii.Error, BadImageError) as e:
    reason = getattr(e, "reason", str(e))
    raise BadRowImage(f"cannot decode image {file_name!r} ({shown!r}): {reason}") from e
  if im.mode in ("RGBA", "P", "LA"):
    im = im.convert("RGB")
  fmt = _SAVE_FORMATS.get(os.path.splitext(file_name)[1].lower())
  if fmt is None:
    return im.convert("RGB")
  buf = io.BytesIO()
  try:
    im.save(buf, format=fmt)
  except (OSError, ValueError, KeyError) as e:
    raise BadRowImage(f"cannot decode image {file_name!r} ({shown!r}): {e}") from e
  return open_image(buf.getvalue(), name=file_name, mode="RGB")


def preprocess_row_images(row, resolution: int, patch_size: int) -> list[np.ndarray]:
  """Every image of a row at the model's resolution, (res, res, 3) float32 in [0, 1] (resized so the
  longer side is `resolution` and padded, as the wrapper's processor with max_resolution=512)."""
  out = []
  for b64, name in image_cells(row):
    img = decode_image(b64, name)
    out.append(
      preprocess_understanding(img, resolution=resolution, patch_size=patch_size).pixel_values.transpose(1, 2, 0)
    )
  return out


def is_missing(value) -> bool:
  return value is None or (isinstance(value, float) and np.isnan(value))


def option_letters(row) -> list[str]:
  """The option columns A..Z present in a row with a non-empty value, in order."""
  return [c for c in string.ascii_uppercase if c in row and not is_missing(row[c])]


def as_int_index(value: str) -> Optional[int]:
  try:
    return int(value)
  except (TypeError, ValueError):
    try:
      f = float(value)
      return int(f) if f.is_integer() else None
    except (TypeError, ValueError):
      return None
