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

Defaults are the official scripts' (DEFAULTS, each with its source). Both run the prompts in batches
of images from different prompts (unequal prompt lengths are fine, see infer/t2i.py), each image with
its own seed, and resume: finished files are kept (written atomically), the rest are generated.
Differences: the official runs draw noise from an unseeded global RNG; here image n of prompt i uses
seed + i * images_per_prompt + n, so a rerun reproduces it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

DEFAULTS = {
    "geneval": dict(
        images_per_prompt=4, steps=80, cfg=9.5, shift=1.0,
        steps_src="Evaluation_GenEval/generation/run_long.sh --steps 80 (run_short.sh gives the same flags)",
        cfg_src="run_long.sh --cfg 9.5 (umm_generate.py's own argparse default, 4.0, is overridden)",
        shift_src="umm_generate.py's gen_config passes no alpha, so Cheers.generate's default alpha=1.0 (no "
                  "shift) applies; the README's inference example uses 0.5"),
    "dpg": dict(
        images_per_prompt=4, steps=250, cfg=9.5, shift=0.5,
        steps_src="Evaluation_DPGBench/scripts/dpg_gen.sh --steps 250",
        cfg_src="dpg_gen.sh --cfg 9.5",
        shift_src="dpg_gen.sh --alpha 0.5"),
}


def read_geneval_metadata(path: str | os.PathLike) -> list[tuple[int, dict]]:
  """(line number, object) of each non-blank line, as umm_generate.load_metadatas numbers them."""
  from cheers_jax.evaluate.datasets import DatasetError
  try:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
  except OSError as e:
    raise DatasetError(f"cannot read --metadata {os.fspath(path)!r}: {e.strerror or e}") from e
  out = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      meta = json.loads(line)
    except json.JSONDecodeError as e:
      raise DatasetError(f"{os.fspath(path)}:{i + 1}: not a JSON object ({e.msg})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip():
      raise DatasetError(f"{os.fspath(path)}:{i + 1}: each line needs a non-empty \"prompt\" (GenEval metadata)")
    out.append((i, meta))
  if not out:
    raise DatasetError(f"{os.fspath(path)!r} holds no prompts")
  return out


def read_dpg_prompts(folder: str | os.PathLike) -> list[tuple[str, str]]:
  """(output stem, prompt) of every file in the folder, sorted by name (the official order is
  os.listdir's, which is arbitrary; the outputs do not depend on it)."""
  from cheers_jax.evaluate.datasets import DatasetError
  root = Path(folder)
  if not root.is_dir():
    raise DatasetError(f"--prompts {os.fspath(folder)!r} is not a folder of DPG-Bench prompt files")
  out = []
  for p in sorted(root.iterdir()):
    if p.is_file():
      text = p.read_text(encoding="utf-8")
      if not text.strip():
        raise DatasetError(f"{p}: empty prompt")
      out.append((p.name.split(".")[0], text))
  if not out:
    raise DatasetError(f"{os.fspath(folder)!r} holds no prompt files")
  return out


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
  from PIL import Image
  tmp = path.with_name(path.name + ".tmp")
  Image.fromarray(array).save(tmp, format=fmt)
  os.replace(tmp, path)


def _batches(jobs: list, size: int) -> list[list]:
  return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def generate_images(model, variables, tokenizer, jobs: list[tuple[str, int]], *, steps: int, cfg: float,
                    shift: float, batch_size: int, on_image: Callable[[int, np.ndarray, np.ndarray], None],
                    progress: bool = True) -> None:
  """jobs: (prompt text, seed) per image. Calls on_image(job number, clamped image, raw decoder output)
  as batches finish; every batch has `batch_size` rows (the last is padded) so one program serves all."""
  from cheers_jax.infer.t2i import t2i_prompt, text_to_image
  from cheers_jax.evaluate.understanding import _progress
  bar = _progress(len(jobs), progress)
  cache = {}
  for chunk in _batches(list(enumerate(jobs)), batch_size):
    rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
    prompts = [cache.setdefault(text, t2i_prompt(tokenizer, text)) for _, (text, _) in rows]
    res = text_to_image(model, variables, prompts, steps=steps, cfg_scale=cfg, alpha=shift,
                        seeds=[seed for _, (_, seed) in rows])
    for k, (job, _) in enumerate(chunk):
      on_image(job, res.images[k], res.image_raw[k])
    bar.update(len(chunk))
  bar.close()


def _check(steps, cfg, shift, batch_size, images_per_prompt=4):
  from cheers_jax.evaluate.datasets import DatasetError
  if steps < 1:
    raise DatasetError(f"--steps {steps}: need at least 1 denoising step")
  if shift <= 0:
    raise DatasetError(f"--shift {shift} must be > 0")
  if batch_size < 1 or images_per_prompt < 1:
    raise DatasetError("--batch-size and --images-per-prompt must be >= 1")


def run_geneval(model, variables, tokenizer, metadata: str, out_dir: str, *, images_per_prompt: int = 4,
                steps: int = 80, cfg: float = 9.5, shift: float = 1.0, seed: int = 0, batch_size: int = 8,
                limit: Optional[int] = None, progress: bool = True,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
  _check(steps, cfg, shift, batch_size, images_per_prompt)
  items = read_geneval_metadata(metadata)[:limit]
  out = Path(out_dir)
  jobs, targets = [], []
  for idx, meta in items:
    folder = out / f"{idx:0>5}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    for n in range(images_per_prompt):
      target = folder / "samples" / f"{n:05}.png"
      if not target.is_file():
        jobs.append((meta["prompt"], seed + idx * images_per_prompt + n))
        targets.append(target)
  log(f"geneval: {len(items)} prompts x {images_per_prompt} images, {len(jobs)} to generate "
      f"(steps {steps}, cfg {cfg}, shift {shift})")

  def save(job, image, raw):
    _save_atomic(save_image_uint8(image), targets[job], "PNG")

  t0 = time.perf_counter()
  if jobs:
    generate_images(model, variables, tokenizer, jobs, steps=steps, cfg=cfg, shift=shift,
                    batch_size=min(batch_size, len(jobs)), on_image=save, progress=progress)
  dt = time.perf_counter() - t0
  return {"prompts": len(items), "generated": len(jobs), "seconds": dt}


def run_dpg(model, variables, tokenizer, prompts_dir: str, out_dir: str, *, steps: int = 250, cfg: float = 9.5,
            shift: float = 0.5, seed: int = 0, batch_size: int = 8, limit: Optional[int] = None,
            progress: bool = True, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
  _check(steps, cfg, shift, batch_size)
  per = DEFAULTS["dpg"]["images_per_prompt"]
  items = read_dpg_prompts(prompts_dir)[:limit]
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  todo = [(i, stem, text) for i, (stem, text) in enumerate(items) if not (out / f"{stem}.jpg").is_file()]
  jobs = [(text, seed + i * per + n) for i, _, text in todo for n in range(per)]
  log(f"dpg: {len(items)} prompts, {len(todo)} grids to generate (4 images each; steps {steps}, cfg {cfg}, "
      f"shift {shift})")
  tiles: dict[int, dict[int, np.ndarray]] = {}

  def save(job, image, raw):
    k, n = divmod(job, per)
    tiles.setdefault(k, {})[n] = dpg_uint8(raw)
    if len(tiles[k]) == per:
      grid = dpg_grid([tiles[k][m] for m in range(per)])
      _save_atomic(grid, out / f"{todo[k][1]}.jpg", "JPEG")
      del tiles[k]

  t0 = time.perf_counter()
  if jobs:
    generate_images(model, variables, tokenizer, jobs, steps=steps, cfg=cfg, shift=shift,
                    batch_size=min(batch_size, len(jobs)), on_image=save, progress=progress)
  return {"prompts": len(items), "generated": len(todo), "seconds": time.perf_counter() - t0}


def run_cli(args) -> int:
  from cheers_jax.data.tokenizer import CheersTokenizer
  from cheers_jax.infer import loader
  loader.check_one_source(args.checkpoint, args.orbax, args.run)
  common = dict(steps=args.steps, cfg=args.cfg, shift=args.shift, seed=args.seed, batch_size=args.batch_size,
                limit=args.limit)
  # read the prompts before the (slow) model load, so a bad file fails fast
  if args.command == "geneval":
    _check(args.steps, args.cfg, args.shift, args.batch_size, args.images_per_prompt)
    read_geneval_metadata(args.metadata)
  else:
    _check(args.steps, args.cfg, args.shift, args.batch_size)
    read_dpg_prompts(args.prompts)
  dtype = args.dtype or loader.default_dtype()
  t0 = time.perf_counter()
  model, variables = loader.load_model(args.checkpoint, args.orbax, args.run, dtype, need_generation=True)
  print(f"loaded {args.checkpoint or args.orbax or args.run} ({dtype}) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr)
  tok = CheersTokenizer()
  if args.command == "geneval":
    res = run_geneval(model, variables, tok, args.metadata, args.out, images_per_prompt=args.images_per_prompt,
                      **common)
  else:
    res = run_dpg(model, variables, tok, args.prompts, args.out, **common)
  prompts_done = res["generated"] if args.command == "dpg" else res["generated"] / args.images_per_prompt
  rate = f" ({res['seconds'] / prompts_done:.2f} s per prompt)" if prompts_done else ""
  what = "grids" if args.command == "dpg" else "images"
  print(f"{args.command}: {res['generated']} {what} in {res['seconds']:.1f} s{rate} -> {args.out}")
  return 0
