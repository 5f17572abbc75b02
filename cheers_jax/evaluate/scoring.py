"""Scores as VLMEvalKit computes them when no GPT judge is configured (exact matching).

`score_frame` is the whole path from a predictions table to the figures: the wrapper's post-processing
of `raw` into `prediction` (when `raw` is there), the values VLMEvalKit's scorers actually see
(`vlmevalkit_view`: the dataset as its TSV reader types it, the predictions after its xlsx round trip,
see vlmeval_io.py), VLMEvalKit's extraction of each row's answer into `extracted`, then the figures,
computed from `extracted` and those values (`score_from_extracted`).

Rows with a non-empty `error` (an image that did not decode...) are left out and counted.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from cheers_jax.evaluate import extract as ex
from cheers_jax.evaluate.datasets import MCQ, YORN, DatasetError, DatasetSpec, as_int_index, is_missing, option_letters
from cheers_jax.evaluate.vlmeval_io import as_vlmevalkit_reads_tsv, read_literal_tsv, xlsx_round_trip

# VLMEvalKit's short names of MMBench's abilities (dataset/utils/multiple_choice.py)
MMB_ABBREVIATIONS = {
  "coarse_perception": "CP",
  "finegrained_perception (instance-level)": "FP-S",
  "finegrained_perception (cross-instance)": "FP-C",
  "logic_reasoning": "LR",
  "relation_reasoning": "RR",
  "attribute_reasoning": "AR",
}
OCRBENCH_GROUPS = {
  "Text Recognition": (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
  ),
  "Scene Text-centric VQA": ("Scene Text-centric VQA",),
  "Doc-oriented VQA": ("Doc-oriented VQA",),
  "Key Information Extraction": ("Key Information Extraction",),
  "Handwritten Mathematical Expression Recognition": ("Handwritten Mathematical Expression Recognition",),
}
HMER = "Handwritten Mathematical Expression Recognition"
OWN_COLUMNS = ("raw", "prediction", "extracted", "status", "error")  # what this tool adds to a dataset's columns
CIRCULAR_OFFSET = 1_000_000  # MMBench's rotated copies have index = original + k * 1e6
NO_OPTION = "Z"  # VLMEvalKit's answer when no option can be inferred


# ---- prediction (the wrapper) --------------------------------------------------------------------
def postprocess(spec: DatasetSpec, raw: str) -> str:
  """The Cheers wrapper's `prediction` from the decoded text (generate_inner's tail)."""
  if spec.family == MCQ:
    return ex.extract_choice(raw) if spec.name == "MMStar" else ex.extract_answer(raw)
  if spec.family == YORN:
    return ex.extract_yes_no(raw)
  return raw


# ---- what VLMEvalKit's scorers see -----------------------------------------------------------------
ANSWER_KEY = "vlmevalkit_answer"  # the MCQ answer as the dataset TSV reads it (VLMEvalKit's answer_map)


def vlmevalkit_view(frame) -> list[dict]:
  """One dict per row of `frame` (dataset columns as cell texts, `prediction` the wrapper's output) with
  the values VLMEvalKit's scorers read: everything after its xlsx round trip, plus ANSWER_KEY, the
  answer as its TSV reader typed it (MCQ ground truth comes from the dataset, not the xlsx)."""
  own = [c for c in frame.columns if c in OWN_COLUMNS]
  meta = as_vlmevalkit_reads_tsv(frame.drop(columns=own))
  data = xlsx_round_trip(meta.assign(prediction=list(frame["prediction"])))
  rows = data.to_dict("records")
  if "answer" in meta.columns:
    for r, answer in zip(rows, meta["answer"]):
      r[ANSWER_KEY] = answer
  return rows


# ---- extraction (VLMEvalKit) ---------------------------------------------------------------------
def _choices(spec: DatasetSpec, row) -> dict:
  if spec.metric == "mmmu" and is_missing(row.get("A")):
    # MMMU_preproc: an open question's A becomes its answer and B 'Other Answers'; C.. stay. A missing
    # answer leaves A missing, and build_choices drops it.
    row = dict(row, A=row.get("answer"), B="Other Answers")
  return {k: row[k] for k in option_letters(row)}


def ground_truth(spec: DatasetSpec, row):
  answer = row.get(ANSWER_KEY, row.get("answer"))
  if spec.metric == "mmmu":  # answer_map: a non-letter (or missing) answer is option A
    return answer if isinstance(answer, str) and answer in ex.OPTION_LETTERS else "A"
  return answer


def extract_one(spec: DatasetSpec, row) -> str:
  pred = ex.cell_text(row.get("prediction"))  # the scorers' str(): NaN -> 'nan', the formula's 0 -> '0'
  m = spec.metric
  if m in ("mcq", "mcq_circular", "mmmu"):
    return ex.can_infer(pred, _choices(spec, row)) or NO_OPTION
  if m == "pope" or spec.family == YORN:
    return ex.yes_no_extraction(pred)
  if m == "vqa_score":
    return ex.process_answer(pred)
  if m == "relaxed_accuracy":
    return pred.strip()
  if m == "ocrbench":
    if row.get("category") == HMER:
      return pred.strip().replace("\n", " ").replace(" ", "")
    return pred.lower().strip().replace("\n", " ")
  return ""  # judge-scored (MathVista): nothing to extract without the judge


# ---- figures from `extracted` ----------------------------------------------------------------------
def _mean(xs) -> float:
  """np.mean, as VLMEvalKit averages (its pairwise summation gives the same last bit as the official figure)."""
  xs = list(xs)
  return float(np.mean(xs)) if xs else float("nan")


def _mcq_report(rows: list[dict]) -> dict:
  """report_acc: Overall and each l2-category / category (MMBench abilities abbreviated)."""
  out = {"overall": _mean(r["hit"] for r in rows), "categories": {}}
  for group in ("l2-category", "category"):
    values = sorted({r[group] for r in rows if group in r and not is_missing(r[group])})
    for v in values:
      name = MMB_ABBREVIATIONS.get(v, v)
      out["categories"][name] = _mean(r["hit"] for r in rows if r.get(group) == v)
  return out


def _with_splits(rows: list[dict], report) -> dict:
  res = report(rows)
  splits = sorted({str(r["split"]) for r in rows if "split" in r and not is_missing(r["split"])})
  if len(splits) > 1:
    res["splits"] = {sp: report([r for r in rows if str(r.get("split")) == sp]) for sp in splits}
  return res


def _mcq_hits(spec: DatasetSpec, rows: list[dict]) -> list[dict]:
  if spec.metric != "mcq_circular":
    return [dict(r, hit=float(r["extracted"] == ground_truth(spec, r))) for r in rows]
  groups = defaultdict(list)
  for r in rows:
    idx = as_int_index(r["index"])
    if idx is None:
      raise DatasetError(f"{spec.name} is scored circularly and needs integer indices; got {r['index']!r}")
    g = as_int_index(r["g_index"]) if "g_index" in r and not is_missing(r.get("g_index")) else idx % CIRCULAR_OFFSET
    groups[g].append(r)
  main = []
  for r in rows:
    idx = as_int_index(r["index"])
    g = as_int_index(r["g_index"]) if "g_index" in r and not is_missing(r.get("g_index")) else idx % CIRCULAR_OFFSET
    if idx == g:  # the original question carries its group's verdict: every rotation right
      main.append(dict(r, hit=float(all(x["extracted"] == ground_truth(spec, x) for x in groups[g]))))
  return main


def _pope_metrics(rows: list[dict]) -> dict:
  y_true = [r["answer"] == "Yes" for r in rows]
  y_pred = [r["extracted"] == "Yes" for r in rows]
  tp = sum(t and p for t, p in zip(y_true, y_pred))
  fp = sum((not t) and p for t, p in zip(y_true, y_pred))
  fn = sum(t and (not p) for t, p in zip(y_true, y_pred))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  acc = _mean(float(r["answer"] == r["extracted"]) for r in rows)
  return {"f1": f1 * 100, "acc": acc * 100, "precision": precision * 100, "recall": recall * 100}


def _pope(rows: list[dict]) -> dict:
  # POPE_rating: a row listed under several comma-separated categories counts once per category,
  # in the overall figures too
  exploded = []
  for r in rows:
    cats = str(r["category"]).split(",") if "category" in r and not is_missing(r.get("category")) else [None]
    exploded += [dict(r, category=c) for c in cats]
  overall = _pope_metrics(exploded)
  res = {
    "overall": overall["f1"],
    **{k: v for k, v in overall.items() if k != "f1"},
    "f1": overall["f1"],
    "categories": {},
  }
  for c in sorted({r["category"] for r in exploded if r["category"] is not None}):
    res["categories"][c] = _pope_metrics([r for r in exploded if r["category"] == c])
  return res


def _yorn_default(rows: list[dict]) -> dict:
  hits = [float(r["answer"] == r["extracted"]) for r in rows]
  res = {"overall": _mean(hits) * 100, "categories": {}}
  for group in ("category", "l2-category"):
    for c in sorted({r[group] for r in rows if group in r and not is_missing(r[group])}):
      res["categories"][c] = _mean(float(r["answer"] == r["extracted"]) for r in rows if r.get(group) == c) * 100
  return res


def vqa_hit(spec: DatasetSpec, row) -> float:
  answers = ex.answer_list(ex.cell_text(row.get("answer")))  # the scorer's str(answer)
  got = row["extracted"]
  if spec.metric == "vqa_score":
    gts = [ex.process_answer(a) for a in answers]
    return _mean(min(1.0, sum(g == got for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts)))
  if spec.metric == "relaxed_accuracy":  # (prediction, answer) into (target, prediction): see extract.chartqa_hit
    return float(max(ex.relaxed_correctness(got, a) for a in answers))
  raise ValueError(spec.metric)


def _vqa(spec: DatasetSpec, rows: list[dict]) -> dict:
  rows = [dict(r, hit=vqa_hit(spec, r)) for r in rows]
  res = {"overall": _mean(r["hit"] for r in rows) * 100, "categories": {}}
  if any("split" in r for r in rows):
    res["splits"] = {
      sp: _mean(r["hit"] for r in rows if str(r.get("split")) == sp) * 100
      for sp in sorted({str(r.get("split")) for r in rows})
    }
  elif any("category" in r for r in rows):
    for c in sorted({str(r["category"]) for r in rows if "category" in r}):
      res["categories"][c] = _mean(r["hit"] for r in rows if str(r.get("category")) == c) * 100
  return res


def ocrbench_hit(row) -> bool:
  got = row["extracted"]
  for a in ex.answer_list(ex.cell_text(row.get("answer"))):
    a = (
      a.strip().replace("\n", " ").replace(" ", "")
      if row.get("category") == HMER
      else a.lower().strip().replace("\n", " ")
    )
    if a in got:
      return True
  return False


def _ocrbench(rows: list[dict]) -> dict:
  known = {c for cats in OCRBENCH_GROUPS.values() for c in cats}
  unknown = sorted({str(r.get("category")) for r in rows} - known)
  if unknown:
    raise DatasetError(
      f"OCRBench rows with unknown category {unknown[:3]}: VLMEvalKit only scores its 10 OCRBench categories"
    )
  per = defaultdict(int)
  for r in rows:
    per[r["category"]] += int(ocrbench_hit(r))
  groups = {g: sum(per[c] for c in cats) for g, cats in OCRBENCH_GROUPS.items()}
  final = sum(groups.values())
  return {"overall": float(final), "final_score_norm": final / 10, "categories": groups}


def score_from_extracted(spec: DatasetSpec, rows: list[dict]) -> dict:
  """The figures of `spec` from rows holding `extracted` and the answer columns."""
  m = spec.metric
  if m == "judge":
    return {"overall": None, "needs_judge": True}
  if not rows:
    return {"overall": None, "categories": {}}
  if m in ("mcq", "mcq_circular", "mmmu"):
    main = _mcq_hits(spec, rows)
    res = _with_splits(main, _mcq_report)
    res["n_scored_questions"] = len(main)
    if m == "mmmu" and "validation" in res.get("splits", {}):
      res["overall_all_splits"], res["categories_all_splits"] = res["overall"], res["categories"]
      res["overall"] = res["splits"]["validation"]["overall"]  # VLMEvalKit's reported row: the validation split
      res["categories"] = res["splits"]["validation"]["categories"]
    return res
  if m == "pope":
    return _pope(rows)
  if spec.family == YORN:
    return _yorn_default(rows)
  if m in ("vqa_score", "relaxed_accuracy"):
    return _vqa(spec, rows)
  if m == "ocrbench":
    return _ocrbench(rows)
  raise ValueError(f"no scorer for metric {m!r}")


# ---- the whole path ----------------------------------------------------------------------------------
def failed_mask(frame):
  if "error" not in frame.columns:
    return [False] * len(frame)
  return [not is_missing(e) and str(e) != "" for e in frame["error"]]


def score_frame(spec: DatasetSpec, frame, recompute_prediction: bool = True, require_answers: bool = True):
  """-> (frame with `prediction` and `extracted` filled on the scorable rows, the score dict).

  require_answers=False: a file without the answer columns (a test split) gets its predictions and an
  empty score instead of an error."""
  frame = frame.copy()
  failed = failed_mask(frame)
  if "raw" in frame.columns and recompute_prediction:
    frame["prediction"] = [
      None if bad else postprocess(spec, "" if is_missing(r) else str(r)) for r, bad in zip(frame["raw"], failed)
    ]
  if "prediction" not in frame.columns:
    raise DatasetError("the predictions file has neither a `raw` nor a `prediction` column")
  needed = {
    "mcq": ["answer"],
    "mcq_circular": ["answer"],
    "mmmu": ["answer"],
    "pope": ["answer"],
    "vqa_score": ["answer"],
    "relaxed_accuracy": ["answer"],
    "ocrbench": ["answer", "category"],
  }
  missing = [c for c in needed.get(spec.metric, []) if c not in frame.columns]
  if missing:
    if require_answers:
      raise DatasetError(f"{spec.name} is scored against column(s) {', '.join(missing)}, which the file lacks")
    frame["extracted"] = None
    return frame, _clean(
      {
        "dataset": spec.name,
        "overall": None,
        "n": int(sum(not f for f in failed)),
        "unit": spec.unit,
        "n_failed": int(sum(failed)),
        "note": f"no {', '.join(missing)} column: predictions only, nothing to score",
      }
    )
  seen = vlmevalkit_view(frame) if len(frame) else []
  extracted = [None if bad else extract_one(spec, r) for r, bad in zip(seen, failed)]
  frame["extracted"] = extracted
  rows = [dict(r, extracted=e) for r, e, bad in zip(seen, extracted, failed) if not bad]
  res = score_from_extracted(spec, rows)
  errors = [(i, e) for i, e, bad in zip(frame["index"], frame.get("error", [None] * len(frame)), failed) if bad]
  scores = {
    "dataset": spec.name,
    "overall": res.pop("overall"),
    "n": len(rows),
    "unit": spec.unit,
    "n_failed": len(errors),
    **res,
  }
  if errors:
    scores["failed_examples"] = [f"{i}: {e}" for i, e in errors[:5]]
  if spec.note:
    scores["note"] = spec.note
  return frame, _clean(scores)


def _clean(obj):
  """JSON-safe: NaN -> None, numpy scalars -> Python."""
  if isinstance(obj, dict):
    return {str(k): _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
    obj = obj.item()
  if isinstance(obj, float) and math.isnan(obj):
    return None
  return obj


def read_predictions(path: str | os.PathLike):
  """A predictions TSV: the dataset's columns as its own TSV reads (strings, pandas' missing values NaN),
  and `raw` / `prediction` exactly as written: they stand for the model's text, which the official
  pipeline holds in memory (a raw answer 'N/A' is not missing: the wrapper finds the letter A in it)."""
  import pandas as pd  # pandas: the evaluation's TSV files only

  try:
    frame = pd.read_csv(path, sep="\t", dtype=str)
    literal = read_literal_tsv(path)
  except FileNotFoundError as e:
    raise DatasetError(f"predictions file not found: {os.fspath(path)!r}") from e
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise DatasetError(f"cannot read {os.fspath(path)!r} as a tab-separated file: {e}") from e
  for col in ("raw", "prediction"):
    if col in frame.columns:
      frame[col] = literal[col]
  return frame


def score_path(spec: DatasetSpec, predictions: str | os.PathLike) -> Path:
  return Path(predictions).with_name(f"{spec.name}_score.json")


def score_file(spec: DatasetSpec, predictions: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> dict:
  """Re-scores a predictions TSV and writes NAME_score.json beside it (or to `out`)."""
  frame = read_predictions(predictions)
  for col in ("index",):
    if col not in frame.columns:
      raise DatasetError(f"{os.fspath(predictions)!r} has no `{col}` column")
  _, scores = score_frame(spec, frame)
  target = Path(out) if out else score_path(spec, predictions)
  target.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  return scores


def summary_lines(scores: dict) -> list[str]:
  """A small table: the overall figure, then each category / split."""

  def fmt(v):
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

  lines = [
    f"{'dataset':<22} {'overall':>10}  unit            n  failed",
    f"{scores['dataset']:<22} {fmt(scores['overall']):>10}  {scores.get('unit', ''):<14}"
    f"{scores['n']:>3}  {scores['n_failed']:>6}",
  ]
  for key in ("categories", "splits"):
    for name, value in (scores.get(key) or {}).items():
      v = value.get("overall", value.get("f1")) if isinstance(value, dict) else value
      lines.append(f"  {key[:-1] if key == 'splits' else 'category'} {str(name)[:40]:<40} {fmt(v):>10}")
  if scores.get("note"):
    lines.append(f"  note: {scores['note']}")
  return lines
