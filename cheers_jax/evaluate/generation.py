"""GenEval and DPG-Bench image generation in the official output layouts.

GenEval (`Evaluation_GenEval/generation/umm_generate.py`): prompt i is line i of the metadata JSONL
(blank lines skipped but counted); OUTDIR/<i:05>/metadata.jsonl holds that line's object as
`json.dump` writes it (no newline), and OUTDIR/<i:05>/samples/<n:05>.png its images, clamped to [0, 1]
and rounded as torchvision's `save_image`. GenEval's detector scorer reads that tree unchanged.

DPG-Bench (`Evaluation_DPGBench/run.py`, `UMM/cheers.py`, `benchmarks/dpg/dpg_dataset.py`): every
`<name>.txt` of the prompts folder (its whole content is the prompt) gives OUTDIR/<name>.jpg, a 2x2
grid of 4 images without padding (top-left, top-right, bottom-left, bottom-right), saved as JPEG at
PIL's defaults; pixels are `clip(x * 255, 0, 255)` truncated to uint8 without a clamp first, as the
official wrapper does. The mPLUG scorer crops the 4 tiles at the model's resolution.

Defaults are the official scripts' (DEFAULTS, each with its source). Image n of prompt i uses seed
seed + i * images_per_prompt + n (the official runs draw from an unseeded global RNG), so a rerun
reproduces it. An image depends only on its prompt and seed, never on what shares its batch
(`plan_steps`): prompts are grouped by padded length (their own length rounded up to `bucket`), every
call has the same batch shape (free slots are padding rows), and a job keeps its slot whether or not
the other jobs are done, so a resumed run (on any number of processes or devices) gives back every
image an uninterrupted run gives. Finished files are kept (written atomically), the rest generated.
With several processes each generates its share of the steps (`parallel.py`) into the shared output
folder; DPG tiles are kept as lossless PNGs in OUTDIR/.dpg_tiles until process 0 assembles the grids.
A metadata line without a prompt, or an empty DPG prompt file, is reported on one line and counted as
failed; the others are generated.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from cheers_jax.evaluate.datasets import DatasetError
from cheers_jax.evaluate.parallel import Workers, progress_bar, replicate, round_up
from cheers_jax.infer.t2i import t2i_prompt, text_to_image_per_device
from cheers_jax.sharding import local_data_mesh

DEFAULT_BUCKET = 64  # prompt lengths (with the dummy image's tokens) are padded to a multiple of this

DEFAULTS = {
  "geneval": dict(
    images_per_prompt=4,
    steps=80,
    cfg=9.5,
    shift=1.0,
    steps_src="Evaluation_GenEval/generation/run_long.sh --steps 80 (run_short.sh gives the same flags)",
    cfg_src="run_long.sh --cfg 9.5 (umm_generate.py's own argparse default, 4.0, is overridden)",
    shift_src="umm_generate.py's gen_config passes no alpha, so Cheers.generate's default alpha=1.0 (no "
    "shift) applies; the README's inference example uses 0.5",
  ),
  "dpg": dict(
    images_per_prompt=4,
    steps=250,
    cfg=9.5,
    shift=0.5,
    steps_src="Evaluation_DPGBench/scripts/dpg_gen.sh --steps 250",
    cfg_src="dpg_gen.sh --cfg 9.5",
    shift_src="dpg_gen.sh --alpha 0.5",
  ),
}


def read_geneval_metadata(
  path: str | os.PathLike, log: Callable[[str], None] = lambda s: None
) -> tuple[list[tuple[int, dict]], int]:
  """(line number, object) of each usable non-blank line, numbered as umm_generate.load_metadatas does,
  and the number of bad lines (each reported through `log` as `FILE:LINE: why`)."""
  try:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f"cannot read --metadata {os.fspath(path)!r}: {getattr(e, 'strerror', None) or e}") from e
  out, bad = [], 0
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      meta = json.loads(line)
    except json.JSONDecodeError as e:
      meta, why = None, f"not a JSON object ({e.msg})"
    else:
      why = (
        ""
        if isinstance(meta, dict) and isinstance(meta.get("prompt"), str) and meta["prompt"].strip()
        else 'no non-empty "prompt" (GenEval metadata needs one per line)'
      )
    if why:
      log(f"{os.fspath(path)}:{i + 1}: {why}; counted as failed, the other lines go on")
      bad += 1
    else:
      out.append((i, meta))
  if not out:
    raise DatasetError(f"{os.fspath(path)!r} holds no usable prompts")
  return out, bad


def read_dpg_prompts(
  folder: str | os.PathLike, log: Callable[[str], None] = lambda s: None
) -> tuple[list[tuple[str, str]], int]:
  """(output stem, prompt) of every file in the folder, sorted by name (the official order is
  os.listdir's, which is arbitrary; the outputs do not depend on it), and the number of unusable files."""
  root = Path(folder)
  if not root.is_dir():
    raise DatasetError(f"--prompts {os.fspath(folder)!r} is not a folder of DPG-Bench prompt files")
  out, bad = [], 0
  for p in sorted(root.iterdir()):
    if not p.is_file():
      continue
    try:
      text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      text, why = "", f"cannot read it ({e})"
    else:
      why = "" if text.strip() else "empty prompt"
    if why:
      log(f"{p}: {why}; counted as failed, the other prompts go on")
      bad += 1
    else:
      out.append((p.name.split(".")[0], text))
  if not out:
    raise DatasetError(f"{os.fspath(folder)!r} holds no usable prompt files")
  return out, bad


def save_image_uint8(image: np.ndarray) -> np.ndarray:
  """torchvision save_image on a [0, 1] image: x * 255 + 0.5, clamped, truncated."""
  return np.clip(np.floor(np.asarray(image, np.float32) * 255 + 0.5), 0, 255).astype(np.uint8)


def dpg_uint8(image_raw: np.ndarray) -> np.ndarray:
  """The DPG wrapper's conversion of the unclamped decoder output: clip(x * 255, 0, 255) truncated."""
  return np.clip(np.asarray(image_raw, np.float32) * 255.0, 0, 255).astype(np.uint8)


def dpg_grid(tiles: list[np.ndarray]) -> np.ndarray:
  """4 (H, W, 3) uint8 images -> (2H, 2W, 3): [0] top-left, [1] top-right, [2] bottom-left, [3] bottom-right."""
  if len(tiles) != 4:
    raise ValueError(f"a DPG grid needs 4 images, got {len(tiles)}")
  return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def _save_atomic(array: np.ndarray, path: Path, fmt: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  Image.fromarray(array).save(tmp, format=fmt)
  os.replace(tmp, path)


def plan_steps(padded_lengths: Sequence[int], pending: Sequence[bool], rows: int) -> list[list[Optional[int]]]:
  """Batches of `rows` fixed slots: the jobs of each padded prompt length, in order, fill slot after
  slot, so a job's batch and slot depend on the job list only, never on which jobs are still pending.
  A slot holds its job number, or None (done, or past the end: a padding row). Batches with nothing
  pending are dropped."""
  steps = []
  for length in sorted(set(padded_lengths)):
    group = [j for j, n in enumerate(padded_lengths) if n == length]
    for i in range(0, len(group), rows):
      slots = [j if pending[j] else None for j in group[i : i + rows]]
      slots += [None] * (rows - len(slots))
      if any(s is not None for s in slots):
        steps.append(slots)
  return steps


def generate_images(
  model,
  variables,
  tokenizer,
  jobs: Sequence[tuple[str, int]],
  pending: Sequence[bool],
  *,
  steps: int,
  cfg: float,
  shift: float,
  batch_size: int,
  on_image: Callable[[int, np.ndarray, np.ndarray], None],
  bucket: int = DEFAULT_BUCKET,
  workers: Workers = Workers(),
  progress: bool = True,
) -> int:
  """jobs: (prompt text, seed) of every image, done or not; generates this process's share of the
  pending ones in batches of batch_size per local device (`plan_steps`), calling on_image(job number,
  clamped image, raw decoder output) as batches finish. Returns the number of images generated here."""
  mesh = workers.mesh or local_data_mesh()  # one program per device, whatever their number
  ids = {text: t2i_prompt(tokenizer, text) for text in {t for t, _ in jobs}}
  n_tok = model.cfg.tokens_per_image  # the dummy image's tokens, prepended to a T2I prompt
  padded = [round_up(len(ids[text]) + n_tok, bucket) for text, _ in jobs]
  plan = workers.share(plan_steps(padded, pending, batch_size * workers.local_devices))
  variables = replicate(variables, workers)
  bar = progress_bar(sum(s is not None for slots in plan for s in slots), progress, "image", "generating")
  done = 0
  for slots in plan:
    real = [j for j in slots if j is not None]
    rows = [j if j is not None else real[0] for j in slots]  # padding rows repeat a job; their output is dropped
    raw = text_to_image_per_device(
      model,
      variables,
      [ids[jobs[j][0]] for j in rows],
      [jobs[j][1] for j in rows],
      mesh,
      steps=steps,
      cfg_scale=cfg,
      alpha=shift,
      bucket=bucket,
    )
    for k, j in enumerate(slots):
      if j is not None:
        on_image(j, np.clip(raw[k], 0.0, 1.0), raw[k])
    done += len(real)
    bar.update(len(real))
  bar.close()
  return done


def check_flow_args(steps: int, shift: float, batch_size: int, images_per_prompt: int = 4) -> None:
  if steps < 1:
    raise DatasetError(f"--steps {steps}: need at least 1 denoising step")
  if not shift > 0:
    raise DatasetError(f"--shift {shift} must be > 0")
  if batch_size < 1 or images_per_prompt < 1:
    raise DatasetError("--batch-size and --images-per-prompt must be >= 1")


def _stderr(s: str) -> None:
  print(s, file=sys.stderr)


def run_geneval(
  model,
  variables,
  tokenizer,
  metadata: str,
  out_dir: str,
  *,
  images_per_prompt: int = 4,
  steps: int = 80,
  cfg: float = 9.5,
  shift: float = 1.0,
  seed: int = 0,
  batch_size: int = 8,
  bucket: int = DEFAULT_BUCKET,
  limit: Optional[int] = None,
  workers: Workers = Workers(),
  progress: bool = True,
  log: Callable[[str], None] = _stderr,
) -> dict:
  """GenEval's folders for a loaded model; batch_size images per device. Every process of `workers`
  calls it; each generates its share. Returns {prompts, images, generated, failed, seconds}."""
  check_flow_args(steps, shift, batch_size, images_per_prompt)
  items, failed = read_geneval_metadata(metadata, log if workers.is_lead else lambda s: None)
  items = items[:limit]
  out = Path(out_dir)
  jobs, targets = [], []
  for idx, meta in items:
    folder = out / f"{idx:0>5}"
    if workers.is_lead:
      (folder / "samples").mkdir(parents=True, exist_ok=True)
      (folder / "metadata.jsonl").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    for n in range(images_per_prompt):
      jobs.append((meta["prompt"], seed + idx * images_per_prompt + n))
      targets.append(folder / "samples" / f"{n:05}.png")
  pending = [not t.is_file() for t in targets]
  if workers.is_lead:
    log(
      f"geneval: {len(items)} prompts x {images_per_prompt} images, {sum(pending)} to generate "
      f"(steps {steps}, cfg {cfg}, shift {shift}; {workers.describe()})"
    )
  workers.barrier("geneval_planned")  # every process planned from the same finished files

  def save(job, image, raw):
    _save_atomic(save_image_uint8(image), targets[job], "PNG")

  t0 = time.perf_counter()
  generate_images(
    model,
    variables,
    tokenizer,
    jobs,
    pending,
    steps=steps,
    cfg=cfg,
    shift=shift,
    batch_size=batch_size,
    bucket=bucket,
    workers=workers,
    on_image=save,
    progress=progress,
  )
  workers.barrier("geneval_done")
  return {
    "prompts": len(items),
    "images": len(jobs),
    "generated": sum(pending),
    "failed": failed,
    "seconds": time.perf_counter() - t0,
  }


def run_dpg(
  model,
  variables,
  tokenizer,
  prompts_dir: str,
  out_dir: str,
  *,
  steps: int = 250,
  cfg: float = 9.5,
  shift: float = 0.5,
  seed: int = 0,
  batch_size: int = 8,
  bucket: int = DEFAULT_BUCKET,
  limit: Optional[int] = None,
  workers: Workers = Workers(),
  progress: bool = True,
  log: Callable[[str], None] = _stderr,
) -> dict:
  """DPG-Bench's grids for a loaded model (see run_geneval). Returns {prompts, generated (grids), failed, seconds}."""
  check_flow_args(steps, shift, batch_size)
  per = DEFAULTS["dpg"]["images_per_prompt"]
  items, failed = read_dpg_prompts(prompts_dir, log if workers.is_lead else lambda s: None)
  items = items[:limit]
  out = Path(out_dir)
  tiles_dir = out / ".dpg_tiles"
  jobs, tiles, pending = [], [], []
  for i, (stem, text) in enumerate(items):
    grid_done = (out / f"{stem}.jpg").is_file()
    for n in range(per):
      jobs.append((text, seed + i * per + n))
      tiles.append(tiles_dir / f"{stem}_{n}.png")
      pending.append(not grid_done and not tiles[-1].is_file())
  todo = sorted({items[j // per][0] for j, p in enumerate(pending) if p})
  if workers.is_lead:
    out.mkdir(parents=True, exist_ok=True)
    log(
      f"dpg: {len(items)} prompts, {len(todo)} grids to generate (4 images each; steps {steps}, cfg {cfg}, "
      f"shift {shift}; {workers.describe()})"
    )
  workers.barrier("dpg_planned")

  def save(job, image, raw):
    _save_atomic(dpg_uint8(raw), tiles[job], "PNG")  # lossless: the grid is assembled from these bytes

  t0 = time.perf_counter()
  generate_images(
    model,
    variables,
    tokenizer,
    jobs,
    pending,
    steps=steps,
    cfg=cfg,
    shift=shift,
    batch_size=batch_size,
    bucket=bucket,
    workers=workers,
    on_image=save,
    progress=progress,
  )
  workers.barrier("dpg_tiles")
  grids = 0
  if workers.is_lead:
    grids = _assemble_dpg_grids(out, [stem for stem, _ in items], tiles_dir, per)
  workers.barrier("dpg_done")
  return {"prompts": len(items), "generated": grids, "failed": failed, "seconds": time.perf_counter() - t0}


def _assemble_dpg_grids(out: Path, stems: list[str], tiles_dir: Path, per: int) -> int:
  made = 0
  for stem in stems:
    paths = [tiles_dir / f"{stem}_{n}.png" for n in range(per)]
    if (out / f"{stem}.jpg").is_file() or not all(p.is_file() for p in paths):
      continue
    _save_atomic(dpg_grid([np.asarray(Image.open(p).convert("RGB")) for p in paths]), out / f"{stem}.jpg", "JPEG")
    for p in paths:
      p.unlink()
    made += 1
  if tiles_dir.is_dir() and not any(tiles_dir.iterdir()):
    tiles_dir.rmdir()
  return made
