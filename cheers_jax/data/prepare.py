"""Prepare training data: official-format JSONL files + their images -> ArrayRecord shards with indexes.

  python -m cheers_jax.data.prepare prepare --input train.jsonl --image-root images/ --output shards/
  python -m cheers_jax.data.prepare inspect shards/

`prepare` reads each JSONL (the format of the official Training/data/format.jsonl), parses every line
with the parser the JSONL source uses, reads each image's encoded bytes, and writes shards of
--records-per-shard records (`cheers_jax.data.shards`): NAME-00000-of-00012.arrayrecord + .index.npz,
NAME = the JSONL's file name without extension. Train on them with
`--config.data.sources="['shards/']"` (or a glob of them).

- Work: shard k of the input's non-blank lines [k*R, (k+1)*R). Shard g of all inputs belongs to task
  g % --num-tasks: run task i of n on each machine (a SLURM array index, a pod worker) with
  --task-index i --num-tasks n; each writes its own shards. --processes shards at a time locally.
- Resumable: a shard whose index exists is complete and kept; a rerun writes the others.
- Every line or image left out (malformed line, image file missing or not an image, a conversation the
  tokenizer refuses) is named (source, line, id, why) in the task's report file
  (OUTPUT/report-task00000-of-00001.jsonl: a summary line, then one line per left-out record) and
  counted, per input, on stdout. Nothing stops the run.
- Image bytes are copied as they are. --max-side S re-encodes, opt-in, the images larger than training
  at image_size S would use: an image to understand with a long side over S gets a long side of S, an
  image to generate with a short side over S a short side of S (aspect kept, bicubic), re-encoded as
  JPEG quality 95 (PNG for images with transparency or a palette, and PNG inputs). Their pixels then
  differ from the originals' (training resizes them again); smaller images are copied as they are.

`inspect` prints the records per source JSONL and category, what prepare left out, and decodes a few
records (their conversation, image kinds and sizes).
"""

from __future__ import annotations

import array
import collections
import glob
import io
import json
import multiprocessing
import os
import sys
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from cheers_jax import cli
from cheers_jax.data import shards as shards_lib
from cheers_jax.data import sources as sources_lib
from cheers_jax.data.images import BadImageError, load_image
from cheers_jax.data.tokenizer import CheersTokenizer
from cheers_jax.errors import UserError

DEFAULT_RECORDS_PER_SHARD = 10_000  # ~1 GB of 100 KB images: few files, and each stays quick to copy
REENCODE_JPEG_QUALITY = 95


class ShardJob(NamedTuple):
  """One shard to write: the records [first_record, first_record + records) of one input."""

  input: str
  image_root: str
  output: str  # the shard's path
  offset: int  # byte offset of its first line
  first_record: int
  first_line: int  # 1-based line number of its first record
  records: int
  max_side: int  # 0 = copy the image bytes as they are


def scan_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(byte offset, 1-based line number) of every non-blank line, as JsonlSource counts records."""
  offsets, numbers = array.array("q"), array.array("q")
  try:
    f = open(path, "rb")
  except OSError as e:
    raise UserError(f"cannot read the input JSONL {path!r}: {e.strerror or e}") from e
  with f:
    pos = 0
    for number, line in enumerate(f, 1):
      if line.strip():
        offsets.append(pos)
        numbers.append(number)
      pos += len(line)
  return np.asarray(offsets, np.int64), np.asarray(numbers, np.int64)


def input_stem(path: str) -> str:
  name = os.path.basename(path)
  return name.rsplit(".", 1)[0] if "." in name else name


def plan(
  inputs: Sequence[str],
  image_roots: Sequence[str],
  output: str,
  records_per_shard: int,
  task_index: int = 0,
  num_tasks: int = 1,
  max_side: int = 0,
) -> tuple[list[ShardJob], dict[str, int]]:
  """This task's shards (shard g of all inputs, in input order, is task g % num_tasks's) and the number of
  records of every input."""
  stems = collections.Counter(input_stem(p) for p in inputs)
  twice = [s for s, n in stems.items() if n > 1]
  if twice:
    raise UserError(
      f"several inputs are named {twice[0]!r} (shard names come from the JSONL's name): prepare them "
      "into separate --output folders (one data.sources entry each), or rename them"
    )
  jobs, counts = [], {}
  for path, root in zip(inputs, image_roots):
    offsets, numbers = scan_lines(path)
    counts[path] = len(offsets)
    count = -(-len(offsets) // records_per_shard)
    for k in range(count):
      first = k * records_per_shard
      jobs.append(
        ShardJob(
          path,
          root,
          os.path.join(output, shards_lib.shard_name(input_stem(path), k, count)),
          int(offsets[first]),
          first,
          int(numbers[first]),
          min(records_per_shard, len(offsets) - first),
          max_side,
        )
      )
  return jobs[task_index::num_tasks], counts


# ------------------------------------------------------------------------------------- one shard
_TOKENIZER: Optional[CheersTokenizer] = None


def _tokenizer() -> CheersTokenizer:
  global _TOKENIZER
  if _TOKENIZER is None:  # one per process
    _TOKENIZER = CheersTokenizer()
  return _TOKENIZER


def _reencode(data: bytes, kind: str, max_side: int) -> Optional[bytes]:
  """The image resized so that training at image_size max_side loses nothing (see the module
  docstring), or None when it is small enough already."""
  with Image.open(io.BytesIO(data)) as im:
    w, h = im.size
    side = max(w, h) if kind == "und" else min(w, h)
    if side <= max_side:
      return None
    fmt = "PNG" if im.format == "PNG" or im.mode in ("RGBA", "LA", "P", "PA") else "JPEG"
    scale = max_side / side
    im = im.convert("RGBA" if fmt == "PNG" and im.mode in ("RGBA", "LA", "PA", "P") else "RGB")
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, fmt, **({"quality": REENCODE_JPEG_QUALITY} if fmt == "JPEG" else {}))
    return out.getvalue()


def _read_images(example: dict[str, Any], max_side: int) -> tuple[list[bytes], int]:
  """Each image's encoded bytes (its header checked: a format PIL reads) and how many were re-encoded.
  BadImageError when one cannot be read."""
  data, reencoded = [], 0
  for path, kind in zip(example["images"], example["image_kinds"]):
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except OSError as e:
      raise BadImageError(f"image {path!r}: {e.strerror or e}") from e
    try:
      with Image.open(io.BytesIO(raw)) as im:  # the header only: a cut-off image is a skip at training
        im.size  # noqa: B018
      small = _reencode(raw, kind, max_side) if max_side else None
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for a file that is not an image
      raise BadImageError(f"image {path!r} is not an image PIL can read: {type(e).__name__}: {e}") from e
    if small is not None:
      raw, reencoded = small, reencoded + 1
    data.append(raw)
  return data, reencoded


def prepare_shard(job: ShardJob) -> dict[str, Any]:
  """Writes one shard (or keeps it, when finished before); returns its index's meta and `resumed`."""
  want = {
    "source": os.path.abspath(job.input),
    "first_record": job.first_record,
    "max_side": job.max_side,
    "shard": os.path.basename(job.output),
  }
  if os.path.exists(shards_lib.index_path(job.output)):
    meta = shards_lib.read_index(job.output).meta
    if {k: meta.get(k) for k in want} != want or meta["records"] + len(meta["bad"]) != job.records:
      raise UserError(
        f"{job.output} was prepared from other inputs or settings ({meta.get('source')}, first "
        f"record {meta.get('first_record')}, max_side {meta.get('max_side')}): write into a new "
        "--output folder"
      )
    return {**meta, "resumed": True}
  for stale in glob.glob(glob.escape(job.output) + ".tmp*") + glob.glob(
    glob.escape(shards_lib.index_path(job.output)) + ".tmp*"
  ):
    os.remove(stale)  # an interrupted run's leftovers
  writer = shards_lib.ShardWriter(job.output)
  bad, reencoded = [], 0
  name = os.path.basename(job.input)
  with open(job.input, "rb") as f:
    f.seek(job.offset)
    index, line_number = job.first_record, job.first_line - 1
    for line in f:
      line_number += 1
      if not line.strip():
        continue
      if index == job.first_record + job.records:
        break
      example = sources_lib.parse_jsonl_line(line, f"{name}:{index}", job.image_root)
      index += 1
      reason = "malformed"
      try:
        if sources_lib.is_marker(example):
          raise ValueError(example["error"])
        reason = "bad_image"
        images, n = _read_images(example, job.max_side)
        reason = "malformed"
        ids, _ = _tokenizer().build_conversation(example["messages"])
      except (ValueError, TypeError, KeyError, AttributeError) as e:  # BadImageError is a ValueError
        bad.append({"source": job.input, "line": line_number, "id": example["id"], "reason": reason, "error": str(e)})
        continue
      reencoded += n
      writer.add(
        shards_lib.encode_record(example, images),
        sources_lib.category_of_kinds(example["image_kinds"]),
        len(ids),
        len(images),
      )
  meta = writer.close(
    {**want, "image_root": job.image_root, "first_line": job.first_line, "bad": bad, "reencoded": reencoded}
  )
  return {**meta, "resumed": False}


# ------------------------------------------------------------------------------------ whole runs
def report_path(output: str, task_index: int, num_tasks: int) -> str:
  return os.path.join(output, f"report-task{task_index:05d}-of-{num_tasks:05d}.jsonl")


def prepare(
  inputs: Sequence[str],
  image_roots: Sequence[str],
  output: str,
  *,
  records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
  processes: int = 1,
  task_index: int = 0,
  num_tasks: int = 1,
  max_side: int = 0,
  log=print,
) -> dict[str, Any]:
  """Prepares this task's shards (see the module docstring); returns the report's summary."""
  if not 0 <= task_index < num_tasks:
    raise UserError(f"--task-index {task_index} is not in [0, --num-tasks {num_tasks})")
  os.makedirs(output, exist_ok=True)
  jobs, counts = plan(inputs, image_roots, output, records_per_shard, task_index, num_tasks, max_side)
  if max_side:
    log(
      f"re-encoding (--max-side {max_side}): images to understand with a long side over {max_side} px and "
      f"images to generate with a short side over {max_side} px are downscaled to that side (bicubic, aspect "
      f"kept) and re-encoded (JPEG quality {REENCODE_JPEG_QUALITY}, PNG for PNG and transparent images); "
      "the others are copied as they are"
    )
  results = []
  done = [os.path.exists(shards_lib.index_path(j.output)) for j in jobs]  # kept shards need no process
  finished = [j for j, d in zip(jobs, done) if d]
  pending = [j for j, d in zip(jobs, done) if not d]
  for job in finished + (pending if processes == 1 or len(pending) == 1 else []):
    results.append(prepare_shard(job))
    _log_shard(log, results[-1], len(results), len(jobs))
  if len(results) < len(jobs):
    # spawn: the tokenizer's threads do not survive a fork
    with multiprocessing.get_context("spawn").Pool(min(processes, len(pending))) as pool:
      for meta in pool.imap_unordered(prepare_shard, pending):
        results.append(meta)
        _log_shard(log, meta, len(results), len(jobs))
  summary = _summary(results, counts, task_index, num_tasks)
  path = report_path(output, task_index, num_tasks)
  with open(path + ".tmp", "w") as f:
    f.write(json.dumps({"summary": summary}) + "\n")
    for meta in sorted(results, key=lambda m: (m["source"], m["first_record"])):
      for bad in meta["bad"]:
        f.write(json.dumps(bad, ensure_ascii=False) + "\n")
  os.replace(path + ".tmp", path)
  for source, s in summary["inputs"].items():
    left = ", ".join(f"{r} {n}" for r, n in s["left_out"].items())
    log(
      f"{source}: {s['records']} lines in this task's shards -> {s['written']} records written in {s['shards']} "
      f"shards ({s['resumed']} kept from before); left out {sum(s['left_out'].values())}"
      + (f" ({left})" if left else "")
      + f"; re-encoded images {s['reencoded']}"
    )
  log(f"report: {path}")
  return summary


def _log_shard(log, meta: dict[str, Any], done: int, total: int) -> None:
  log(
    f"[{done}/{total}] {meta['shard']}: {meta['records']} records, {len(meta['bad'])} left out"
    + (" (kept from a previous run)" if meta["resumed"] else "")
  )


def _summary(
  results: Sequence[dict[str, Any]], counts: dict[str, int], task_index: int, num_tasks: int
) -> dict[str, Any]:
  inputs: dict[str, Any] = {
    os.path.abspath(path): {
      "lines_in_input": n,
      "records": 0,
      "written": 0,
      "shards": 0,
      "resumed": 0,
      "left_out": {},
      "reencoded": 0,
    }
    for path, n in counts.items()
  }  # an input without a shard in this task says so too
  for meta in results:
    s = inputs[meta["source"]]
    s["records"] += meta["records"] + len(meta["bad"])
    s["written"] += meta["records"]
    s["shards"] += 1
    s["resumed"] += int(meta["resumed"])
    s["reencoded"] += meta["reencoded"]
    for bad in meta["bad"]:
      s["left_out"][bad["reason"]] = s["left_out"].get(bad["reason"], 0) + 1
  return {"task_index": task_index, "num_tasks": num_tasks, "inputs": inputs}


# --------------------------------------------------------------------------------------- inspect
def describe(pattern: str, samples: int = 3, log=print) -> dict[str, Any]:
  """Counts per source JSONL and category (and what prepare left out), then a few records decoded."""
  paths = shards_lib.resolve_shards(pattern)
  per_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  left_out: collections.Counter = collections.Counter()
  for shard in paths:
    ix = shards_lib.read_index(shard)
    counts = np.bincount(ix.category, minlength=len(sources_lib.CATEGORIES))
    for c, name in enumerate(sources_lib.CATEGORIES):
      per_source[ix.meta["source"]][name] += int(counts[c])
    for bad in ix.meta["bad"]:
      left_out[(ix.meta["source"], bad["reason"])] += 1
  log(f"{len(paths)} shards (format version {shards_lib.FORMAT_VERSION}) matching {pattern}")
  for source, counter in sorted(per_source.items()):
    left = {r: n for (s, r), n in left_out.items() if s == source}
    log(
      f"  {source}: {sum(counter.values())} records ("
      + ", ".join(f"{name} {counter[name]}" for name in sources_lib.CATEGORIES)
      + ")"
      + (f"; left out when prepared: {', '.join(f'{r} {n}' for r, n in left.items())}" if left else "")
    )
  source = sources_lib.ShardSource(pattern)
  picks = np.unique(np.linspace(0, len(source) - 1, min(samples, len(source))).astype(int)) if len(source) else []
  for i in picks:
    example = source[int(i)]
    shard, number = source.locate(int(i))
    sizes = []
    for data, name in zip(example["images"], example["image_names"]):
      try:
        sizes.append("x".join(map(str, load_image(data, name).size)))
      except BadImageError as e:
        sizes.append(f"unreadable ({e.reason})")
    text = " | ".join(f"{m['role']}: {m['content']}" for m in example["messages"]).replace("\n", "\\n")
    log(
      f"record {i} ({os.path.basename(shard)} #{number}) id={example['id']} kinds={example['image_kinds']} "
      f"images={sizes} tokens={int(source.lengths()[i])}: {text[:160]}"
    )
  return {
    "shards": len(paths),
    "per_source": {s: dict(c) for s, c in per_source.items()},
    "left_out": sum(left_out.values()),
  }


# ------------------------------------------------------------------------------------------- CLI
def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cheers_jax.data.prepare", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  w = sub.add_parser("prepare", help="JSONL + images -> shards")
  w.add_argument("--input", action="append", required=True, help="an official-format JSONL (repeat for several)")
  w.add_argument(
    "--image-root",
    action="append",
    default=[],
    help="folder the images paths of the inputs are relative to: once for all inputs, or once per "
    "--input in the same order (default: each JSONL's folder)",
  )
  w.add_argument("--output", required=True, help="folder for the shards and the report")
  w.add_argument("--records-per-shard", type=cli.POSITIVE_INT, default=DEFAULT_RECORDS_PER_SHARD)
  w.add_argument(
    "--processes",
    type=cli.POSITIVE_INT,
    default=os.cpu_count() or 1,
    help="shards written at once on this machine (default: its cores)",
  )
  w.add_argument("--task-index", type=cli.NON_NEGATIVE_INT, default=0, help="this machine's task (0-based)")
  w.add_argument("--num-tasks", type=cli.POSITIVE_INT, default=1, help="machines sharing the work")
  w.add_argument(
    "--max-side",
    type=cli.NON_NEGATIVE_INT,
    default=0,
    help="opt-in re-encoding of images larger than training at this image_size uses (0: copy bytes)",
  )
  r = sub.add_parser("inspect", help="counts and a few decoded records of prepared shards")
  r.add_argument("path", help="a folder of shards or a glob of them")
  r.add_argument("--samples", type=cli.NON_NEGATIVE_INT, default=3, help="records to decode and print")
  return p


def _main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(argv)
  if args.command == "inspect":
    describe(args.path, args.samples)
    return 0
  roots = args.image_root
  if len(roots) not in (0, 1, len(args.input)):
    raise UserError(
      f"{len(roots)} --image-root for {len(args.input)} --input: give none, one for all, or one per input"
    )
  roots = (
    roots * len(args.input) if len(roots) == 1 else roots or [os.path.dirname(os.path.abspath(p)) for p in args.input]
  )
  prepare(
    args.input,
    roots,
    args.output,
    records_per_shard=args.records_per_shard,
    processes=args.processes,
    task_index=args.task_index,
    num_tasks=args.num_tasks,
    max_side=args.max_side,
  )
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
