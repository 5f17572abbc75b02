"""Understanding benchmarks: a VLMEvalKit TSV through the compiled KV-cache decoder, batched.

Per row, as the official run (`Evaluation_Understanding`, model `Cheers`): the prompt of prompts.py, the
images resized and padded to the model's resolution (the wrapper's processor, max_resolution 512 =
the published image size), greedy decoding that stops at `<|im_end|>`, and the reference generate's
length rule: it keeps sampling only while the ids so far (prompt + answer, one id per image
placeholder) number at most 1024, so a prompt of L ids gets at most 1025 - L answer ids
(`reference_answer_budget`).

Rows of unequal length decode together: sorted by length, right-padded to a multiple of `bucket`, the
cache sized to a multiple of 128 answer slots, so few programs are compiled; greedy decoding lets each
row's answer be cut to its own budget afterwards without changing it. The batch is split over the
local devices (data parallel), and the rows over the processes of a `jax.distributed` run (parallel.py).

Each process appends its answers to OUTDIR/.parts/NAME.<process>.jsonl as batches finish; process 0
merges them into OUTDIR/NAME.tsv (rewritten every `save_every` batches and at the end): every input
column but `image`, then `raw` (decoded text), `prediction` (the wrapper's post-processing), `extracted`
(the scorer's answer), `status` (ok / failed) and `error`, and writes NAME_score.json. A rerun, with any
number of processes or devices, keeps the `ok` rows of the TSV and of any part file and decodes the
rest. A row whose image does not decode is `failed`, reported on one line, and left out of the score.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cheers_jax.data.images import preprocess_understanding
from cheers_jax.data.tokenizer import IM_START_ID, CheersTokenizer
from cheers_jax.evaluate.datasets import BadRowImage, DatasetError, dataset_spec, decode_image, image_cells, read_tsv
from cheers_jax.evaluate.parallel import Workers, progress_bar, replicate, round_up
from cheers_jax.evaluate.prompts import build_row_prompt
from cheers_jax.evaluate.scoring import OWN_COLUMNS, read_predictions, score_frame
from cheers_jax.infer.decode import GREEDY, decode, prefill, prepare_prompts
from cheers_jax.sharding import place_rows

REFERENCE_MAX_INPUT_IDS = 1024  # Cheers.generate: `if input_ids.size(1) > max_input_tokens: break`
ANSWER_SLOT_BUCKET = 128


def reference_answer_budget(prompt_ids: int, cap: Optional[int] = None) -> int:
  """Answer ids the reference generates at most after a prompt of `prompt_ids` ids."""
  budget = max(0, REFERENCE_MAX_INPUT_IDS + 1 - prompt_ids)
  return budget if cap is None else min(budget, cap)


@dataclasses.dataclass
class PreparedRow:
  position: int  # row number in the input frame
  ids: Optional[np.ndarray]  # prompt ids with -200 placeholders
  images: list  # (res, res, 3) float32, in placeholder order
  budget: int
  length: int  # assembled length (image tokens included)
  error: str = ""


def prepare_row(spec, row, tokenizer, cfg, cap: Optional[int]) -> PreparedRow:
  """Prompt ids and images of one row; a broken image gives an error instead of raising."""
  try:
    cells = image_cells(row)
    prompt = build_row_prompt(spec, row, len(cells))
    decoded = {}
    images = []
    for i in prompt.image_order:
      if i not in decoded:
        b64, name = cells[i]
        decoded[i] = preprocess_understanding(
          decode_image(b64, name), resolution=cfg.vision.image_size, patch_size=cfg.vision.patch_size
        ).pixel_values.transpose(1, 2, 0)
      images.append(decoded[i])
  except BadRowImage as e:
    return PreparedRow(-1, None, [], 0, 0, f"{type(e).__name__}: {e}")
  ids = tokenizer.build_prompt(prompt.text)
  length = len(ids) + (cfg.tokens_per_image - 1) * len(images)
  return PreparedRow(-1, ids, images, reference_answer_budget(len(ids), cap), length)


def plan_batches(rows: list[PreparedRow], batch_size: int) -> list[list[PreparedRow]]:
  """Rows with the same image count and similar length together (fewer distinct shapes)."""
  order = sorted(rows, key=lambda r: (len(r.images), r.length))
  return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Decoder:
  """Greedy batched decoding of prepared rows with a fixed batch size (the last batch is padded), the
  rows split over the local devices."""

  def __init__(self, model, variables, batch_size: int, bucket: int, workers: Workers = Workers()):
    self.model, self.batch_size, self.bucket, self.mesh = model, batch_size, bucket, workers.mesh
    self.variables = replicate(variables, workers)

  def __call__(self, rows: list[PreparedRow]) -> list[np.ndarray]:
    padded = rows + [rows[-1]] * (self.batch_size - len(rows))
    seq_len = round_up(max(r.length for r in padded), self.bucket)
    slots = round_up(max(max(r.budget for r in padded), 1), ANSWER_SLOT_BUCKET)
    batch = prepare_prompts(self.model.cfg, [r.ids for r in padded], [r.images for r in padded], seq_len=seq_len)
    if self.mesh is not None:
      batch.batch = place_rows(batch.batch, self.mesh)
    state = prefill(self.model, self.variables, batch, seq_len + slots)
    result = decode(self.model, self.variables, state, slots, GREEDY, stop_after=max(r.budget for r in rows))
    return [ids[: r.budget] for ids, r in zip(result.ids(), rows)]


def output_path(out_dir: str | os.PathLike, name: str) -> Path:
  return Path(out_dir) / f"{name}.tsv"


def _parts_dir(out_dir: Path) -> Path:
  return out_dir / ".parts"


def _write_atomic(frame, path: Path) -> None:
  tmp = path.with_name(path.name + ".tmp")
  frame.to_csv(tmp, sep="\t", index=False)
  os.replace(tmp, path)


def _read_parts(out_dir: Path, name: str) -> dict:
  """index (as text) -> answer record of every part file (any process count); a torn last line is skipped."""
  found = {}
  for part in sorted(_parts_dir(out_dir).glob(f"{name}.*.jsonl")):
    for line in part.read_text(encoding="utf-8").splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      found[str(rec["index"])] = rec
  return found


def _previous(path: Path, data) -> dict:
  """index -> answer record {raw, status, error} of an earlier run whose question is unchanged: the
  `ok` rows of the TSV and of the part files of unfinished runs."""
  records = {}
  if path.is_file():
    old = read_predictions(path)
    if "status" not in old.columns or "raw" not in old.columns:
      raise DatasetError(
        f"{path} exists but is not a predictions file of this tool (no status/raw columns): choose another --out"
      )
    for rec in old.to_dict("records"):
      records[str(rec["index"])] = {
        "index": rec["index"],
        "question": rec.get("question"),
        "raw": rec["raw"],
        "status": rec.get("status"),
        "error": "",
      }
  records.update(_read_parts(path.parent, path.stem))
  questions = dict(zip(data["index"], data["question"]))
  return {
    idx: {"raw": "" if rec["raw"] is None else str(rec["raw"]), "status": "ok", "error": ""}
    for idx, rec in records.items()
    if rec.get("status") == "ok" and idx in questions and str(rec.get("question")) == str(questions[idx])
  }


def _write_outputs(spec, data, results: dict, path: Path, final: bool) -> dict:
  """NAME.tsv from the answers so far (and NAME_score.json when final); returns the score."""
  frame = data.drop(columns=["image"]).copy()
  got = [results.get(idx) for idx in frame["index"]]
  frame["raw"] = [r["raw"] if r else None for r in got]
  frame["status"] = [r["status"] if r else "pending" for r in got]
  frame["error"] = [(r["error"] or None) if r else None for r in got]
  answered = (frame["status"] != "pending").to_numpy()
  scored, scores = score_frame(spec, frame[answered], require_answers=False)
  for col in ("prediction", "extracted"):
    values = np.full(len(frame), None, dtype=object)
    values[answered] = scored[col].to_numpy(dtype=object)
    frame[col] = values
  _write_atomic(frame[[c for c in frame.columns if c not in OWN_COLUMNS] + list(OWN_COLUMNS)], path)
  if final:
    score_json_path(path).write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  return scores


def score_json_path(predictions: Path) -> Path:
  return predictions.with_name(f"{predictions.stem}_score.json")


def _stderr(s: str) -> None:
  print(s, file=sys.stderr)


def run_understanding(
  model,
  variables,
  data_path: str | os.PathLike,
  dataset: str,
  out_dir: str | os.PathLike,
  *,
  tokenizer=None,
  batch_size: int = 16,
  limit: Optional[int] = None,
  max_new_tokens: Optional[int] = None,
  bucket: int = 64,
  save_every: int = 1,
  workers: Workers = Workers(),
  progress: bool = True,
  log: Callable[[str], None] = _stderr,
) -> dict:
  """Answers and scores a VLMEvalKit TSV with a loaded model; returns the score dict (also written to
  OUTDIR/NAME_score.json). batch_size: rows decoded together per process (rounded up to a multiple of
  the local devices). Every process of `workers` calls it with the same arguments; process 0 writes
  the outputs and returns the score, the others return {}."""
  spec = dataset_spec(dataset)
  if batch_size < 1:
    raise DatasetError(f"--batch-size {batch_size} must be >= 1")
  if max_new_tokens is not None and max_new_tokens < 1:
    raise DatasetError(f"--max-new-tokens {max_new_tokens} must be >= 1")
  lead_log = log if workers.is_lead else (lambda s: None)
  data, dropped = read_tsv(data_path)
  if dropped:
    lead_log(f"{data_path}: {dropped} row(s) without an image skipped (as VLMEvalKit does)")
  if limit is not None:
    data = data.iloc[:limit].reset_index(drop=True)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = output_path(out, spec.name)
  results = _previous(path, data)
  todo = [i for i, idx in enumerate(data["index"]) if idx not in results]
  lead_log(
    f"{spec.name}: {len(data)} rows, {len(data) - len(todo)} already answered in {out}, {len(todo)} to "
    f"decode ({workers.describe()})"
  )
  workers.barrier(f"understanding_{spec.name}_planned")  # every process planned from the same finished rows
  mine = workers.share(todo)
  if mine:
    _decode_rows(
      model,
      variables,
      tokenizer,
      spec,
      data,
      mine,
      path,
      results,
      source=str(data_path),
      batch_size=batch_size,
      max_new_tokens=max_new_tokens,
      bucket=bucket,
      save_every=save_every,
      workers=workers,
      progress=progress,
      log=log,
    )
  workers.barrier(f"understanding_{spec.name}_decoded")
  if not workers.is_lead:
    return {}
  results.update(_read_parts(out, spec.name))
  scores = _write_outputs(spec, data, results, path, final=True)
  for part in _parts_dir(out).glob(f"{spec.name}.*.jsonl"):  # merged into NAME.tsv (written atomically)
    part.unlink()
  if _parts_dir(out).is_dir() and not any(_parts_dir(out).iterdir()):
    _parts_dir(out).rmdir()
  log(f"wrote {path} and {score_json_path(path)}")
  return scores


def _decode_rows(
  model,
  variables,
  tokenizer,
  spec,
  data,
  rows: list[int],
  path: Path,
  results: dict,
  *,
  source: str,
  batch_size: int,
  max_new_tokens: Optional[int],
  bucket: int,
  save_every: int,
  workers: Workers,
  progress: bool,
  log: Callable[[str], None],
) -> None:
  """Decodes this process's rows, appending each batch's answers to its part file; process 0 also
  rewrites NAME.tsv every `save_every` batches."""
  tokenizer = tokenizer or CheersTokenizer()
  batch_size = round_up(batch_size, workers.local_devices)
  part_path = _parts_dir(path.parent) / f"{spec.name}.{workers.process_index}.jsonl"
  part_path.parent.mkdir(exist_ok=True)
  records = data.to_dict("records")
  prepared, new = [], []
  for i in rows:
    r = prepare_row(spec, records[i], tokenizer, model.cfg, max_new_tokens)
    r.position = i
    if r.error:
      new.append((i, "", "failed", r.error))
      log(f"{source} row index={records[i]['index']}: {r.error} (counted as failed, not scored; the run goes on)")
    elif r.budget == 0:  # the reference generates nothing after a prompt of more than 1024 ids
      new.append((i, "", "ok", ""))
    else:
      prepared.append(r)

  def record(batch_new) -> None:
    with open(part_path, "a", encoding="utf-8") as f:
      for i, raw, status, error in batch_new:
        rec = {
          "index": records[i]["index"],
          "question": records[i]["question"],
          "raw": raw,
          "status": status,
          "error": error,
        }
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        results[records[i]["index"]] = rec

  record(new)
  decoder = Decoder(
    model, variables, min(batch_size, round_up(max(len(prepared), 1), workers.local_devices)), bucket, workers
  )
  bar = progress_bar(len(prepared), progress, "row", "decoding")
  flagged = 0
  for n, chunk in enumerate(plan_batches(prepared, decoder.batch_size)):
    answers = decode_chunk(decoder, chunk)
    flagged += sum(int(np.any(ids == IM_START_ID)) for ids in answers)
    record([(r.position, tokenizer.decode(ids, skip_special_tokens=True), "ok", "") for r, ids in zip(chunk, answers)])
    bar.update(len(chunk))
    if workers.is_lead and (n + 1) % max(1, save_every) == 0:
      results.update(_read_parts(path.parent, spec.name))
      _write_outputs(spec, data, results, path, final=False)
  bar.close()
  if flagged:
    log(
      f"{flagged} answer(s) contain <im_start>: the reference would draw an image there and go on; "
      "here the text simply continues"
    )


def decode_chunk(decoder: Decoder, chunk: list[PreparedRow]) -> list[np.ndarray]:
  """One batch through the decoder (a seam for tests that interrupt a run)."""
  return decoder(chunk)
