"""`evaluate suite`: every benchmark whose input is present, resumable, and a summary beside the paper.

Inputs: LMUDATA/<NAME>.tsv for the 12 understanding sets (VLMEvalKit's own file names), the GenEval
metadata JSONL and the DPG-Bench prompts folder (flags, or LMUDATA/geneval/evaluation_metadata.jsonl and
LMUDATA/dpg_bench/prompts). Outputs: OUT/understanding/<NAME>.tsv and _score.json, OUT/geneval/ and
OUT/dpg/ in the layouts their official scorers read, and OUT/summary.md / OUT/summary.json: each
benchmark's status, our figure (in VLMEvalKit's unit and in the paper's scale) and the paper's figure
with its table. A benchmark whose input is broken is reported as failed and the others go on; a rerun
resumes every benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Optional

from cheers_jax.errors import UserError
from cheers_jax.evaluate.datasets import DATASETS, DatasetError
from cheers_jax.evaluate.generation import run_dpg, run_geneval
from cheers_jax.evaluate.paper import in_paper_scale, paper_figure
from cheers_jax.evaluate.parallel import Workers
from cheers_jax.evaluate.understanding import run_understanding

GENERATION = ("geneval", "dpg")
DEFAULT_GENEVAL = Path("geneval") / "evaluation_metadata.jsonl"
DEFAULT_DPG = Path("dpg_bench") / "prompts"


@dataclasses.dataclass
class SuitePlan:
  inputs: dict[str, Path]  # benchmark -> its input (present)
  missing: dict[str, str]  # benchmark -> what was looked for


def plan(
  lmudata: str, geneval_metadata: Optional[str] = None, dpg_prompts: Optional[str] = None, only: Optional[str] = None
) -> SuitePlan:
  """Which benchmarks can run (their input is present) and which cannot; `only` restricts the list."""
  root = Path(lmudata)
  if not root.is_dir():
    raise DatasetError(f"--lmudata {lmudata!r} is not a folder (VLMEvalKit's LMUData: one NAME.tsv per benchmark)")
  names = list(DATASETS) + list(GENERATION)
  if only:
    wanted = [x.strip() for x in only.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in names]
    if unknown:
      raise DatasetError(f"--only {','.join(unknown)}: not a benchmark; choose among {', '.join(names)}")
    names = [n for n in names if n in wanted]
  where = {n: root / f"{n}.tsv" for n in DATASETS}
  where["geneval"] = Path(geneval_metadata) if geneval_metadata else root / DEFAULT_GENEVAL
  where["dpg"] = Path(dpg_prompts) if dpg_prompts else root / DEFAULT_DPG
  present = {n: where[n] for n in names if (where[n].is_dir() if n == "dpg" else where[n].is_file())}
  return SuitePlan(present, {n: str(where[n]) for n in names if n not in present})


def _stderr(s: str) -> None:
  print(s, file=sys.stderr)


def run_suite(
  model,
  variables,
  tokenizer,
  suite_plan: SuitePlan,
  out_dir: str,
  *,
  understanding: dict,
  generation: dict,
  workers: Workers = Workers(),
  progress: bool = True,
  log: Callable[[str], None] = _stderr,
) -> Optional[dict]:
  """Runs the planned benchmarks (every process of `workers` calls it); process 0 writes and returns the
  summary, the others return None. understanding: run_understanding's settings; generation: per
  'geneval' / 'dpg', run_geneval / run_dpg's settings."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  lead_log = log if workers.is_lead else (lambda s: None)
  for name, looked in suite_plan.missing.items():
    lead_log(f"suite: {name} skipped, its input is missing ({looked})")
  rows = []
  for name, source in suite_plan.inputs.items():
    common = dict(workers=workers, progress=progress, log=log)
    row = {"benchmark": name, "input": str(source)}
    try:
      if name == "geneval":
        res = run_geneval(
          model, variables, tokenizer, str(source), str(out / "geneval"), **generation["geneval"], **common
        )
        row.update(
          status="done",
          overall=None,
          unit="",
          output=str(out / "geneval"),
          failed=res["failed"],
          note="images ready for GenEval's detector scorer (not run here)",
        )
      elif name == "dpg":
        res = run_dpg(model, variables, tokenizer, str(source), str(out / "dpg"), **generation["dpg"], **common)
        row.update(
          status="done",
          overall=None,
          unit="",
          output=str(out / "dpg"),
          failed=res["failed"],
          note="grids ready for DPG-Bench's mPLUG scorer (not run here)",
        )
      else:
        scores = run_understanding(
          model, variables, source, name, out / "understanding", tokenizer=tokenizer, **understanding, **common
        )
        row.update(
          status="done",
          overall=scores.get("overall"),
          unit=scores.get("unit", ""),
          output=str(out / "understanding" / f"{name}.tsv"),
          failed=scores.get("n_failed", 0),
          note=scores.get("note", ""),
        )
    except UserError as e:  # a broken input stops its benchmark only
      lead_log(f"suite: {name} failed: {e}")
      row.update(status="failed", overall=None, unit="", output="", failed=None, note=str(e))
    row["ours_paper_scale"] = in_paper_scale(row["unit"], row["overall"])
    row["paper"], row["paper_source"] = paper_figure(name)
    rows.append(row)
  rows += [
    {
      "benchmark": n,
      "status": "missing",
      "input": looked,
      "overall": None,
      "unit": "",
      "ours_paper_scale": None,
      "paper": paper_figure(n)[0],
      "paper_source": paper_figure(n)[1],
      "output": "",
      "failed": None,
      "note": "input not found",
    }
    for n, looked in suite_plan.missing.items()
  ]
  if not workers.is_lead:
    return None
  summary = {"benchmarks": rows, "missing": list(suite_plan.missing)}
  (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  (out / "summary.md").write_text("\n".join(summary_markdown(rows)) + "\n", encoding="utf-8")
  return summary


def summary_markdown(rows: list[dict]) -> list[str]:
  def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"

  lines = [
    "# Evaluation summary",
    "",
    "| benchmark | status | ours | unit | ours (paper scale) | paper | source | failed rows | note |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    note = str(r.get("note") or "").replace("|", "/").replace("\n", " ")
    failed = "-" if r.get("failed") is None else str(r["failed"])
    lines.append(
      f"| {r['benchmark']} | {r['status']} | {fmt(r['overall'], 4)} | {r['unit'] or '-'} | "
      f"{fmt(r['ours_paper_scale'])} | {fmt(r['paper'])} | {r['paper_source'] or '-'} | {failed} | {note} |"
    )
  return lines
