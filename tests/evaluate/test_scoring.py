"""Every scorer against figures worked out by hand, through `evaluate score` on hand-written files."""
import json
import math

import pandas as pd
import pytest

from cheers_jax.evaluate.__main__ import main
from cheers_jax.evaluate.datasets import dataset_spec
from cheers_jax.evaluate.scoring import score_frame

NAN = float("nan")


def _score(name, rows):
  frame, scores = score_frame(dataset_spec(name), pd.DataFrame(rows))
  return frame, scores


def test_mcq_vanilla_from_raw():
  rows = [
      dict(index="1", question="q", A="cat", B="dog", answer="B", raw="B", category="c1"),
      dict(index="2", question="q", A="cat", B="dog", answer="A", raw="The answer is C", category="c1"),
      dict(index="3", question="q", A="cat", B="dog", answer="A", raw="", category="c2"),  # -> 'nan' -> Z
      dict(index="4", question="q", A="cat", B="dog", answer="A", raw="a dog", category="c2"),  # -> 'A'
  ]
  frame, s = _score("SEEDBench_IMG", rows)
  assert list(frame["prediction"]) == ["B", "C", "", "A"]
  assert list(frame["extracted"]) == ["B", "Z", "Z", "A"]
  assert s["overall"] == 0.5 and s["n"] == 4 and s["n_failed"] == 0
  assert s["categories"] == {"c1": 0.5, "c2": 0.5}


def test_mcq_circular_counts_a_question_only_if_every_rotation_is_right():
  def row(i, answer, pred, cat="coarse_perception"):
    return dict(index=str(i), question="q", A="x", B="y", C="z", D="w", answer=answer, prediction=pred,
                category=cat, split="dev")
  rows = [row(1, "A", "A"), row(1000001, "B", "B"), row(2000001, "C", "C"), row(3000001, "D", "D"),  # right
          row(2, "A", "A", "logic_reasoning"), row(1000002, "B", "C", "logic_reasoning"),           # one wrong
          row(3, "C", "C", "logic_reasoning")]                                                       # alone, right
  _, s = _score("MMBench_DEV_EN_V11", rows)
  assert s["overall"] == pytest.approx(2 / 3) and s["n_scored_questions"] == 3
  assert s["categories"] == {"CP": 1.0, "LR": 0.5}


def test_mmmu_open_question_and_validation_split():
  rows = [
      dict(index="v1", question="What is 6*7?", A=NAN, B=NAN, answer="42", raw="The answer is 42", split="validation"),
      dict(index="v2", question="q", A="x", B="y", answer="B", raw="A", split="validation"),
      dict(index="d1", question="q", A="x", B="y", answer="B", raw="B", split="dev"),
  ]
  frame, s = _score("MMMU_DEV_VAL", rows)
  assert list(frame["prediction"]) == ["The answer is 42", "A", "B"]
  assert list(frame["extracted"]) == ["A", "A", "B"]   # the open answer is option A after MMMU_preproc
  assert s["overall"] == 0.5                              # the validation split
  assert s["overall_all_splits"] == pytest.approx(2 / 3)
  assert s["splits"]["dev"]["overall"] == 1.0


def test_pope_metrics_per_category():
  rows = [
      dict(index="1", question="q", answer="Yes", raw="Yes", category="adversarial"),          # TP
      dict(index="2", question="q", answer="No", raw="Yes, it is", category="adversarial"),    # FP
      dict(index="3", question="q", answer="Yes", raw="No", category="popular"),               # FN
      dict(index="4", question="q", answer="No", raw="no", category="popular,random"),         # TN, twice
  ]
  frame, s = _score("POPE", rows)
  assert list(frame["prediction"]) == ["YES", "YES", "NO", "NO"]
  assert list(frame["extracted"]) == ["Yes", "Yes", "No", "No"]
  # exploded: TP 1, FP 1, FN 1, TN 2 -> precision = recall = F1 = 50 %, accuracy 3/5
  assert s["overall"] == pytest.approx(50) and s["acc"] == pytest.approx(60)
  assert s["precision"] == pytest.approx(50) and s["recall"] == pytest.approx(50)
  adv = s["categories"]["adversarial"]
  assert adv["f1"] == pytest.approx(200 / 3) and adv["acc"] == pytest.approx(50)  # p 1/2, r 1
  assert s["categories"]["popular"]["f1"] == 0 and s["categories"]["popular"]["acc"] == pytest.approx(50)
  assert s["categories"]["random"]["acc"] == pytest.approx(100)


def test_textvqa_chartqa_ocrbench():
  answers = str(["two"] * 3 + ["three"] * 7)
  _, s = _score("TextVQA_VAL", [dict(index="1", question="q", answer=answers, raw="2"),
                                dict(index="2", question="q", answer=str(["cat"] * 10), raw="The cat.")])
  assert s["overall"] == pytest.approx(95.0)  # (0.9 + 1.0) / 2
  _, s = _score("ChartQA_TEST", [dict(index="1", question="q", answer="10", raw="10.4", split="human"),
                                 dict(index="2", question="q", answer="10", raw="9.5", split="augmented")])
  assert s["overall"] == 50 and s["splits"] == {"augmented": 0.0, "human": 100.0}
  _, s = _score("OCRBench", [
      dict(index="1", question="q", answer="['hello']", raw="It says HELLO world", category="Regular Text Recognition"),
      dict(index="2", question="q", answer="['x^2 + 1']", raw="x ^ 2+1",
           category="Handwritten Mathematical Expression Recognition"),
      dict(index="3", question="q", answer="['total']", raw="sum", category="Doc-oriented VQA")])
  assert s["overall"] == 2 and s["final_score_norm"] == 0.2
  assert s["categories"]["Text Recognition"] == 1 and s["categories"]["Doc-oriented VQA"] == 0


def test_failed_rows_are_counted_not_scored_and_mathvista_needs_a_judge():
  rows = [dict(index="1", question="q", A="x", B="y", answer="A", raw="A", error=NAN),
          dict(index="2", question="q", A="x", B="y", answer="A", raw=NAN, error="cannot decode image")]
  frame, s = _score("AI2D_TEST", rows)
  assert s["overall"] == 1.0 and s["n"] == 1 and s["n_failed"] == 1
  assert s["failed_examples"] == ["2: cannot decode image"]
  _, s = _score("MathVista_MINI", [dict(index="1", question="q", answer="3", raw="3")])
  assert s["overall"] is None and s["needs_judge"]


def test_score_command_writes_json_beside_the_file(tmp_path, capsys):
  path = tmp_path / "preds.tsv"
  pd.DataFrame([dict(index=1, question="q", A="x", B="y", answer="A", prediction="A"),
                dict(index=2, question="q", A="x", B="y", answer="B", prediction="A")]).to_csv(path, sep="\t",
                                                                                               index=False)
  assert main(["score", "--dataset", "ScienceQA_TEST", "--predictions", str(path)]) == 0
  written = json.loads((tmp_path / "ScienceQA_TEST_score.json").read_text())
  assert written["overall"] == 0.5 and written["dataset"] == "ScienceQA_TEST" and written["n"] == 2
  assert "ScienceQA_TEST" in capsys.readouterr().out
  assert main(["score", "--dataset", "NoSuchSet", "--predictions", str(path)]) == 2
  assert capsys.readouterr().err.startswith("error: unknown dataset")
  assert main(["score", "--dataset", "POPE", "--predictions", str(tmp_path / "missing.tsv")]) == 2
  assert math.isfinite(written["overall"])


def test_a_file_without_answers_gives_predictions_only():
  rows = [dict(index="1", question="q", A="x", B="y", raw="The answer is B")]
  spec = dataset_spec("MMBench_DEV_EN_V11")
  with pytest.raises(Exception, match="answer"):
    score_frame(spec, pd.DataFrame(rows))
  frame, s = score_frame(spec, pd.DataFrame(rows), require_answers=False)
  assert list(frame["prediction"]) == ["B"] and s["overall"] is None and "predictions only" in s["note"]
