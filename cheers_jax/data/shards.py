"""Prepared shards: ArrayRecord files of conversations with their encoded images, each with a small index.

A prepared dataset is a folder of shard pairs (written by `python -m cheers_jax.data.prepare`):

  NAME-00003-of-00120.arrayrecord   records, ArrayRecord (group_size 1: random access, as grain wants)
  NAME-00003-of-00120.index.npz     the index: `category` int8 (und / gen / text), `length` int32 (text
                                    tokens of the training template, placeholders included), `num_images`
                                    int8 per record, and `meta`, a JSON string (format version, record
                                    count, shard size in bytes, source JSONL and line range, the lines
                                    and images left out with why)

The index is written last (atomically, by rename), so a shard without one is unfinished. Training
start-up reads only the indexes; records are read one by one, on demand, through grain's
ArrayRecordDataSource.

A record (FORMAT_VERSION 1) is MAGIC | uint32 header length | uint32 CRC-32 of everything after it |
the header, JSON: {"id", "messages": [{"role", "content"}], "image_kinds": ["und" | "gen"],
"image_names": [the image's path when prepared], "image_sizes": [bytes of each image]} | the images'
encoded bytes, one after another, as the files held them (unless prepare re-encoded them). The CRC
catches corruption that the container's own checks miss (riegeli hashes its chunk headers).
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter  # comes with grain

from cheers_jax.errors import UserError

FORMAT_VERSION = 1
MAGIC = b"CJS1"  # cheers-jax shard record; the digit is the record layout, FORMAT_VERSION the whole format
SHARD_SUFFIX = ".arrayrecord"
INDEX_SUFFIX = ".index.npz"
# Uncompressed: the images (most of the bytes) are JPEG / PNG already; zstd would cost CPU on every read.
WRITER_OPTIONS = "group_size:1,uncompressed"
_HEADER = struct.Struct("<4sII")
REPREPARE = (
  "rerun `python -m cheers_jax.data.prepare` into a new folder (or delete the shard and its index and "
  "rerun it into the same folder: finished shards are kept)"
)


class ShardError(UserError):
  """A prepared shard cannot be read as it should (truncated, corrupt, another format version)."""


# ------------------------------------------------------------------------------------------ records
def encode_record(example: Mapping[str, Any], images: Sequence[bytes]) -> bytes:
  """An example (id, messages, image_kinds, image names in "images") and its encoded images -> one record."""
  header = json.dumps(
    {
      "id": example["id"],
      "messages": list(example["messages"]),
      "image_kinds": list(example["image_kinds"]),
      "image_names": [os.fspath(p) for p in example.get("images", [])],
      "image_sizes": [len(b) for b in images],
    },
    ensure_ascii=False,
  ).encode()
  body = header + b"".join(images)
  return _HEADER.pack(MAGIC, len(header), zlib.crc32(body)) + body


def decode_record(record: bytes) -> dict[str, Any]:
  """One record -> the source example the pipeline reads (images as encoded bytes). ValueError if it is
  not a record of this format or its checksum does not match."""
  if len(record) < _HEADER.size:
    raise ValueError(f"{len(record)} bytes: too short for a record")
  magic, header_len, crc = _HEADER.unpack_from(record)
  if magic != MAGIC:
    raise ValueError(f"not a cheers-jax shard record (starts with {magic!r}, not {MAGIC!r})")
  body = memoryview(record)[_HEADER.size :]
  if zlib.crc32(body) != crc:
    raise ValueError("checksum mismatch: the record is corrupt")
  header = json.loads(bytes(body[:header_len]))
  images, pos = [], header_len
  for size in header["image_sizes"]:
    images.append(bytes(body[pos : pos + size]))
    pos += size
  if pos != len(body):
    raise ValueError(f"the images take {pos - header_len} bytes, the record holds {len(body) - header_len}")
  return {
    "id": header["id"],
    "messages": header["messages"],
    "images": images,
    "image_kinds": header["image_kinds"],
    "image_names": header["image_names"],
  }


# -------------------------------------------------------------------------------------------- files
def index_path(shard: str) -> str:
  return shard[: -len(SHARD_SUFFIX)] + INDEX_SUFFIX


def shard_name(stem: str, number: int, count: int) -> str:
  return f"{stem}-{number:05d}-of-{count:05d}{SHARD_SUFFIX}"


class ShardWriter:
  """Writes one shard, then its index, each to a temporary name renamed into place: a shard whose index
  exists is complete (an interrupted writer leaves only temporary files). Records stream to disk."""

  def __init__(self, path: str) -> None:
    self.path = os.fspath(path)
    self._tmp = f"{self.path}.tmp{os.getpid()}"
    self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
    self._category, self._length, self._num_images = [], [], []

  def add(self, record: bytes, category: int, length: int, num_images: int) -> None:
    self._writer.write(record)
    self._category.append(category)
    self._length.append(length)
    self._num_images.append(num_images)

  def __len__(self) -> int:
    return len(self._category)

  def close(self, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Finishes the shard; `meta` goes into its index. Returns the index's meta."""
    self._writer.close()
    os.replace(self._tmp, self.path)
    meta = {**meta, "format_version": FORMAT_VERSION, "records": len(self), "shard_bytes": os.path.getsize(self.path)}
    index = index_path(self.path)
    tmp_index = f"{index}.tmp{os.getpid()}.npz"
    np.savez(
      tmp_index,
      category=np.asarray(self._category, np.int8),
      length=np.asarray(self._length, np.int32),
      num_images=np.asarray(self._num_images, np.int8),
      meta=np.asarray(json.dumps(meta)),
    )
    os.replace(tmp_index, index)
    return meta


class ShardIndex(NamedTuple):
  path: str  # the .arrayrecord file
  category: np.ndarray  # int8 (n,)
  length: np.ndarray  # int32 (n,)
  num_images: np.ndarray  # int8 (n,)
  meta: dict


def read_index(shard: str, check_size: bool = True) -> ShardIndex:
  """A shard's index, checked: present, this format version, and the shard as large as when written."""
  index = index_path(shard)
  try:
    with np.load(index, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      out = ShardIndex(shard, z["category"], z["length"], z["num_images"], meta)
  except FileNotFoundError:
    raise ShardError(
      f"shard {shard} has no index {os.path.basename(index)} (its prepare run did not finish): {REPREPARE}"
    ) from None
  except (OSError, ValueError, KeyError) as e:
    raise ShardError(f"the index of shard {shard} is unreadable ({type(e).__name__}: {e}): {REPREPARE}") from e
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise ShardError(
      f"shard {shard} was prepared in shard format version {version}; this cheers_jax reads "
      f"version {FORMAT_VERSION}: re-prepare its data with this version's "
      "`python -m cheers_jax.data.prepare` (into a new folder)"
    )
  if check_size:
    try:
      size = os.path.getsize(shard)
    except OSError as e:
      raise ShardError(f"cannot read shard {shard}: {e.strerror or e}") from e
    if size != meta["shard_bytes"]:
      raise ShardError(
        f"shard {shard} is {size} bytes, its index says {meta['shard_bytes']}: truncated or "
        f"replaced (an interrupted copy?); copy it again or {REPREPARE}"
      )
  if not len(out.category) == len(out.length) == len(out.num_images) == meta["records"]:
    raise ShardError(f"the index of shard {shard} is inconsistent: {REPREPARE}")
  return out


def resolve_shards(pattern: str) -> list[str]:
  """A folder (its *.arrayrecord files), a glob, or one shard -> sorted shard paths; nothing is a UserError
  that names the pattern."""
  pattern = os.fspath(pattern)
  if os.path.isdir(pattern):
    found = glob.glob(os.path.join(glob.escape(pattern), "*" + SHARD_SUFFIX))
  else:
    found = [p for p in glob.glob(pattern) if p.endswith(SHARD_SUFFIX)]
  if not found:
    raise UserError(
      f"no prepared shard (*{SHARD_SUFFIX}) matches {pattern!r}: check the path, or prepare the "
      "data first with `python -m cheers_jax.data.prepare`"
    )
  return sorted(found)
