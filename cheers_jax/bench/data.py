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
  or a shard record), decode (JPEG -> RGB), preprocess (resize / crop / pad, uint8), tokenise
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
from cheers_jax.data.images import generation_image, load_image, understanding_image
from cheers_jax.data.tokenizer import CheersTokenizer

IMAGE_SIZES = ((640, 480), (1024, 768), (512, 512), (480, 800), (320, 240))  # (W, H) JPEGs, in turn
KINDS = ("und", "gen", "edit", "text")


def _conversation(kind: str, i: int) -> list[dict[str, str]]:
  human = lambda v: {"from": "human", "value": v}
  gpt = lambda v: {"from": "gpt", "value": v}
  if kind == "und":
    return [human("<im_start><image><im_end>\nWhat is this?"), gpt(f"Picture number {i}, a blurred colour field.")]
  if kind == "gen":
    return [
      human(f"Colour field {i}.\nBased on the above description, generate an image."),
      gpt("<im_start><image_gen><im_end>"),
    ]
  if kind == "edit":
    return [human(f"<im_start><image><im_end>\nMake it look like picture {i}."), gpt("<im_start><image_gen><im_end>")]
  return [human(f"Please say something about the number {i}."), gpt(f"{i} is a number.")]


def _image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
  """Smooth colour noise (a 12x12 field upscaled): compresses like a photograph, unlike white noise."""
  small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
  return small.resize(size, Image.Resampling.BICUBIC)


def write_dataset(
  folder: str,
  count: int,
  seed: int = 0,
  kinds: Sequence[str] = KINDS,
  image_sizes: Sequence[tuple[int, int]] = IMAGE_SIZES,
  num_images: Optional[int] = None,
  start: int = 0,
) -> str:
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


# --------------------------------------------------------------------------------------- start-up
TINY_TEXT = {
  "id": "t",
  "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
  "image_kinds": [],
}


def write_tiny_shards(folder: str, count: int, per_shard: int = 100_000) -> str:
  """`count` identical tiny text records in shards of `per_shard` (start-up reads only the indexes, so
  the records' content does not matter to it): the cheap way to a 10 M-record dataset."""
  os.makedirs(folder, exist_ok=True)
  record = shards_lib.encode_record(TINY_TEXT, [])
  length = len(CheersTokenizer().build_conversation(TINY_TEXT["messages"])[0])
  n_shards = -(-count // per_shard)
  for k in range(n_shards):
    path = os.path.join(folder, shards_lib.shard_name("tiny", k, n_shards))
    if os.path.exists(shards_lib.index_path(path)):
      continue
    writer = shards_lib.ShardWriter(path)
    for _ in range(min(per_shard, count - k * per_shard)):
      writer.add(record, sources_lib.TEXT, length, 0)
    writer.close({"source": "generated tiny text records", "first_record": k * per_shard, "bad": []})
  return folder


def write_tiny_jsonl(path: str, count: int) -> str:
  line = (
    json.dumps({"id": "t", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]})
    + "\n"
  )
  with open(path, "w") as f:
    for _ in range(count // 10_000):
      f.write(line * 10_000)
    f.write(line * (count % 10_000))
  return path


def _config(base: str, data: dict[str, Any], batch_size: int, image_size: int, overrides: Sequence[str] = ()):
  config = config_lib.load(
    base,
    [
      f"--config.train.batch_size={batch_size}",
      f"--config.data.image_size={image_size}",
      f"--config.model.vision.image_size={image_size}",
      *overrides,
    ],
  )
  with config.unlocked():
    for k, v in data.items():
      config.data[k] = v
  return config


def time_first_batch(config) -> float:
  sources_lib.clear_jsonl_indexes()  # a cold start, as a new process has
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(config)
  next(it)
  seconds = time.perf_counter() - t0
  it.close()
  return seconds


# ------------------------------------------------------------------------------------- throughput
def throughput(config, steps: int) -> dict[str, float]:
  """Samples/s and tokens/s (valid tokens, image tokens included) over `steps` batches after the first."""
  it = pipeline.make_train_iterator(config)
  next(it)  # start-up (and the workers' start) excluded
  t0, tokens = time.perf_counter(), 0
  for _ in range(steps):
    tokens += int(next(it)["valid"].sum())
  seconds = time.perf_counter() - t0
  it.close()
  samples = steps * config.train.batch_size
  return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds}


def stage_times(source: Any, spec: pipeline.PipelineSpec, count: int) -> dict[str, float]:
  """Mean ms per sample of each stage, in this process (see the module docstring)."""
  tok = CheersTokenizer()
  prep = pipeline.PrepareExample(spec, tok)
  spent = dict.fromkeys(("read", "decode", "preprocess", "tokenise", "assemble"), 0.0)
  prepared = []
  for i in range(count):
    t0 = time.perf_counter()
    example = source[i]
    data = []
    for image in example["images"]:
      if isinstance(image, str):
        with open(image, "rb") as f:
          image = f.read()
      data.append(image)
    t1 = time.perf_counter()
    decoded = [load_image(d) for d in data]
    t2 = time.perf_counter()
    for im, kind in zip(decoded, example["image_kinds"]):
      # as pipeline.preprocess_image: resize and pad / crop to uint8 (the model divides by 255 on the device)
      np.asarray((understanding_image if kind == "und" else generation_image)(im, spec.image_size), np.uint8)
    t3 = time.perf_counter()
    tok.build_conversation(example["messages"])
    t4 = time.perf_counter()
    spent["read"] += t1 - t0
    spent["decode"] += t2 - t1
    spent["preprocess"] += t3 - t2
    spent["tokenise"] += t4 - t3
    sample = prep(i, example)
    if "skip" not in sample:
      prepared.append(sample)
  batches = len(prepared) // spec.batch_size
  t0 = time.perf_counter()
  for k in range(batches):
    pipeline.collate(prepared[k * spec.batch_size : (k + 1) * spec.batch_size], spec)
  ms = {k: 1000 * v / count for k, v in spent.items()}
  ms["assemble"] = 1000 * (time.perf_counter() - t0) / max(1, batches * spec.batch_size)
  return ms


# ------------------------------------------------------------------------------------------- CLI
# Step rates one accelerator must be fed at (samples/s): the figures of docs/scaling.md.
FEED_RATES = {
  "H100, official PyTorch code (7.06 samples/s, batch 8)": 7.06,
  "H100, this port's target (21 samples/s)": 21.0,
  "v5p chip at 40 % MFU (459 TFLOP/s x 0.4 / 16.2 TFLOP per sample)": 459 * 0.4 / 16.2,
}


def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cheers_jax.bench data", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="cheers_1p5b", help="config whose data and model sizes are used")
  p.add_argument("--records", type=cli.POSITIVE_INT, default=2000, help="generated records with JPEGs")
  p.add_argument("--image-size", type=cli.POSITIVE_INT, default=512)
  p.add_argument("--batch-size", type=cli.POSITIVE_INT, default=16)
  p.add_argument("--workers", default="0,1,2", help="data.worker_count values to time (comma list)")
  p.add_argument("--steps", type=cli.POSITIVE_INT, default=20, help="timed batches per throughput figure")
  p.add_argument("--stage-samples", type=cli.POSITIVE_INT, default=200, help="samples timed per stage")
  p.add_argument(
    "--startup-records",
    type=cli.NON_NEGATIVE_INT,
    default=0,
    help="also time the start-up on shards of this many tiny records (e.g. 10000000)",
  )
  p.add_argument(
    "--jsonl-startup-records",
    type=cli.NON_NEGATIVE_INT,
    default=500_000,
    help="JSONL lines timed for the start-up comparison (scaled linearly to --startup-records)",
  )
  p.add_argument("--processes", type=cli.POSITIVE_INT, default=os.cpu_count() or 1, help="prepare's processes")
  p.add_argument("--workdir", default="", help="folder for the generated data (default: a temporary one); reused")
  p.add_argument("--skip", default="", help="parts to leave out: comma list of startup,throughput,stages")
  return p


def _main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(argv)
  workers = cli.comma_list(args.workers, "--workers", int)
  skip = set(cli.comma_list(args.skip, "--skip")) if args.skip else set()
  work = args.workdir or tempfile.mkdtemp(prefix="cheers_bench_data_")
  result: dict[str, Any] = {
    "records": args.records,
    "image_size": args.image_size,
    "batch_size": args.batch_size,
    "cpu_cores": os.cpu_count(),
  }
  folder = os.path.join(work, f"records{args.records}")
  jsonl = os.path.join(folder, "data.jsonl")
  if not os.path.exists(jsonl):
    write_dataset(folder, args.records)
  shards = os.path.join(folder, "shards")
  t0 = time.perf_counter()
  summary = prepare_lib.prepare(
    [jsonl],
    [os.path.join(folder, "images")],
    shards,
    processes=args.processes,
    records_per_shard=max(1, args.records // 4),
    log=lambda *_: None,
  )
  result["prepare_s"] = time.perf_counter() - t0
  result["prepared_resumed_shards"] = summary["inputs"][os.path.abspath(jsonl)]["resumed"]
  print(
    f"data: {args.records} records in {folder} (JPEGs {', '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)}); "
    f"prepare: {result['prepare_s']:.1f} s"
  )
  sources = {
    "jsonl": {"source": "jsonl", "jsonl_path": jsonl, "image_root": os.path.join(folder, "images")},
    "shards": {"sources": (shards,)},
  }
  make = lambda data, w=0: _config(args.config, {**data, "worker_count": w}, args.batch_size, args.image_size)

  if "startup" not in skip:
    result["startup_s"] = {name: time_first_batch(make(data)) for name, data in sources.items()}
    print("first batch, same records: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["startup_s"].items()))
    if args.startup_records:
      n, m = args.startup_records, args.jsonl_startup_records
      tiny = write_tiny_shards(os.path.join(work, f"tiny{n}"), n)
      text_only = {"mix": {"und": 0.0, "gen": 0.0, "text": 1.0}}
      big = {"shards_s": time_first_batch(make({"sources": (tiny,), **text_only})), "records": n}
      if m:
        path = write_tiny_jsonl(os.path.join(work, f"tiny{m}.jsonl"), m)
        big["jsonl_s"] = time_first_batch(make({"source": "jsonl", "jsonl_path": path, **text_only}))
        big["jsonl_records"] = m
        big["jsonl_scaled_s"] = big["jsonl_s"] * n / m
      result["startup_large"] = big
      print(
        f"first batch, {n} tiny records in shards: {big['shards_s']:.1f} s"
        + (
          f"; JSONL of {m} lines: {big['jsonl_s']:.1f} s (x{n / m:g} -> ~{big['jsonl_scaled_s']:.0f} s for {n})"
          if m
          else ""
        )
      )

  if "throughput" not in skip:
    result["throughput"] = {}
    for w in workers:
      for name, data in sources.items():
        r = throughput(make(data, w), args.steps)
        result["throughput"][f"{name}/workers={w}"] = r
        print(f"{name:6s} worker_count={w}: {r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:.0f} tokens/s")

  if "stages" not in skip:
    result["stages_ms"] = {}
    for name, data in sources.items():
      config = make(data)
      ms = stage_times(
        sources_lib.make_source(config.data), pipeline.spec_from_config(config), min(args.stage_samples, args.records)
      )
      result["stages_ms"][name] = ms
      per_core = 1000 / sum(ms.values())
      print(
        f"{name:6s} ms/sample: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
        + f"; total {sum(ms.values()):.1f} ms -> {per_core:.1f} samples/s per core"
      )
      result.setdefault("cores_per_accelerator", {})[name] = {k: rate / per_core for k, rate in FEED_RATES.items()}
      for what, rate in FEED_RATES.items():
        print(f"  {what}: {rate / per_core:.1f} cores")
  print("RESULT " + json.dumps(result))
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)
