"""What VLMEvalKit's file handling does to the values it scores (`vlmeval/smp/file.py`, `inference.py`).

The official pipeline never scores the model's text directly:

1. The dataset TSV is read with `pd.read_csv(sep='\\t')`: pandas' default missing-value strings
   (`PANDAS_NA_STRINGS`: 'NA', 'N/A', 'None', 'null', 'NaN', ...) become NaN and all-numeric columns
   become numbers (an option column "1", "2" reads back 1.0, 2.0 when another cell is empty). The
   answers of MCQ sets come from this table (`as_vlmevalkit_reads_tsv`).
2. The wrapper post-processes the decoded text (extract.py) into `prediction`; inference writes that
   table (minus `image`) to an xlsx with `to_excel(engine='xlsxwriter')`, and every scorer reads it back
   with `pd.read_excel` (openpyxl). `xlsx_round_trip` reproduces that round trip without writing a file:
   - an empty string or NaN is a blank cell: NaN again;
   - a string beginning with '=' (or '{=...}') is written as a formula whose cached value is 0: it reads
     back as the number 0 (`str` -> '0');
   - a string longer than Excel's 32,767 UTF-16 units is truncated to that;
   - read_excel then applies pandas' missing-value strings (`None.` survives, `None` does not) and
     turns a column whose every value is numeric into numbers ('007' -> 7, '1.50' -> 1.5).
   - a URL (http://, ftp://, mailto:, file://, ...) becomes a hyperlink that reads back as its shown
     text ('mailto:a@b' -> 'a@b'), or blank when longer than Excel's 2,079 characters. Not reproduced:
     xlsxwriter's limit of 65,530 links per sheet.
3. Each scorer then applies `str()`: NaN becomes 'nan', 0 becomes '0'.
"""

from __future__ import annotations

import io
import math
import re

# pandas' default missing-value strings (pandas._libs.parsers.STR_NA_VALUES), matched against a whole cell
PANDAS_NA_STRINGS = frozenset(
  {
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
  }
)
EXCEL_MAX_STRING = 32767  # UTF-16 code units
EXCEL_MAX_URL = 2079  # xlsxwriter drops a longer link (a blank cell)
_URL = re.compile(r"(ftp|http)s?://|mailto:|(in|ex)ternal:|file://")  # xlsxwriter writes these as hyperlinks


def is_na(value) -> bool:
  return value is None or (isinstance(value, float) and math.isnan(value))


def xlsx_cell(value):
  """The value pandas' openpyxl reader hands over for a cell that to_excel(engine='xlsxwriter') wrote
  from `value` ('' for a blank cell, as pandas' reader does), before read_excel's column parsing."""
  if is_na(value):
    return ""
  if isinstance(value, str):
    if value.startswith("=") or (value.startswith("{=") and value.endswith("}")):
      return 0  # a formula; xlsxwriter stores 0 as its value, and openpyxl reads the stored value
    if _URL.match(value):
      return _url_text(value)
    units = value.encode("utf-16-le")
    if len(units) > 2 * EXCEL_MAX_STRING:
      return units[: 2 * EXCEL_MAX_STRING].decode("utf-16-le", errors="ignore")
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)  # a number cell: pandas' reader gives integers back as int
  return value


def _url_text(url: str) -> str:
  """The text xlsxwriter shows for a hyperlink it writes from a string (xlsxwriter/url.py), '' if dropped."""
  if len(url.encode("utf-16-le")) > 2 * EXCEL_MAX_URL:
    return ""
  if url.startswith("mailto:"):
    return url.replace("mailto:", "", 1)
  if url.startswith("internal:"):
    return url.replace("internal:", "", 1)
  if url.startswith("file://") or url.startswith("external:"):
    path = url.replace("external:", "file:///", 1).replace("file:///", "", 1).replace("file://", "", 1)
    return path.replace("/", "\\")
  return url


def xlsx_round_trip(frame):
  """The frame as `pd.read_excel` gives it back after `frame.to_excel(index=False, engine='xlsxwriter')`."""
  from pandas.io.parsers import TextParser  # pandas: the evaluation's TSV files only

  if frame.empty:
    return frame.copy()
  rows = [[str(c) for c in frame.columns]]
  rows += [[xlsx_cell(v) for v in record] for record in frame.itertuples(index=False, name=None)]
  # read_excel's own parser call (pandas/io/excel/_base.py), with its defaults
  return TextParser(rows, header=0, skip_blank_lines=False).read()


def as_vlmevalkit_reads_tsv(frame):
  """A frame of cell texts (as this tool reads TSVs: strings, empty cells NaN) re-read the way
  VLMEvalKit's `load(tsv)` reads the file they came from: default missing values and type inference."""
  import pandas as pd  # pandas: the evaluation's TSV files only

  buf = io.StringIO()
  frame.to_csv(buf, sep="\t", index=False)
  buf.seek(0)
  return pd.read_csv(buf, sep="\t")


def read_literal_tsv(path):
  """Every cell's text exactly as written (no missing-value strings, no numbers): how this tool reads back
  the model's answers (`raw`, `prediction`), which the official pipeline holds in memory."""
  import pandas as pd  # pandas: the evaluation's TSV files only

  return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[])
