"""VLMEvalKit's file round trips, reproduced without writing a spreadsheet (checked against a real
to_excel(engine='xlsxwriter') / read_excel(openpyxl) round trip on random adversarial frames when the
port was written; neither package is needed here)."""

import pandas as pd

from cheers_jax.evaluate.vlmeval_io import PANDAS_NA_STRINGS, as_vlmevalkit_reads_tsv, xlsx_cell, xlsx_round_trip

NAN = float("nan")


def test_the_na_strings_are_pandas_own():
  from pandas._libs.parsers import STR_NA_VALUES

  assert PANDAS_NA_STRINGS == set(STR_NA_VALUES)


def test_cells():
  assert xlsx_cell(NAN) == "" and xlsx_cell("") == ""
  assert xlsx_cell("=1+1") == 0 and xlsx_cell("{=SUM(A1)}") == 0 and xlsx_cell("{=x") == "{=x"
  assert xlsx_cell("mailto:a@b") == "a@b" and xlsx_cell("http://x.org") == "http://x.org"
  assert xlsx_cell("http://" + "y" * 2100) == ""  # over Excel's URL limit: dropped
  assert xlsx_cell("x" * 40000) == "x" * 32767
  assert xlsx_cell(2.0) == 2 and isinstance(xlsx_cell(2.0), int)


def test_round_trip():
  frame = pd.DataFrame({"prediction": ["None", "None.", "=A1", "N/A", "B"], "num": ["007", "1.50", "", "3", "4"]})
  back = xlsx_round_trip(frame)
  assert [str(x) for x in back["prediction"]] == ["nan", "None.", "0", "nan", "B"]
  assert [str(x) for x in back["num"]] == ["7.0", "1.5", "nan", "3.0", "4.0"]


def test_tsv_typing():
  frame = pd.DataFrame({"A": ["1", "2"], "B": ["1", NAN], "C": ["x", "NA"]})
  typed = as_vlmevalkit_reads_tsv(frame)
  assert list(typed["A"]) == [1, 2] and str(typed["B"][0]) == "1.0" and pd.isna(typed["C"][1])
