"""Answer post-processing and matching, re-implemented from the official evaluation's behaviour.

Two layers, as in the official pipeline:

* the Cheers wrapper (`Evaluation_Understanding/vlmeval/utils/extract_utils.py`) turns the decoded text
  into the stored `prediction`: the last standalone option letter, or a Yes/No word;
* VLMEvalKit's scorers then read `prediction` (`vlmeval/utils/matching_util.py`, `dataset/utils/yorn.py`,
  `dataset/utils/vqa_eval.py`, `smp/misc.py`). Their quirks are kept on purpose (they move scores), each
  with a short note.
"""

from __future__ import annotations

import ast
import math
import re
import string
from typing import Mapping, Optional, Union

# ---- the Cheers wrapper's post-processing --------------------------------------------------------


def extract_choice(text: str) -> str:
  """MMStar: the last standalone letter A-I of the upper-cased text, else ''."""
  found = re.findall(r"\b([A-I])\b", text.strip().upper())
  return found[-1] if found else ""


def extract_answer(text: str, max_option: str = "E") -> str:
  """Other MCQ sets: the last standalone letter A..max_option (upper-cased text), else the first run of
  alphanumeric words, else ''. With the default 'E', letters F-I are never picked (as the wrapper)."""
  if not text:
    return ""
  text = text.strip()
  found = re.findall(rf"\b([A-{max_option}])\b", text.upper())
  if found:
    return found[-1]
  phrase = re.findall(r"[A-Za-z0-9]+(?:\s+[A-Za-z0-9]+)*", text)
  return phrase[0].strip() if phrase else ""


def extract_yes_no(text: str) -> str:
  """Y/N sets: the last standalone YES or NO of the upper-cased text ('YES'/'NO'), else ''."""
  found = re.findall(r"\b(YES|NO)\b", text.strip().upper())
  return found[-1] if found else ""


# ---- VLMEvalKit's MCQ matching (exact matching, no GPT judge) -----------------------------------
_REFUSALS = (
  "Sorry, I can't help with images of people yet.",
  "I can't process this file.",
  "I'm sorry, but without the image provided",
  "Cannot determine the answer",
)
_API_FAILURE = "Failed to obtain answer via API"


def _infer_option(answer: str, choices: Mapping[str, str]) -> Union[str, bool]:
  if _API_FAILURE in answer:
    return False
  if any(r in answer for r in _REFUSALS):
    return "Z"
  spaced = answer
  for ch in ".()[],:;!*#{}":
    spaced = spaced.replace(ch, " ")
  words = [w.strip() for w in spaced.split()]
  hits = [c for c in choices if c in words]
  if len(hits) == 1:
    return hits[0]
  if not hits and "Z" in words:
    return "Z"
  return False


def _infer_text(answer: str, choices: Mapping[str, str]) -> Union[str, bool]:
  answer = answer.lower()
  hits = [k for k, v in choices.items() if str(v).lower() in answer]
  return hits[0] if len(hits) == 1 else False


def can_infer(answer, choices: Mapping[str, str]) -> Union[str, bool]:
  """The option a prediction names: exactly one option letter among its words (punctuation split),
  'Z' for a refusal, else exactly one option text contained in it; False when undecided."""
  answer = str(answer)
  return _infer_option(answer, choices) or _infer_text(answer, choices)


# ---- VLMEvalKit's Y/N matching -------------------------------------------------------------------
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def process_punctuation(text: str) -> str:
  """VQA punctuation normalisation. Quirk kept: the lone-period removal passes re.UNICODE (32) where
  `count` goes, so at most 32 periods are removed."""
  out = text
  has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _LONE_PERIOD.sub("", out, count=int(re.UNICODE))


def yes_no_extraction(prediction: str) -> str:
  """'Yes' / 'No' when exactly one of the words yes/no occurs, else 'Unknown'."""
  words = process_punctuation(prediction.lower()).split()
  if "yes" in words and "no" not in words:
    return "Yes"
  if "no" in words and "yes" not in words:
    return "No"
  return "Unknown"


# ---- VLMEvalKit's VQA normalisation and metrics ------------------------------------------------
_NUMBER_WORDS = {
  "none": "0",
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
}
_ARTICLES = ("a", "an", "the")
# the official VQA evaluation's contraction table (apostrophe-less spelling -> standard spelling)
_CONTRACTIONS = dict(
  pair.split("=")
  for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's "
    "howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd "
    "itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't "
    "mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've "
    "neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at "
    "'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've "
    "shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd "
    "somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's "
    "someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll "
    "someones=someone's somethingd=something'd somethingd've=something'd've "
    "something'dve=something'd've somethingll=something'll thats=that's thered=there'd "
    "thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd "
    "theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas "
    "wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're "
    "whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd "
    "whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're "
    "whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've "
    "wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've "
    "y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've "
    "youll=you'll youre=you're youve=you've"
  ).split()
)


def _digits_and_articles(text: str) -> str:
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def process_answer(text: str) -> str:
  """The VQA-score normalisation of one answer (whitespace, punctuation, number words, articles)."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _digits_and_articles(process_punctuation(text))


def vqa_score(prediction: str, answers: list[str]) -> float:
  """VQA accuracy: the mean over the answers of min(1, matches among the OTHER answers / 3)."""
  gts = [process_answer(a) for a in answers]
  pred = process_answer(prediction)
  accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
  return float(sum(accs) / len(accs))


def _to_float(text: str) -> Optional[float]:
  try:
    return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
  """ChartQA: numbers within 5 % of the target (a truthy target), anything else case-insensitively equal."""
  prediction, target = str(prediction), str(target)
  p, t = _to_float(prediction), _to_float(target)
  if p is not None and t:
    return abs(p - t) / abs(t) <= max_relative_change
  return prediction.lower() == target.lower()


def chartqa_hit(prediction: str, answers: list[str]) -> float:
  """ChartQA relaxed accuracy of one row. Quirk kept: VLMEvalKit passes (prediction, answer) into
  (target, prediction), so the 5 % is relative to the PREDICTED number."""
  pred = prediction.strip()
  return float(max(relaxed_correctness(pred, a) for a in answers))


def answer_list(answer) -> list[str]:
  """An `answer` cell: a Python list literal of answers, or one answer."""
  if isinstance(answer, list):
    return [str(a) for a in answer]
  text = str(answer)
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
    return [text]
  return [str(a) for a in value] if isinstance(value, list) else [text]


def cell_text(value) -> str:
  """A prediction cell as VLMEvalKit reads it: `str(x)`, so an empty cell (NaN after reading) is 'nan'."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "nan"
  return str(value)


OPTION_LETTERS = string.ascii_uppercase
