"""The published figures of Cheers (arXiv 2603.12793, the 1.5 B LLM model), to print beside ours.

Understanding: paper Table 2 (VLMEvalKit, exact matching), in the paper's scale (percent; OCRBench as
points out of 1000 divided by 10). TextVQA_VAL and ScienceQA_TEST are in the official eval.sh but not
in the table. GenEval: Table 3; DPG-Bench: Table 4 (their official scorers, not run here).
"""

from __future__ import annotations

from typing import Optional

TABLE2 = {  # VLMEvalKit dataset name -> figure
  "SEEDBench_IMG": 71.7,
  "MMStar": 50.9,
  "MMBench_DEV_EN_V11": 70.4,
  "ChartQA_TEST": 75.7,
  "OCRBench": 58.4,
  "RealWorldQA": 60.9,
  "POPE": 87.9,
  "AI2D_TEST": 74.4,
  "MathVista_MINI": 50.5,
  "MMMU_DEV_VAL": 36.0,
}
TABLE3_GENEVAL = {
  "Single Obj.": 0.98,
  "Two Obj.": 0.92,
  "Counting": 0.65,
  "Colors": 0.86,
  "Position": 0.63,
  "Color Attr.": 0.65,
  "Overall": 0.78,
}
TABLE4_DPG = {"Global": 90.84, "Entity": 90.24, "Attribute": 89.42, "Relation": 89.71, "Other": 87.37, "Overall": 83.48}


def paper_figure(name: str) -> tuple[Optional[float], str]:
  """(the paper's overall figure, where it is printed) of a benchmark; (None, '') when not published."""
  if name in TABLE2:
    return TABLE2[name], "paper Table 2"
  if name == "geneval":
    return TABLE3_GENEVAL["Overall"], "paper Table 3"
  if name == "dpg":
    return TABLE4_DPG["Overall"], "paper Table 4"
  return None, ""


def in_paper_scale(unit: str, overall: Optional[float]) -> Optional[float]:
  """Our `overall` (in VLMEvalKit's unit) in the paper's scale: percent, OCRBench's points / 10."""
  if overall is None:
    return None
  return {"fraction": 100 * overall, "points of 1000": overall / 10}.get(unit, overall)
