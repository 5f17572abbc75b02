"""The text the model reads for one benchmark row, built as the official evaluation builds it.

Three layers, each re-implemented from the code that defines it:
1. VLMEvalKit's dataset prompt (`vlmeval/dataset/image_mcq.py`, `image_vqa.py`, `image_yorn.py`,
   `image_base.py`): hint, question, options, and the VQA datasets' own suffix; MMMU's `<image N>` tags
   split the text and order the images.
2. The Cheers wrapper (`vlmeval/vlm/cheers.py`, `build_prompt`): all text segments joined, then a suffix
   chosen by the dataset's type and name (a Chinese variant when the text holds CJK characters). The
   wrapper also sets `self.system_prompt` for some datasets but never uses it: the chat template's
   default system turn is what the model sees.
3. `generate_inner`: one `<im_start><image><im_end>\\n` per image (images first, in message order),
   then the text, as one user turn of the tokenizer's chat template with the generation prompt.
"""

from __future__ import annotations

import dataclasses
import re

from cheers_jax.evaluate.datasets import MCQ, VQA, YORN, BadRowImage, DatasetSpec, is_missing, option_letters

IMAGE_MARK = "<im_start><image><im_end>\n"
CHAT_SYSTEM = "You are a helpful assistant."

# Suffixes of the Cheers wrapper (vlmeval/vlm/cheers.py), English and Chinese variants.
MMMU_MC_SUFFIX = (
  "\nRead the question carefully. and think step by step to determine the correct answer. You MUST "
  "output ONLY the option letter corresponding to your choice or a very short phrase. Do NOT output "
  "reasoning, explanation, or any extra text. Output format: A single capital letter only or a very "
  "short phrase."
)
MMMU_MC_SUFFIX_CN = (
  "\n仔细阅读问题，并逐步思考以确定正确答案。\n你必须只输出对应的选项字母或短语，不要输出推理、解释或任何额外文本。"
  "\n输出格式：仅一个大写字母或短语。"
)
MMMU_OPEN_SUFFIX = (
  "\nRead the question carefully. and think carefully to determine the correct answer. Do NOT "
  "repeat the answer or include any unnecessary text."
)
MMMU_OPEN_SUFFIX_CN = (
  "\n仔细阅读问题，并认真思考以确定正确答案。\n答案要简单且准确。不要重复答案，也不要输出无关的文字。"
)
MMSTAR_SUFFIX = (
  "Carefully read the question and reason step by step to determine the final correct answer. "
  'Format your answer as: "Answer: selected option (A B C or D)".'
)
MMSTAR_SUFFIX_CN = '\n仔细阅读问题，并逐步思考以确定最终的正确答案。答案格式为："Answer: selected option (A B C or D)"'
LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
LETTER_SUFFIX_CN = "\n请直接回答选项字母。"
YES_NO_SUFFIX = "\nAnswer the question using only a single word: 'Yes' or 'No'"
YES_NO_SUFFIX_CN = '\n用一个单词作答："Yes" 或 "No"。'
MATHVISTA_SUFFIX = (
  "\nRead the question carefully. and think step by step if necessary. \nDo NOT repeat the answer "
  "or include any unnecessary text."
)
MATHVISTA_SUFFIX_CN = "\n仔细阅读问题，并在必要时逐步思考。\n不要重复答案，也不要输出无关的文字。"
OCRBENCH_SUFFIX = "Answer the question.\nDo NOT include any unnecessary text."
SHORT_ANSWER_SUFFIX = "\nYou must answer the question using a single word or phrase."
SHORT_ANSWER_SUFFIX_CN = "\n请用简单字母或短语回答问题。"

# VLMEvalKit's own text (dataset level)
VQA_DATASET_SUFFIX = "\nAnswer the question using a single word or phrase."  # ImageVQADataset: TextVQA, ChartQA
MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
VQA_DATASET_SUFFIX_SETS = ("TextVQA_VAL", "ChartQA_TEST")

_CJK = re.compile("[\u4e00-\u9fff]")


def has_cjk(text: str) -> bool:
  return _CJK.search(text) is not None


@dataclasses.dataclass(frozen=True)
class RowPrompt:
  text: str  # the user turn's content, image marks included
  image_order: tuple  # which of the row's images fill the marks, in order (MMMU may repeat or drop)

  @property
  def n_images(self) -> int:
    return len(self.image_order)


def dataset_messages(spec: DatasetSpec, row, n_images: int) -> list[tuple[str, object]]:
  """VLMEvalKit's message list for a row: ('image', i) items and ('text', str) items."""
  question = str(row["question"])
  if spec.family == MCQ:
    text = ""
    if "hint" in row and not is_missing(row["hint"]):
      text += f"Hint: {row['hint']}\n"
    text += f"Question: {question}\n"
    letters = option_letters(row)
    if letters:
      text += "Options:\n" + "".join(f"{k}. {row[k]}\n" for k in letters) + MCQ_INSTRUCTION
  elif spec.name in VQA_DATASET_SUFFIX_SETS:
    text = question + VQA_DATASET_SUFFIX
  else:  # POPE, OCRBench, MathVista: the bare question
    text = question
  msgs: list[tuple[str, object]] = [("image", i) for i in range(n_images)] + [("text", text)]
  if spec.name.startswith("MMMU"):
    msgs = split_mmmu(msgs)
  return msgs


def split_mmmu(msgs: list[tuple[str, object]]) -> list[tuple[str, object]]:
  """MMMU: `<image N>` tags cut the text; tag N brings image N-1 there (a single digit; '0' wraps to the
  last image, as Python indexing does in VLMEvalKit). Without tags the messages are unchanged."""
  images = [v for k, v in msgs if k == "image"]
  texts = [v for k, v in msgs if k == "text"]
  pieces = texts[0].split("<image ")
  if len(pieces) == 1:
    return msgs
  out: list[tuple[str, object]] = [("text", pieces[0])]
  for piece in pieces[1:]:
    if len(piece) < 2 or not piece[0].isdigit() or piece[1] != ">":
      raise BadRowImage(f"malformed MMMU image tag '<image {piece[:3]}': VLMEvalKit needs '<image N>' with one digit")
    k = int(piece[0]) - 1
    if not -len(images) <= k < len(images):
      raise BadRowImage(f"the text names <image {piece[0]}> but the row has {len(images)} image(s)")
    out += [("image", images[k]), ("text", piece[2:])]
  return out


def wrapper_suffix(spec: DatasetSpec, prompt: str) -> str:
  """The suffix the Cheers wrapper appends for this dataset (its build_prompt)."""
  cn = has_cjk(prompt)
  name = spec.name
  if spec.family == MCQ:
    if "MMMU_DEV_VAL" in name:
      if "Options:" in prompt:
        return MMMU_MC_SUFFIX_CN if cn else MMMU_MC_SUFFIX
      return MMMU_OPEN_SUFFIX_CN if cn else MMMU_OPEN_SUFFIX
    if "MMStar" in name:
      return MMSTAR_SUFFIX_CN if cn else MMSTAR_SUFFIX
    return LETTER_SUFFIX_CN if cn else LETTER_SUFFIX
  if spec.family == YORN:
    return YES_NO_SUFFIX_CN if cn else YES_NO_SUFFIX
  if spec.family == VQA:
    if "MathVista_MINI" in name:
      return MATHVISTA_SUFFIX_CN if cn else MATHVISTA_SUFFIX
    if "OCRBench" in name:
      return OCRBENCH_SUFFIX
    return SHORT_ANSWER_SUFFIX_CN if cn else SHORT_ANSWER_SUFFIX
  return ""


def build_row_prompt(spec: DatasetSpec, row, n_images: int) -> RowPrompt:
  """The user turn for a row with `n_images` images (see the module docstring)."""
  msgs = dataset_messages(spec, row, n_images)
  prompt = "".join(v for k, v in msgs if k == "text")
  prompt += wrapper_suffix(spec, prompt)
  order = tuple(v for k, v in msgs if k == "image")
  return RowPrompt(IMAGE_MARK * len(order) + prompt, order)


def chat_text(user_text: str) -> str:
  """The tokenizer's chat template for one user turn with the generation prompt (what the model reads)."""
  return (
    f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"
  )
