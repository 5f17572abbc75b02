"""A small safetensors reader (zero-copy numpy memmaps) and a streaming, sharded writer.

Format: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
tensor bytes (offsets relative to the end of the header, contiguous, no gaps). We implement it
directly so that bf16 comes back as `ml_dtypes.bfloat16` without torch, and so that the writer can
produce one tensor at a time instead of holding a whole model in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import ml_dtypes
import numpy as np

from cheers_jax.errors import UserError

PathLike = Union[str, os.PathLike]

# safetensors dtype code <-> numpy dtype (all little-endian).
_CODE_TO_DTYPE = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U64": np.dtype("<u8"),
  "U32": np.dtype("<u4"),
  "U16": np.dtype("<u2"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
_DTYPE_TO_CODE = {dt: code for code, dt in _CODE_TO_DTYPE.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


class SafetensorsFormatError(UserError):
  """A file is not valid safetensors (bad header, offsets or dtype); the message names the file."""


def dtype_from_code(code: str) -> np.dtype:
  if code not in _CODE_TO_DTYPE:
    raise SafetensorsFormatError(f"unsupported safetensors dtype '{code}'")
  return _CODE_TO_DTYPE[code]


def code_from_dtype(dtype: Any) -> str:
  dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
  if dt not in _DTYPE_TO_CODE:
    raise SafetensorsFormatError(f"dtype {dt} cannot be stored in safetensors")
  return _DTYPE_TO_CODE[dt]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # absolute byte offsets in the file
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


def read_header(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and validates the header only: ({name: TensorInfo}, __metadata__)."""
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise SafetensorsFormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER_BYTES, size - 8):
      raise SafetensorsFormatError(f"{path}: header length {n} is larger than the file allows")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsFormatError(f"{path}: header is not valid JSON ({e})") from e
  if not isinstance(header, dict):
    raise SafetensorsFormatError(f"{path}: header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  data_start = 8 + n
  infos: dict[str, TensorInfo] = {}
  for name, entry in header.items():
    try:
      dtype = dtype_from_code(entry["dtype"])
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise SafetensorsFormatError(f"{path}: bad header entry for '{name}': {entry!r}") from e
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected or begin < 0 or data_start + end > size:
      raise SafetensorsFormatError(
        f"{path}: tensor '{name}' {entry['dtype']}{list(shape)} needs {expected} bytes but its "
        f"data_offsets are [{begin}, {end}] (data section is {size - data_start} bytes)"
      )
    infos[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
  return infos, metadata


class SafetensorsFile:
  """Read-only view of one .safetensors file; `get` returns zero-copy memmap-backed arrays.

  The arrays share the file mapping: copy them (`np.array(x)`) before the file may change.
  """

  def __init__(self, path: PathLike):
    self.path = Path(path)
    self.tensors, self.metadata = read_header(self.path)
    self._buf: Optional[np.memmap] = None

  def keys(self) -> list[str]:
    return list(self.tensors)

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def get(self, name: str) -> np.ndarray:
    info = self.tensors[name]
    if self._buf is None:
      # one mapping per file; an empty file cannot be mapped (and holds no bytes anyway)
      self._buf = (
        np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else np.zeros((0,), np.uint8)
      )
    # uint8 slice -> view: no copy; numpy tolerates the (rare) unaligned offset
    return self._buf[info.begin : info.end].view(info.dtype).reshape(info.shape)

  def close(self) -> None:
    self._buf = None  # the mapping closes when the last view is gone

  def __enter__(self) -> "SafetensorsFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def load_file(path: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a file as memmap-backed arrays."""
  f = SafetensorsFile(path)
  return {name: f.get(name) for name in f.keys()}


# ---- writing -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor to write, produced only when its bytes are due (streaming export)."""

  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


TensorLike = Union[np.ndarray, LazyTensor]


def _as_lazy(t: TensorLike) -> LazyTensor:
  if isinstance(t, LazyTensor):
    return t
  arr = np.asarray(t)
  return LazyTensor(tuple(arr.shape), arr.dtype, lambda: arr)


def save_file(tensors: Mapping[str, TensorLike], path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> int:
  """Writes one .safetensors file, producing lazy tensors one at a time; returns the data bytes."""
  lazy = {name: _as_lazy(t) for name, t in tensors.items()}
  # widest dtypes first keeps every tensor aligned to its itemsize (as the reference writer does)
  order = sorted(lazy, key=lambda k: -np.dtype(lazy[k].dtype).itemsize)
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  for name in order:
    t = lazy[name]
    header[name] = {
      "dtype": code_from_dtype(t.dtype),
      "shape": list(t.shape),
      "data_offsets": [offset, offset + t.nbytes],
    }
    offset += t.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # pad so the data section starts 8-byte aligned
  tmp = Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
      t = lazy[name]
      arr = np.asarray(t.produce(), dtype=t.dtype, order="C")  # (ascontiguousarray would make 0-d 1-d)
      if tuple(arr.shape) != tuple(t.shape):
        raise ValueError(f"tensor '{name}' was declared {t.shape} but produced {arr.shape}")
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))
  os.replace(tmp, path)  # no half-written file under the final name
  return offset


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
  shards: list[list[str]] = []
  current: list[str] = []
  used = 0
  for name, nbytes in sizes:
    if current and used + nbytes > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += nbytes
  if current or not shards:
    shards.append(current)
  return shards


def save_sharded(
  tensors: Mapping[str, TensorLike],
  out_dir: PathLike,
  max_shard_bytes: int,
  prefix: str = "model",
  metadata: Optional[Mapping[str, str]] = None,
  index_name: str = "model.safetensors.index.json",
) -> dict:
  """Writes `{prefix}-0000i-of-0000n.safetensors` plus the HF index; returns the index dict.

  The index is always written (even for one shard) so that readers have a single layout to follow.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  lazy = {name: _as_lazy(t) for name, t in tensors.items()}
  shards = plan_shards([(k, t.nbytes) for k, t in lazy.items()], max_shard_bytes)
  weight_map: dict[str, str] = {}
  total = 0
  for i, names in enumerate(shards):
    fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    total += save_file({k: lazy[k] for k in names}, out_dir / fname, metadata)
    weight_map.update({k: fname for k in names})
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n")
  return index
