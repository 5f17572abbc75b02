"""The wrapper's post-processing and VLMEvalKit's matching rules, against cases worked out by hand."""

import pytest

from cheers_jax.evaluate import extract as ex


@pytest.mark.parametrize(
  "text, want",
  [
    ("The answer is B.", "B"),  # ANSWER / IS are words, B stands alone
    ("I think A, but maybe C", "C"),  # the last letter wins
    ("a dog", "A"),  # quirk: the article becomes option A
    ("option F", "option F"),  # F is beyond E: the first phrase instead
    ("cat", "cat"),
    ("", ""),
    ("???", ""),
  ],
)
def test_extract_answer(text, want):
  assert ex.extract_answer(text) == want


def test_extract_choice_and_yes_no():
  assert ex.extract_choice("Answer: D") == "D"
  assert ex.extract_choice("option F or G") == "G"
  assert ex.extract_choice("none") == ""
  assert ex.extract_yes_no("Yes, there is. No doubt") == "NO"
  assert ex.extract_yes_no("yes") == "YES"
  assert ex.extract_yes_no("maybe") == ""


def test_can_infer():
  choices = {"A": "cat", "B": "dog"}
  assert ex.can_infer("B", choices) == "B"
  assert ex.can_infer("(A) cat", choices) == "A"
  assert ex.can_infer("A or B", choices) is False  # two letters, and no option text inside
  assert ex.can_infer("the cat", choices) == "A"  # the option text
  assert ex.can_infer("a cat or a dog", choices) is False  # two option texts
  assert ex.can_infer("I'm sorry, but without the image provided", choices) == "Z"
  assert ex.can_infer("Z", choices) == "Z"
  assert ex.can_infer("nan", {"A": "n", "B": "dog"}) == "A"  # an empty prediction is read as 'nan'


def test_yes_no_extraction():
  assert ex.yes_no_extraction("Yes.") == "Yes"
  assert ex.yes_no_extraction("NO") == "No"
  assert ex.yes_no_extraction("yes and no") == "Unknown"
  assert ex.yes_no_extraction("nan") == "Unknown"


def test_punctuation_and_answer_normalisation():
  assert ex.process_punctuation("hello, world") == "hello world"  # ', ' occurs: commas are removed
  assert ex.process_punctuation("3,000 a-b") == "3000 ab"  # a digit comma: every mark removed
  assert ex.process_punctuation("a-b") == "a b"  # otherwise replaced by a space
  assert ex.process_punctuation("end. 3.5") == "end 3.5"  # lone periods go, decimals stay
  assert ex.process_punctuation("." * 40) == "." * 8  # quirk: at most 32 periods removed
  assert ex.process_answer("Two dogs.") == "2 dogs"
  assert ex.process_answer("The cat") == "cat"
  assert ex.process_answer("dont\tknow") == "don't know"


def test_vqa_score():
  # 3 annotators said two, 7 said three; the prediction "2": each "2" annotator sees 2 others agreeing
  # (2/3), each "3" annotator sees 3 (1): (3 * 2/3 + 7 * 1) / 10
  assert ex.vqa_score("2", ["two"] * 3 + ["three"] * 7) == pytest.approx(0.9)
  assert ex.vqa_score("The cat.", ["cat"] * 10) == 1.0
  assert ex.vqa_score("dog", ["cat"] * 10) == 0.0


def test_chartqa_relaxed_accuracy_keeps_the_swapped_arguments():
  assert ex.chartqa_hit("10.4", ["10"]) == 1.0  # |10 - 10.4| / 10.4 = 3.8 %
  assert ex.chartqa_hit("9.5", ["10"]) == 0.0  # |10 - 9.5| / 9.5 = 5.26 % (5.0 % the other way round)
  assert ex.chartqa_hit("0", ["0"]) == 1.0  # a zero target: string comparison
  assert ex.chartqa_hit(" Yes ", ["yes"]) == 1.0
  assert ex.chartqa_hit("50%", ["0.5"]) == 1.0


def test_answer_list_and_cells():
  assert ex.answer_list("['a', 'b']") == ["a", "b"]
  assert ex.answer_list("12") == ["12"]
  assert ex.answer_list("[unclosed") == ["[unclosed"]
  assert ex.cell_text(float("nan")) == "nan" and ex.cell_text("x") == "x"
