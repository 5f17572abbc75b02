"""`evaluate suite` on the tiny checkpoint: the benchmark files built here, one missing-column file, a
GenEval metadata file; the summary beside the paper's figures, and a resumed rerun."""

import json

import pandas as pd
import pytest

from cheers_jax.evaluate.__main__ import main
from cheers_jax.evaluate.paper import in_paper_scale, paper_figure
from cheers_jax.evaluate.suite import plan
from tests.evaluate.test_understanding import _b64, _mmbench, _write
from tests.infer.conftest import TINY


def test_paper_figures_and_scales():
  assert paper_figure("MMBench_DEV_EN_V11") == (70.4, "paper Table 2")
  assert paper_figure("geneval") == (0.78, "paper Table 3") and paper_figure("dpg") == (83.48, "paper Table 4")
  assert paper_figure("TextVQA_VAL") == (None, "")
  assert in_paper_scale("fraction", 0.5) == 50 and in_paper_scale("points of 1000", 584) == 58.4
  assert in_paper_scale("percent", 87.9) == 87.9 and in_paper_scale("fraction", None) is None


def test_plan_says_what_is_missing(tmp_path):
  _write(tmp_path, "POPE", [dict(index=0, image=_b64(0), question="q", answer="Yes")])
  p = plan(str(tmp_path))
  assert list(p.inputs) == ["POPE"] and len(p.missing) == 13
  p = plan(str(tmp_path), only="POPE,geneval")
  assert list(p.inputs) == ["POPE"] and list(p.missing) == ["geneval"]
  with pytest.raises(Exception, match="not a benchmark"):
    plan(str(tmp_path), only="POPE,NoSuchSet")


def test_suite_writes_the_summary_and_resumes(tmp_path, capsys):
  lmu = tmp_path / "LMUData"
  lmu.mkdir()
  _mmbench(lmu)
  _write(
    lmu,
    "POPE",
    [
      dict(index=i, image=_b64(40 + i), question="Is there a dog?", answer=a, category="random")
      for i, a in enumerate(["Yes", "No"])
    ],
  )
  _write(lmu, "AI2D_TEST", [dict(index=1, image=_b64(50), A="x", B="y", answer="A")])  # no `question` column
  (lmu / "geneval").mkdir()
  (lmu / "geneval" / "evaluation_metadata.jsonl").write_text('{"prompt": "a red cube"}\n{"tag": "no prompt"}\n')
  out = tmp_path / "out"
  args = [
    "suite",
    "--checkpoint",
    str(TINY),
    "--dtype",
    "float32",
    "--lmudata",
    str(lmu),
    "--out",
    str(out),
    "--max-new-tokens",
    "3",
    "--batch-size",
    "4",
    "--geneval-steps",
    "2",
    "--no-progress",
  ]
  assert main(args) == 0
  err = capsys.readouterr().err
  assert "dpg skipped, its input is missing" in err and "AI2D_TEST failed" in err
  assert 'evaluation_metadata.jsonl:2: no non-empty "prompt"' in err
  summary = json.loads((out / "summary.json").read_text())
  rows = {r["benchmark"]: r for r in summary["benchmarks"]}
  assert rows["MMBench_DEV_EN_V11"]["status"] == "done" and rows["MMBench_DEV_EN_V11"]["paper"] == 70.4
  assert rows["MMBench_DEV_EN_V11"]["failed"] == 1  # the broken image
  mmb = json.loads((out / "understanding" / "MMBench_DEV_EN_V11_score.json").read_text())
  assert rows["MMBench_DEV_EN_V11"]["ours_paper_scale"] == pytest.approx(100 * mmb["overall"])
  assert rows["POPE"]["status"] == "done" and rows["AI2D_TEST"]["status"] == "failed"
  assert "no column(s) question" in rows["AI2D_TEST"]["note"]
  assert rows["geneval"]["status"] == "done" and rows["geneval"]["failed"] == 1 and rows["geneval"]["paper"] == 0.78
  assert sorted(p.name for p in (out / "geneval" / "00000" / "samples").iterdir()) == [f"{n:05}.png" for n in range(4)]
  assert rows["dpg"]["status"] == "missing" and "SEEDBench_IMG" in summary["missing"]
  md = (out / "summary.md").read_text()
  assert "| MMBench_DEV_EN_V11 | done |" in md and "paper Table 2" in md and "| dpg | missing |" in md
  before = pd.read_csv(out / "understanding" / "POPE.tsv", sep="\t", dtype=str, keep_default_na=False)
  assert main(args) == 0  # resumed: nothing left to decode or draw
  err = capsys.readouterr().err
  assert "2 already answered" in err and "0 to generate" in err
  after = pd.read_csv(out / "understanding" / "POPE.tsv", sep="\t", dtype=str, keep_default_na=False)
  assert list(after["raw"]) == list(before["raw"])
