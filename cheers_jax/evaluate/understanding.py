"""Understanding benchmarks: a VLMEvalKit TSV through the compiled KV-cache decoder, batched.

Per row, as the official run (`Evaluation_Understanding`, model `Cheers`): the prompt of prompts.py, the
images resized and padded to the model's resolution (the wrapper's processor, max_resolution 512 =
the published image size), greedy decoding that stops at `<|im_end|>`, and the reference generate's
length rule: it keeps sampling only while the ids so far (prompt + answer, one id per image
placeholder) number at most 1024, so a prompt of L ids gets at most 1025 - L answer ids
(`reference_answer_budget`).

Rows of unequal length decode together: sorted by length, right-padded to a multiple of `bucket`, the
cache sized to a multiple of 128 answer slots, so few programs are compiled; greedy decoding lets each
row's answer be cut to its own budget afterwards without changing it. With several devices the batch
is split over them (data parallel).

OUTDIR/NAME.tsv is rewritten after every batch: every input column but `image`, then `raw` (decoded
text), `prediction` (the wrapper's post-processing), `extracted` (the scorer's answer), `status`
(ok / failed) and `error`. A rerun keeps the `ok` rows and decodes the rest. A row whose image does not
decode is `failed`, reported, and left out of the score.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cheers_jax.evaluate.datasets import BadRowImage, DatasetError, dataset_spec, image_cells, is_missing, read_tsv
from cheers_jax.evaluate.prompts import build_row_prompt
from cheers_jax.evaluate.scoring import score_frame, summary_lines

REFERENCE_MAX_INPUT_IDS = 1024  # Cheers.generate: `if input_ids.size(1) > max_input_tokens: break`
ANSWER_SLOT_BUCKET = 128
OUTPUT_COLUMNS = ("raw", "prediction", "extracted", "status", "error")
IM_START_ID = 151667  # <im_start>: the reference would start drawing an image here


def reference_answer_budget(prompt_ids: int, cap: Optional[int] = None) -> int:
  """Answer ids the reference generates at most after a prompt of `prompt_ids` ids."""
  budget = max(0, REFERENCE_MAX_INPUT_IDS + 1 - prompt_ids)
  return budget if cap is None else min(budget, cap)


@dataclasses.dataclass
class PreparedRow:
  position: int               # row number in the input frame
  ids: Optional[np.ndarray]   # prompt ids with -200 placeholders
  images: list                # (res, res, 3) float32, in placeholder order
  budget: int
  length: int                 # assembled length (image tokens included)
  error: str = ""


def prepare_row(spec, row, tokenizer, cfg, cap: Optional[int]) -> PreparedRow:
  """Prompt ids and images of one row; a broken image gives an error instead of raising."""
  from cheers_jax.data.images import preprocess_understanding
  from cheers_jax.evaluate.datasets import decode_image
  try:
    cells = image_cells(row)
    prompt = build_row_prompt(spec, row, len(cells))
    decoded = {}
    images = []
    for i in prompt.image_order:
      if i not in decoded:
        b64, name = cells[i]
        decoded[i] = preprocess_understanding(decode_image(b64, name), resolution=cfg.vision.image_size,
                                              patch_size=cfg.vision.patch_size).pixel_values.transpose(1, 2, 0)
      images.append(decoded[i])
  except BadRowImage as e:
    return PreparedRow(-1, None, [], 0, 0, f"{type(e).__name__}: {e}")
  ids = tokenizer.build_prompt(prompt.text)
  length = len(ids) + (cfg.tokens_per_image - 1) * len(images)
  return PreparedRow(-1, ids, images, reference_answer_budget(len(ids), cap), length)


def plan_batches(rows: list[PreparedRow], batch_size: int) -> list[list[PreparedRow]]:
  """Rows with the same image count and similar length together (fewer distinct shapes)."""
  order = sorted(rows, key=lambda r: (len(r.images), r.length))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


class Decoder:
  """Greedy batched decoding of prepared rows with a fixed batch size (the last batch is padded)."""

  def __init__(self, model, variables, batch_size: int, bucket: int):
    import jax
    self.model, self.batch_size, self.bucket = model, batch_size, bucket
    self.mesh = None
    if jax.device_count() > 1:
      from cheers_jax.sharding import make_mesh, replicated
      self.mesh = make_mesh({"data": -1})
      variables = jax.device_put(variables, replicated(self.mesh))
    self.variables = variables

  def _place(self, batch: dict) -> dict:
    if self.mesh is None:
      return batch
    import jax
    from cheers_jax.sharding import leading_axis_sharding
    return {k: jax.device_put(np.asarray(v), leading_axis_sharding(self.mesh, np.shape(v))) for k, v in batch.items()}

  def __call__(self, rows: list[PreparedRow]) -> list[np.ndarray]:
    from cheers_jax.infer.decode import GREEDY, decode, prefill, prepare_prompts
    padded = rows + [rows[-1]] * (self.batch_size - len(rows))
    seq_len = _round_up(max(r.length for r in padded), self.bucket)
    slots = _round_up(max(max(r.budget for r in padded), 1), ANSWER_SLOT_BUCKET)
    batch = prepare_prompts(self.model.cfg, [r.ids for r in padded], [r.images for r in padded], seq_len=seq_len)
    batch.batch = self._place(batch.batch)
    state = prefill(self.model, self.variables, batch, seq_len + slots)
    result = decode(self.model, self.variables, state, slots, GREEDY, stop_after=max(r.budget for r in rows))
    return [ids[:r.budget] for ids, r in zip(result.ids(), rows)]


def output_path(out_dir: str | os.PathLike, name: str) -> Path:
  return Path(out_dir) / f"{name}.tsv"


def _write_atomic(frame, path: Path) -> None:
  tmp = path.with_name(path.name + ".tmp")
  frame.to_csv(tmp, sep="\t", index=False)
  os.replace(tmp, path)


def _previous(path: Path, data) -> dict:
  """index -> finished row of an earlier run (status ok) whose question is unchanged."""
  if not path.is_file():
    return {}
  from cheers_jax.evaluate.scoring import read_predictions
  old = read_predictions(path)
  if "status" not in old.columns or "raw" not in old.columns:
    raise DatasetError(f"{path} exists but is not a predictions file of this tool (no status/raw columns): "
                       "choose another --out")
  questions = dict(zip(data["index"], data["question"]))
  done = {}
  for rec in old.to_dict("records"):
    if rec.get("status") == "ok" and rec["index"] in questions and str(rec.get("question")) == str(questions[rec["index"]]):
      done[rec["index"]] = rec
  return done


def run_understanding(checkpoint: Optional[str], data_path: str, dataset: str, out_dir: str, *,
                      orbax: Optional[str] = None, run: Optional[str] = None, dtype: Optional[str] = None,
                      batch_size: int = 16,
                      limit: Optional[int] = None, max_new_tokens: Optional[int] = None, bucket: int = 64,
                      save_every: int = 1, progress: bool = True, model=None, print_summary: bool = True,
                      log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
  """Answers and scores a TSV; returns the score dict (also in OUTDIR/NAME_score.json).

  model: an already loaded (module, variables) pair (tests, benchmarks); otherwise it is loaded from
  exactly one of checkpoint (HF), orbax (an Orbax export) or run (a training workdir).
  """
  spec = dataset_spec(dataset)
  if batch_size < 1:
    raise DatasetError(f"--batch-size {batch_size} must be >= 1")
  if max_new_tokens is not None and max_new_tokens < 1:
    raise DatasetError(f"--max-new-tokens {max_new_tokens} must be >= 1")
  data, dropped = read_tsv(data_path)
  if dropped:
    log(f"{dropped} row(s) without an image skipped (as VLMEvalKit does)")
  if limit is not None:
    data = data.iloc[:limit].reset_index(drop=True)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = output_path(out, spec.name)
  done = _previous(path, data)
  todo = [i for i, idx in enumerate(data["index"]) if idx not in done]
  log(f"{spec.name}: {len(data)} rows, {len(data) - len(todo)} already answered in {path}, {len(todo)} to decode")

  results: dict[int, dict] = {}
  for i, idx in enumerate(data["index"]):
    if idx in done:
      results[i] = {"raw": "" if is_missing(done[idx].get("raw")) else str(done[idx]["raw"]), "status": "ok",
                    "error": ""}

  def snapshot(final: bool = False):
    frame = data.drop(columns=["image"]).copy()
    frame["raw"] = [results[i]["raw"] if i in results else None for i in range(len(frame))]
    frame["status"] = [results[i]["status"] if i in results else "pending" for i in range(len(frame))]
    frame["error"] = [results[i]["error"] or None if i in results else None for i in range(len(frame))]
    answered = (frame["status"] != "pending").to_numpy()
    scored, scores = score_frame(spec, frame[answered], require_answers=False)
    for col in ("prediction", "extracted"):
      values = np.full(len(frame), None, dtype=object)
      values[answered] = scored[col].to_numpy(dtype=object)
      frame[col] = values
    _write_atomic(frame[[c for c in frame.columns if c not in OUTPUT_COLUMNS] + list(OUTPUT_COLUMNS)], path)
    if final:
      (out / f"{spec.name}_score.json").write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    return scores

  if todo:
    import jax
    from cheers_jax.data.tokenizer import CheersTokenizer
    if model is None:
      from cheers_jax.infer import loader
      t0 = time.perf_counter()
      dtype = dtype or loader.default_dtype()
      model = loader.load_model(checkpoint, orbax, run, dtype)
      log(f"loaded {checkpoint or orbax or run} ({dtype}) in {time.perf_counter() - t0:.1f} s")
    module, variables = model
    tokenizer = CheersTokenizer()
    per_device = jax.device_count()
    batch_size = _round_up(batch_size, per_device)
    if per_device > 1:
      log(f"data parallel over {per_device} devices (batch {batch_size})")
    prepared = []
    records = data.to_dict("records")
    for i in todo:
      r = prepare_row(spec, records[i], tokenizer, module.cfg, max_new_tokens)
      r.position = i
      if r.error:
        results[i] = {"raw": "", "status": "failed", "error": r.error}
        log(f"row {records[i]['index']}: {r.error} (counted as failed, not scored)")
      elif r.budget == 0:  # the reference generates nothing after a prompt of more than 1024 ids
        results[i] = {"raw": "", "status": "ok", "error": ""}
      else:
        prepared.append(r)
    decoder = Decoder(module, variables, min(batch_size, _round_up(max(len(prepared), 1), per_device)), bucket)
    bar = _progress(len(prepared), progress)
    flagged = 0
    for n, chunk in enumerate(plan_batches(prepared, decoder.batch_size)):
      for r, ids in zip(chunk, decode_chunk(decoder, chunk)):
        flagged += int(np.any(ids == IM_START_ID))
        results[r.position] = {"raw": tokenizer.decode(ids, skip_special_tokens=True), "status": "ok", "error": ""}
      bar.update(len(chunk))
      if (n + 1) % max(1, save_every) == 0:
        snapshot()
    bar.close()
    if flagged:
      log(f"{flagged} answer(s) contain <im_start>: the reference would draw an image there and go on; "
          "here the text simply continues")
  scores = snapshot(final=True)
  if print_summary:
    print("\n".join(summary_lines(scores)))
  log(f"wrote {path} and {out / (spec.name + '_score.json')}")
  return scores


def decode_chunk(decoder: Decoder, chunk: list[PreparedRow]) -> list[np.ndarray]:
  """One batch through the decoder (a seam for tests that interrupt a run)."""
  return decoder(chunk)


class _NoBar:
  def update(self, n):
    pass

  def close(self):
    pass


def _progress(total: int, enabled: bool):
  if not enabled or total == 0:
    return _NoBar()
  from tqdm import tqdm
  return tqdm(total=total, unit="row", desc="decoding", file=sys.stderr, dynamic_ncols=True)


def run_cli(args) -> int:
  from cheers_jax.infer.loader import check_one_source
  check_one_source(args.checkpoint, args.orbax, args.run)
  if not os.path.isfile(args.data):
    raise DatasetError(f"data file not found: {args.data!r}")
  name = args.dataset or Path(args.data).stem
  run_understanding(args.checkpoint, args.data, name, args.out, orbax=args.orbax, run=args.run, dtype=args.dtype,
                    batch_size=args.batch_size, limit=args.limit, max_new_tokens=args.max_new_tokens,
                    bucket=args.bucket, save_every=args.save_every, progress=not args.no_progress)
  return 0
