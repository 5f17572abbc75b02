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
    return dict(
      index=str(i), question="q", A="x", B="y", C="z", D="w", answer=answer, prediction=pred, category=cat, split="dev"
    )

  rows = [
    row(1, "A", "A"),
    row(1000001, "B", "B"),
    row(2000001, "C", "C"),
    row(3000001, "D", "D"),  # right
    row(2, "A", "A", "logic_reasoning"),
    row(1000002, "B", "C", "logic_reasoning"),  # one wrong
    row(3, "C", "C", "logic_reasoning"),
  ]  # alone, right
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
  assert list(frame["extracted"]) == ["A", "A", "B"]  # the open answer is option A after MMMU_preproc
  assert s["overall"] == 0.5  # the validation split
  assert s["overall_all_splits"] == pytest.approx(2 / 3)
  assert s["splits"]["dev"]["overall"] == 1.0


def test_pope_metrics_per_category():
  rows = [
    dict(index="1", question="q", answer="Yes", raw="Yes", category="adversarial"),  # TP
    dict(index="2", question="q", answer="No", raw="Yes, it is", category="adversarial"),  # FP
    dict(index="3", question="q", answer="Yes", raw="No", category="popular"),  # FN
    dict(index="4", question="q", answer="No", raw="no", category="popular,random"),  # TN, twice
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
  _, s = _score(
    "TextVQA_VAL",
    [
      dict(index="1", question="q", answer=answers, raw="2"),
      dict(index="2", question="q", answer=str(["cat"] * 10), raw="The cat."),
    ],
  )
  assert s["overall"] == pytest.approx(95.0)  # (0.9 + 1.0) / 2
  _, s = _score(
    "ChartQA_TEST",
    [
      dict(index="1", question="q", answer="10", raw="10.4", split="human"),
      dict(index="2", question="q", answer="10", raw="9.5", split="augmented"),
    ],
  )
  assert s["overall"] == 50 and s["splits"] == {"augmented": 0.0, "human": 100.0}
  _, s = _score(
    "OCRBench",
    [
      dict(index="1", question="q", answer="['hello']", raw="It says HELLO world", category="Regular Text Recognition"),
      dict(
        index="2",
        question="q",
        answer="['x^2 + 1']",
        raw="x ^ 2+1",
        category="Handwritten Mathematical Expression Recognition",
      ),
      dict(index="3", question="q", answer="['total']", raw="sum", category="Doc-oriented VQA"),
    ],
  )
  assert s["overall"] == 2 and s["final_score_norm"] == 0.2
  assert s["categories"]["Text Recognition"] == 1 and s["categories"]["Doc-oriented VQA"] == 0


def test_failed_rows_are_counted_not_scored_and_mathvista_needs_a_judge():
  rows = [
    dict(index="1", question="q", A="x", B="y", answer="A", raw="A", error=NAN),
    dict(index="2", question="q", A="x", B="y", answer="A", raw=NAN, error="cannot decode image"),
  ]
  frame, s = _score("AI2D_TEST", rows)
  assert s["overall"] == 1.0 and s["n"] == 1 and s["n_failed"] == 1
  assert s["failed_examples"] == ["2: cannot decode image"]
  _, s = _score("MathVista_MINI", [dict(index="1", question="q", answer="3", raw="3")])
  assert s["overall"] is None and s["needs_judge"]


def test_score_command_writes_json_beside_the_file(tmp_path, capsys):
  path = tmp_path / "preds.tsv"
  pd.DataFrame(
    [
      dict(index=1, question="q", A="x", B="y", answer="A", prediction="A"),
      dict(index=2, question="q", A="x", B="y", answer="B", prediction="A"),
    ]
  ).to_csv(path, sep="\t", index=False)
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


# ---- the four behaviours of VLMEvalKit's files (vlmeval_io.py), a hand-made row each ------------------
def test_a_raw_answer_that_pandas_reads_as_missing_is_extracted_from_its_text(tmp_path):
  """The wrapper extracts from the decoded text in memory: 'N/A' holds the letter A. Written to the
  predictions TSV and read back (`score`, resume), it must not turn into an empty answer."""
  rows = [
    dict(index=str(i), question="q", A="cat", B="dog", answer="A", raw=raw)
    for i, raw in enumerate(["N/A", "n/a", "#N/A", "NA"])
  ]
  frame, s = _score("AI2D_TEST", rows)
  assert list(frame["prediction"]) == ["A", "A", "A", "NA"]
  assert list(frame["extracted"]) == ["A", "A", "A", "Z"]  # 'NA' is its own phrase, then missing after the xlsx
  path = tmp_path / "AI2D_TEST.tsv"
  pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
  assert main(["score", "--dataset", "AI2D_TEST", "--predictions", str(path)]) == 0
  assert json.loads((tmp_path / "AI2D_TEST_score.json").read_text())["overall"] == 0.75


def test_a_prediction_pandas_counts_as_missing_matches_no_option():
  """'None.' -> the wrapper's phrase 'None' -> NaN after the xlsx round trip -> 'nan': no option, where
  the text 'None' would otherwise contain the option 'no'."""
  rows = [
    dict(index="1", question="q", A="yes", B="no", answer="B", raw="None."),
    dict(index="2", question="q", A="yes", B="no", answer="B", prediction="null", raw=None),
  ]
  frame, s = _score("SEEDBench_IMG", [{k: v for k, v in rows[0].items()}])
  assert list(frame["prediction"]) == ["None"] and list(frame["extracted"]) == ["Z"] and s["overall"] == 0
  _, s = _score("MMStar", [dict(index="2", question="q", A="yes", B="no", answer="B", prediction="null")])
  assert s["overall"] == 0


def test_a_vqa_prediction_beginning_with_equals_reads_back_as_zero():
  """xlsxwriter writes '=...' as a formula whose stored value is 0; read_excel gives 0, str() '0'."""
  _, s = _score(
    "ChartQA_TEST",
    [dict(index="1", question="q", answer="0", raw="=A1+1"), dict(index="2", question="q", answer="5", raw="=5")],
  )
  assert s["overall"] == 50
  frame, s = _score(
    "OCRBench", [dict(index="1", question="q", answer="['=x']", raw="=x", category="Regular Text Recognition")]
  )
  assert list(frame["extracted"]) == ["0"] and s["overall"] == 0
  _, s = _score("TextVQA_VAL", [dict(index="1", question="q", answer=str(["0"] * 10), raw="=SUM(B2:B9)")])
  assert s["overall"] == 100


def test_an_all_numeric_prediction_column_reads_back_as_numbers():
  """read_excel turns a column whose every cell is numeric into numbers: '007' is 7.0 beside 1.5."""
  frame, s = _score(
    "TextVQA_VAL",
    [
      dict(index="1", question="q", answer=str(["007"] * 10), raw="007"),
      dict(index="2", question="q", answer=str(["1.50"] * 10), raw="1.50"),
    ],
  )
  assert list(frame["extracted"]) == ["7.0", "1.5"] and s["overall"] == 0
  frame, s = _score(
    "TextVQA_VAL",
    [
      dict(index="1", question="q", answer=str(["007"] * 10), raw="007"),
      dict(index="2", question="q", answer=str(["b"] * 10), raw="b"),
    ],
  )
  assert list(frame["extracted"]) == ["007", "b"] and s["overall"] == 100  # a text cell: the column stays text


def test_mmmu_preproc_keeps_c_and_drops_a_missing_answer():
  """MMMU_preproc: a missing A becomes the answer and B 'Other Answers', C.. stay; a missing answer
  leaves A missing, so it is no choice (no 'nan' option that 'banana' would contain)."""
  rows = [
    dict(index="v1", question="q", A=NAN, B=NAN, C="cat", answer="a dog", raw="the cat", split="validation"),
    dict(index="v2", question="q", A=NAN, B="x", answer=NAN, raw="banana", split="validation"),
    dict(index="v3", question="q", A=NAN, B=NAN, answer="forty", raw="forty", split="validation"),
  ]
  frame, s = _score("MMMU_DEV_VAL", rows)
  assert list(frame["extracted"]) == ["C", "Z", "A"]
  assert s["overall"] == pytest.approx(1 / 3)  # the ground truth of a non-letter or missing answer is A


def test_numeric_options_are_typed_as_vlmevalkit_reads_its_tsv():
  """VLMEvalKit reads the dataset TSV with type inference: an option column of numbers with an empty cell
  is floats, so option '2' is the text '2.0' when matched."""
  rows = [
    dict(index="1", question="q", A="1", B="2", answer="B", raw="2 apples"),
    dict(index="2", question="q", A="1", B=NAN, answer="A", raw="2 apples"),
  ]
  frame, _ = _score("ScienceQA_TEST", rows)
  assert list(frame["extracted"]) == ["Z", "Z"]  # '2.0' is not in '2 apples', nor '1'
  frame, _ = _score("ScienceQA_TEST", [rows[0], dict(rows[1], B="3")])
  assert list(frame["extracted"]) == ["B", "Z"]  # an integer column: '2' is in '2 apples'
