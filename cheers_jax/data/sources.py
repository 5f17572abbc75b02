"""Record sources for training: random access (`__len__`, `__getitem__`), grain-compatible.

Every source yields raw examples (plain dicts, picklable):

  {"id": str,
   "messages": [{"role": "user" | "assistant" | "system", "content": str}, ...],
   "images": [path (str), encoded bytes or uint8 array (H, W, 3|1)], in placeholder order,
   "image_kinds": ["und" | "gen", ...]}   # one per image: <image> = understand, <image_gen> = generate

or a marker record `{"id": str, "error": str}` for an example that cannot be read (a malformed JSONL
line, ...); the pipeline counts and skips markers. Each source also gives `categories()`: the
und / gen / text category of every index without decoding images, so the pipeline can mix by ratio.

Sources: `JsonlSource` (the official conversation format), `ShardSource` (the same records prepared
into ArrayRecord shards by `python -m cheers_jax.data.prepare`: start-up reads small indexes, images
travel inside the records), `TfdsSource` (image + caption / label datasets as t2i and/or i2t samples;
TensorFlow is imported lazily), `SyntheticShapes` (the shapes demo of
`cheers_jax.demo.shapes`, drawn in-process), and `MultiSource` (several of them one after
another, with a sampling weight each: config.data.sources).
"""

from __future__ import annotations

import array
import bisect
import glob
import json
import math
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import grain
import numpy as np

from cheers_jax.data import shards as shards_lib
from cheers_jax.data.tokenizer import GEN_IMAGE_TEXT, UND_IMAGE_TEXT, normalize_messages
from cheers_jax.demo import shapes
from cheers_jax.errors import ConfigError, UserError, unknown_key


# Sample categories for mixing (config.data.mix keys), by the kinds of the sample's images.
CATEGORIES = ("und", "gen", "text")
UND, GEN, TEXT = 0, 1, 2

T2I_PROMPT = "Generate an image: {caption}"
I2T_PROMPT = "Describe the image."
TASKS = ("t2i", "i2t")

_PLACEHOLDER_RE = re.compile(r"<image_gen>|<image>")
_KIND_OF_PLACEHOLDER = {"<image>": "und", "<image_gen>": "gen"}
_ID_RE = re.compile(rb'"id"\s*:\s*"([^"\\]*)"')

Example = dict[str, Any]


def marker(example_id: str, error: str) -> Example:
  """A record standing for an unreadable example: the pipeline counts and skips it."""
  return {"id": example_id, "error": error}


def is_marker(example: Mapping[str, Any]) -> bool:
  return bool(example.get("error"))


def category_of_kinds(kinds: Sequence[str]) -> int:
  """gen if the sample generates any image (editing included), und if it only reads images, else text."""
  if "gen" in kinds:
    return GEN
  return UND if kinds else TEXT


def t2i_messages(caption: str) -> list[dict[str, str]]:
  return t2i_prompt_messages(T2I_PROMPT.format(caption=caption))


def t2i_prompt_messages(prompt: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": prompt}, {"role": "assistant", "content": GEN_IMAGE_TEXT}]


def i2t_messages(caption: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": UND_IMAGE_TEXT + "\n" + I2T_PROMPT}, {"role": "assistant", "content": caption}]


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
  tasks = tuple(tasks)
  if not tasks or any(t not in TASKS for t in tasks):
    raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
  return tasks


# ------------------------------------------------------------------------------------------- JSONL
BAD = 3  # the category of a JSONL line that is not a usable record: never drawn, reported once
MAX_NAMED_BAD_LINES = 1000  # bad lines kept by name for the report (all of them are counted)


class BadLine(NamedTuple):
  index: int  # the record index (blank lines are not records)
  line_number: int  # 1-based line of the file
  id: str  # the record's id when it can be read, else FILE:INDEX
  error: str


class JsonlSource:
  """The official JSONL conversation format, one JSON object per line:

    {"id": ..., "image": "a.jpg" | "src.jpg, tgt.jpg" | absent, "conversations": [{"from": "human" |
     "gpt", "value": "... <im_start><image><im_end> ..."}]}

  Images are matched to the <image> / <image_gen> placeholders in conversation order (editing: the
  source image is <image>, the target <image_gen>). The file is read once, line by line, never whole
  (the index keeps 17 bytes per line), and every line is PARSED: its category comes from its parsed
  placeholders. A line that is not a valid record (cut off, not JSON, no `conversations`, images that
  do not match the placeholders, non-UTF-8) is category BAD: never drawn, listed in `bad_lines` (the
  first MAX_NAMED_BAD_LINES; `num_bad_lines` counts all) for the pipeline to report, a marker if read.
  """

  def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike = "") -> None:
    self.path = os.fspath(path)
    # Relative image paths resolve against image_root, or the JSONL's folder when none is given.
    self.image_root = os.fspath(image_root) or os.path.dirname(os.path.abspath(self.path))
    offsets, ends, cats = array.array("q"), array.array("q"), array.array("b")
    self.bad_lines: list[BadLine] = []
    self.num_bad_lines = 0
    try:
      f = open(self.path, "rb")
    except OSError as e:  # missing, a folder, unreadable, a symlink loop: the user's path to fix
      raise UserError(f"cannot read the JSONL file {self.path!r} (data.jsonl_path): {e.strerror or e}") from e
    with f:
      pos = 0
      for line_number, line in enumerate(f, 1):
        if line.strip():
          example = self._read(line, len(offsets))
          if is_marker(example):
            cats.append(BAD)
            self.num_bad_lines += 1
            if len(self.bad_lines) < MAX_NAMED_BAD_LINES:
              self.bad_lines.append(BadLine(len(offsets), line_number, example["id"], example["error"]))
          else:
            cats.append(category_of_kinds(example["image_kinds"]))
          offsets.append(pos)
          ends.append(pos + len(line))
        pos += len(line)
    self._offsets = np.asarray(offsets, np.int64)
    self._ends = np.asarray(ends, np.int64)
    self._categories = np.asarray(cats, np.int8)
    self._fd = None
    self._pid = None

  def __len__(self) -> int:
    return len(self._offsets)

  def categories(self) -> np.ndarray:
    return self._categories

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_fd"] = state["_pid"] = None  # file descriptors do not cross processes
    return state

  def __del__(self, _getpid=os.getpid, _close=os.close) -> None:
    # bound at definition: at interpreter exit this module's globals (`os`) may already be None
    if getattr(self, "_fd", None) is not None and self._pid == _getpid():
      _close(self._fd)

  def _read_line(self, index: int) -> bytes:
    if self._fd is None or self._pid != os.getpid():
      self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
    start, end = int(self._offsets[index]), int(self._ends[index])
    return os.pread(self._fd, end - start, start)  # no shared file position: safe across reader threads

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self._read(self._read_line(index), index)

  def _read(self, line: bytes, index: int) -> Example:
    return parse_jsonl_line(line, f"{os.path.basename(self.path)}:{index}", self.image_root)


def parse_jsonl_line(line: bytes, fallback_id: str, image_root: str) -> Example:
  """One line of the official format -> an example (image paths joined to image_root), or a marker
  saying why it is not one. The one parser of the format: JsonlSource and the shard preparer use it."""
  try:
    record = json.loads(line)
  except ValueError as e:  # UnicodeDecodeError included
    m = _ID_RE.search(line)  # best effort, so the warning names the sample
    return marker(m.group(1).decode(errors="replace") if m else fallback_id, f"malformed JSON line: {e}")
  try:
    return _parse_record(record, fallback_id, image_root)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    rid = record.get("id", fallback_id) if isinstance(record, dict) else fallback_id
    what = f"no {e} field" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
    return marker(str(rid), f"malformed record: {what}")


def _parse_record(record: Mapping[str, Any], fallback_id: str, image_root: str) -> Example:
  if not isinstance(record, Mapping):
    raise TypeError("a line must hold a JSON object")
  rid = str(record.get("id", fallback_id))
  messages = normalize_messages(record["conversations"])
  if not messages:
    raise ValueError("empty conversations")
  for m in messages:
    if not isinstance(m["content"], str):
      raise TypeError("message values must be strings")
  kinds = [_KIND_OF_PLACEHOLDER[p] for m in messages for p in _PLACEHOLDER_RE.findall(m["content"])]
  image = record.get("image") or []
  # "a.jpg, b.jpg" or "a.jpg; b.jpg" (the official loader reads both) or a list
  paths = [p.strip() for p in image.replace(";", ",").split(",")] if isinstance(image, str) else list(image)
  if len(paths) != len(kinds) or not all(isinstance(p, str) and p for p in paths):
    raise ValueError(f"{len(kinds)} image placeholders but images {paths!r}")
  paths = [os.path.join(image_root, p) for p in paths]
  return {"id": rid, "messages": messages, "images": paths, "image_kinds": kinds}


# -------------------------------------------------------------------------------------------- TFDS
# Splits larger than this are not loaded into memory when the dataset is not in a random-access format.
_TFDS_IN_MEMORY_LIMIT = 50_000


def _tfds():
  """tensorflow_datasets, or a UserError saying how to install it (it brings TensorFlow, which the runtime
  requirements leave out)."""
  try:
    import tensorflow_datasets as tfds  # heavy (TensorFlow): the TFDS source only
  except ImportError as e:
    raise UserError(
      f"data.source='tfds' needs tensorflow-datasets and TensorFlow ({e}): pip install -r requirements-dev.txt"
    ) from e
  return tfds


class TfdsSource:
  """An image + caption (or image + ClassLabel) TFDS dataset as t2i and/or i2t samples.

  Index i is example i // len(tasks) as task tasks[i % len(tasks)]. t2i: user "Generate an image:
  {caption}" -> assistant <im_start><image_gen><im_end>; i2t: user <im_start><image><im_end> "Describe
  the image." -> assistant caption. A ClassLabel text feature gives its class name ('_' -> ' ').
  Nested features are addressed with '/', e.g. text_key='captions/text'. The dataset must be prepared
  (no downloads); array_record / parquet give random access, other formats are loaded into memory when
  small. tensorflow_datasets is imported only here, so the model never needs TensorFlow.
  """

  def __init__(
    self,
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    image_key: str = "image",
    text_key: str = "caption",
    tasks: Sequence[str] = TASKS,
  ) -> None:
    self.name, self.split, self.data_dir = name, split, (data_dir or None)
    self.image_key, self.text_key, self.tasks = image_key, text_key, _check_tasks(tasks)
    builder = self._builder()
    feature = _nested(builder.info.features, text_key)
    self.label_names = list(feature.names) if hasattr(feature, "names") else None
    self._num_examples = len(self._source())

  def _builder(self):
    return _tfds().builder(self.name, data_dir=self.data_dir)

  def _source(self):
    if getattr(self, "_src", None) is None:
      tfds = _tfds()
      builder = self._builder()
      fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format) or "")
      if fmt in ("array_record", "parquet"):
        self._src = builder.as_data_source(split=self.split)
      else:
        n = builder.info.splits[self.split].num_examples
        if n > _TFDS_IN_MEMORY_LIMIT:
          raise ValueError(
            f"TFDS dataset {self.name!r} is stored as {fmt or 'tfrecord'} ({n} examples): random access "
            "needs array_record; rebuild with `tfds build --file_format=array_record` or convert it with "
            "`tfds convert_format --out_file_format=array_record`"
          )
        ds = builder.as_dataset(split=self.split, shuffle_files=False)
        self._src = list(tfds.as_numpy(ds))
    return self._src

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_src"] = None  # reopened in each worker
    return state

  def __len__(self) -> int:
    return self._num_examples * len(self.tasks)

  def categories(self) -> np.ndarray:
    per_task = np.asarray([GEN if t == "t2i" else UND for t in self.tasks], np.int8)
    return np.tile(per_task, self._num_examples)

  def caption(self, value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) > 0:
      value = value[0] if len(value) else ""  # several captions per image: the first
    if self.label_names is not None:
      return self.label_names[int(value)].replace("_", " ")
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    return str(value).strip()

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    example_index, task = divmod(index, len(self.tasks))
    task = self.tasks[task]
    eid = f"{self.name}/{self.split}/{example_index}/{task}"
    try:
      ex = self._source()[example_index]
      image = _nested(ex, self.image_key)
      caption = self.caption(_nested(ex, self.text_key))
    except (KeyError, IndexError, ValueError, TypeError, UnicodeDecodeError) as e:
      return marker(eid, f"unreadable TFDS example: {type(e).__name__}: {e}")
    if not caption:
      return marker(eid, "empty caption")
    if task == "t2i":
      return {"id": eid, "messages": t2i_messages(caption), "images": [image], "image_kinds": ["gen"]}
    return {"id": eid, "messages": i2t_messages(caption), "images": [image], "image_kinds": ["und"]}


def _nested(tree: Any, key: str) -> Any:
  for part in key.split("/"):
    tree = tree[part]
  return tree


# --------------------------------------------------------------------------------------- synthetic
def shapes_prompt(caption: str) -> str:
  """The T2I prompt of a synthetic shape: 'a red circle' -> 'Generate an image: A RED CIRCLE' (the demo's
  prompts are in capitals: `demo.shapes.prompt_text`)."""
  return T2I_PROMPT.format(caption=shapes.prompt_text(caption))


class SyntheticShapes:
  """The shapes demo as a source (`cheers_jax.demo.shapes`): example `index` is the shape
  `shapes.sample_shape(seed, index)`, captioned 'a {colour} {shape}'. Even indices are i2t samples, odd
  ones t2i (prompt: `shapes_prompt`). Any process regenerates the same example.
  """

  def __init__(self, size: int = 20000, image_size: int = 64, seed: int = 0, gen_placement: str = "random") -> None:
    self.size, self.image_size, self.seed = int(size), int(image_size), int(seed)
    if gen_placement not in shapes.PLACEMENTS:
      raise ValueError(f"gen_placement {gen_placement!r}: choose one of {shapes.PLACEMENTS}")
    self.gen_placement = gen_placement

  def __len__(self) -> int:
    return self.size

  def categories(self) -> np.ndarray:
    return np.where(np.arange(self.size) % 2 == 0, UND, GEN).astype(np.int8)

  def shape(self, index: int) -> shapes.Shape:
    """Example `index`'s shape (a generation example's placed by `gen_placement`)."""
    return shapes.sample_shape(self.seed, index, "random" if index % 2 == 0 else self.gen_placement)

  def label(self, index: int) -> shapes.ShapeLabel:
    return self.shape(index).label

  def render(self, index: int) -> np.ndarray:
    """uint8 (image_size, image_size, 3)."""
    return shapes.render(self.shape(index), self.image_size)

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    shape = self.shape(index)
    caption = shapes.describe(shape.label)
    image = shapes.render(shape, self.image_size)
    if index % 2 == 0:
      return {"id": f"shapes/{index}", "messages": i2t_messages(caption), "images": [image], "image_kinds": ["und"]}
    return {
      "id": f"shapes/{index}",
      "messages": t2i_prompt_messages(shapes_prompt(caption)),
      "images": [image],
      "image_kinds": ["gen"],
    }


# ------------------------------------------------------------------------------------------ shards
class ShardSource:
  """Prepared shards as a random-access source (the `sources` contract: examples with images as
  encoded bytes, `categories()`). Start-up reads the indexes only; `lengths()` gives each record's
  text tokens without reading it. Records left out at prepare time are listed in `bad_lines` (first
  MAX_NAMED_BAD_LINES) and counted in `num_bad_lines`, as JsonlSource's unusable lines are.

  A record that cannot be read (truncated or corrupt shard) is a ShardError naming the shard and the
  record: the data must be repaired, not skipped. An image whose bytes do not decode is a bad_image
  skip of the pipeline, as for JSONL.
  """

  def __init__(self, pattern: str) -> None:
    self.path = os.fspath(pattern)
    self.shards = shards_lib.resolve_shards(self.path)
    indexes = [shards_lib.read_index(s) for s in self.shards]
    self._categories = np.concatenate([ix.category for ix in indexes])
    self._lengths = np.concatenate([ix.length for ix in indexes])
    self._num_images = np.concatenate([ix.num_images for ix in indexes])
    self._starts = np.cumsum([0] + [len(ix.category) for ix in indexes]).tolist()
    self.bad_lines: list[BadLine] = []
    self.num_bad_lines = 0
    for ix in indexes:
      for bad in ix.meta.get("bad", []):
        self.num_bad_lines += 1
        if len(self.bad_lines) < MAX_NAMED_BAD_LINES:
          self.bad_lines.append(
            BadLine(-1, bad["line"], bad["id"], f"left out when {bad['source']} was prepared: {bad['error']}")
          )
    self._records = None  # opened on first read, in each process

  def _data_source(self) -> grain.sources.ArrayRecordDataSource:
    if self._records is None:
      # 'path[0:n]' instructions: the counts come from the indexes, so no shard is opened here
      self._records = grain.sources.ArrayRecordDataSource(
        [f"{s}[0:{self._starts[i + 1] - self._starts[i]}]" for i, s in enumerate(self.shards)]
      )
    return self._records

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_records"] = None
    return state

  def __len__(self) -> int:
    return self._starts[-1]

  def categories(self) -> np.ndarray:
    return self._categories

  def lengths(self) -> np.ndarray:
    """Text tokens (training template, placeholders included) of every record."""
    return self._lengths

  def num_images(self) -> np.ndarray:
    return self._num_images

  def locate(self, index: int) -> tuple[str, int]:
    """(shard path, record number in it) of a global index."""
    shard = bisect.bisect_right(self._starts, index) - 1
    return self.shards[shard], index - self._starts[shard]

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    try:
      return shards_lib.decode_record(self._data_source()[index])
    except Exception as e:  # noqa: BLE001 -- riegeli raises RuntimeError, ours ValueError; both mean a bad shard
      shard, number = self.locate(index)
      raise shards_lib.ShardError(
        f"shard {shard}, record {number}: cannot be read ({type(e).__name__}: "
        f"{str(e)[:300]}); the shard is truncated or corrupt: {shards_lib.REPREPARE}"
      ) from e


# ------------------------------------------------------------------------------------ several sources
class MultiSource:
  """Sources one after another as one random-access source (index i of part k is start_k + i).
  `weights`: each part's sampling weight (the pipeline mixes the parts by them within every category);
  None = a plain concatenation (the files of one glob: drawn as their records come)."""

  def __init__(self, parts: Sequence[Any], weights: Sequence[float] | None = None, name: str = "") -> None:
    if not parts:
      raise ValueError("MultiSource needs at least one part")
    self.parts = list(parts)
    self.weights = None if weights is None else [float(w) for w in weights]
    self.path = name or ", ".join(source_label(p) for p in self.parts)
    self._starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def starts(self) -> list[int]:
    return self._starts[:-1]

  def categories(self) -> np.ndarray:
    return np.concatenate([np.asarray(p.categories(), np.int8) for p in self.parts])

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    k = bisect.bisect_right(self._starts, index) - 1
    return self.parts[k][index - self._starts[k]]


def source_label(source: Any) -> str:
  return getattr(source, "path", None) or type(source).__name__


def leaf_sources(source: Any) -> list[Any]:
  """The sources a MultiSource is made of, recursively (a plain source: itself)."""
  if isinstance(source, MultiSource):
    return [leaf for part in source.parts for leaf in leaf_sources(part)]
  return [source]


JSONL_SUFFIXES = (".jsonl", ".json")


def open_path(pattern: str, image_root: str = "") -> Any:
  """The source a path or glob names: a folder of prepared shards, a glob of shards, or JSONL files
  (one, or a glob of several: their concatenation). Nothing matched is a UserError naming the pattern."""
  pattern = os.fspath(pattern)
  if os.path.isdir(pattern) or pattern.endswith(shards_lib.SHARD_SUFFIX):
    return ShardSource(pattern)
  if not glob.has_magic(pattern):
    if not os.path.lexists(pattern):
      raise UserError(
        f"data source {pattern!r} does not exist: give a JSONL file, a glob, or a folder of prepared shards"
      )
    return _indexed_jsonl(pattern, image_root)
  files = sorted(glob.glob(pattern))
  if not files:
    raise UserError(f"no file matches {pattern!r}: check the path or glob")
  shard_files = [f for f in files if f.endswith(shards_lib.SHARD_SUFFIX)]
  if shard_files:
    if len(shard_files) != len(files):
      others = [f for f in files if not f.endswith(shards_lib.SHARD_SUFFIX)][:3]
      raise UserError(
        f"{pattern!r} matches prepared shards and other files ({', '.join(others)}): give a glob "
        f"that ends in *{shards_lib.SHARD_SUFFIX}, or one source entry per kind of file"
      )
    return ShardSource(pattern)
  jsonl = [_indexed_jsonl(f, image_root) for f in files if not os.path.isdir(f)]
  if not jsonl:
    raise UserError(f"{pattern!r} matches only folders; give a glob of JSONL files or of shards")
  return jsonl[0] if len(jsonl) == 1 else MultiSource(jsonl, name=pattern)


SOURCE_KEYS = ("path", "weight", "image_root")


def source_entries(entries: Any) -> list[dict[str, Any]]:
  """config.data.sources -> [{"path", "weight", "image_root"}]: each entry a dict with those keys (only
  path is required; weight defaults to 1) or a plain path string. Mistakes are ConfigErrors."""
  out = []
  for i, entry in enumerate(entries):
    where = f"data.sources[{i}]"
    if isinstance(entry, str):
      entry = {"path": entry}
    if hasattr(entry, "to_dict"):
      entry = entry.to_dict()
    if not isinstance(entry, Mapping):
      raise ConfigError(f"{where}={entry!r}: give a dict {{'path': ..., 'weight': ..., 'image_root': ...}} or a path")
    for key in entry:
      if key not in SOURCE_KEYS:
        raise ConfigError(unknown_key(f"{where}.{key}", key, SOURCE_KEYS))
    path = entry.get("path")
    if not isinstance(path, str) or not path:
      raise ConfigError(f"{where} has no path: give 'path' (a JSONL file, a glob, or a folder of prepared shards)")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
      raise ConfigError(f"{where}.weight={weight!r}: give a finite number >= 0")
    root = entry.get("image_root", "")
    if not isinstance(root, str):
      raise ConfigError(f"{where}.image_root={root!r}: give a folder path")
    out.append({"path": path, "weight": float(weight), "image_root": root})
  if out and not any(e["weight"] > 0 for e in out):
    raise ConfigError("data.sources: every weight is 0, so nothing would be drawn")
  return out


# ------------------------------------------------------------------------------------------ config
_JSONL_CACHE: dict = {}
_JSONL_CACHE_SIZE = 64  # the files of one run's data.sources


def clear_jsonl_indexes() -> None:
  """Forget the JSONL indexes kept for reuse (the next make_source parses the files again: a cold start)."""
  _JSONL_CACHE.clear()


def _indexed_jsonl(path: str, image_root: str) -> JsonlSource:
  """One index per unchanged file: the pipeline and the latent calibration share it (a 1 GB file takes
  ~40 s to parse; prepared shards start in seconds)."""
  try:
    st = os.stat(path)
    key = (os.path.abspath(path), os.fspath(image_root), st.st_mtime_ns, st.st_size, st.st_ino)
  except OSError:
    return JsonlSource(path, image_root)  # its own error message
  if key not in _JSONL_CACHE:
    if len(_JSONL_CACHE) >= _JSONL_CACHE_SIZE:
      _JSONL_CACHE.clear()
    _JSONL_CACHE[key] = JsonlSource(path, image_root)
  return _JSONL_CACHE[key]


def make_source(data_config: Any, seed: int = 0):
  """The source `config.data` names: the entries of data.sources (several, by weight; JSONL files, globs or
  prepared shards) when given, else data.source: synthetic | jsonl | tfds."""
  kind = data_config.source
  entries = source_entries(data_config.get("sources", None) or ())
  if entries:
    if kind in ("jsonl", "tfds"):
      raise ConfigError(
        f"data.sources and data.source={kind!r} both name the training data: keep one (an entry "
        "of data.sources may be a JSONL file)"
      )
    parts = [open_path(e["path"], e["image_root"]) for e in entries]
    return MultiSource(parts, [e["weight"] for e in entries])
  if kind == "synthetic":
    return SyntheticShapes(
      data_config.synthetic_size, data_config.image_size, seed, data_config.get("shapes_gen_placement", "random")
    )
  if kind == "jsonl":
    if not data_config.jsonl_path:
      raise ConfigError("data.source='jsonl' but data.jsonl_path is empty: give --config.data.jsonl_path=FILE")
    return _indexed_jsonl(data_config.jsonl_path, data_config.image_root)
  if kind == "tfds":
    if not data_config.tfds_name:
      raise ConfigError("data.source='tfds' but data.tfds_name is empty: give --config.data.tfds_name=NAME")
    return TfdsSource(
      data_config.tfds_name,
      data_config.tfds_split,
      data_config.tfds_data_dir or None,
      data_config.tfds_image_key,
      data_config.tfds_text_key,
      tuple(data_config.tfds_tasks),
    )
  raise ConfigError(f"data.source={kind!r}: choose synthetic, jsonl or tfds (or give data.sources)")
