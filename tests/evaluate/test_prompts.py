"""Prompts against the exact strings read off the official code (VLMEvalKit's dataset prompt + the Cheers
wrapper's suffix + the chat template), and TSV reading (pointers, lists, rows without an image)."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cheers_jax.evaluate.datasets import BadRowImage, DatasetError, dataset_spec, decode_image, image_cells, read_tsv
from cheers_jax.evaluate.prompts import build_row_prompt, chat_text

NAN = float("nan")
IM = "<im_start><image><im_end>\n"


def _prompt(name, n_images=1, **row):
  return build_row_prompt(dataset_spec(name), pd.Series(row), n_images)


def test_mcq_prompts():
  p = _prompt("SEEDBench_IMG", question="What is shown?", A="cat", B="dog", hint=NAN)
  assert p.text == (
    IM + "Question: What is shown?\nOptions:\nA. cat\nB. dog\n"
    "Please select the correct answer from the options above. \n"
    "\nAnswer with the option's letter from the given choices directly."
  )
  p = _prompt("MMBench_DEV_EN_V11", question="Q?", hint="Look closely.", A="x", B="y", C=NAN)
  assert p.text == (
    IM + "Hint: Look closely.\nQuestion: Q?\nOptions:\nA. x\nB. y\n"
    "Please select the correct answer from the options above. \n"
    "\nAnswer with the option's letter from the given choices directly."
  )
  p = _prompt("MMStar", question="Q?", A="x", B="y")
  assert p.text.endswith(
    "from the options above. \nCarefully read the question and reason step by step to "
    'determine the final correct answer. Format your answer as: "Answer: selected option '
    '(A B C or D)".'
  )
  p = _prompt("RealWorldQA", question="图中是什么？", A="猫", B="狗")
  assert p.text.endswith("from the options above. \n\n请直接回答选项字母。")


def test_mmmu_image_tags_order_the_images():
  p = _prompt("MMMU_DEV_VAL", 2, question="Compare <image 1> and <image 2>.", A="x", B="<image 2> again")
  assert p.image_order == (0, 1, 1)
  assert p.text == (
    IM * 3 + "Question: Compare  and .\nOptions:\nA. x\nB.  again\n"
    "Please select the correct answer from the options above. \n"
    "\nRead the question carefully. and think step by step to determine the correct answer. You "
    "MUST output ONLY the option letter corresponding to your choice or a very short phrase. Do NOT "
    "output reasoning, explanation, or any extra text. Output format: A single capital letter only "
    "or a very short phrase."
  )
  p = _prompt("MMMU_DEV_VAL", 2, question="What is in <image 2>?", A=NAN)
  assert p.image_order == (1,)
  assert p.text == (
    IM + "Question: What is in ?\n\nRead the question carefully. and think carefully to determine "
    "the correct answer. Do NOT repeat the answer or include any unnecessary text."
  )
  with pytest.raises(BadRowImage):
    _prompt("MMMU_DEV_VAL", 1, question="see <image 3>", A="x")


def test_yes_no_and_vqa_prompts():
  assert _prompt("POPE", question="Is there a dog in the image?").text == (
    IM + "Is there a dog in the image?\nAnswer the question using only a single word: 'Yes' or 'No'"
  )
  assert _prompt("TextVQA_VAL", question="what is written?").text == (
    IM + "what is written?\nAnswer the question using a single word or phrase."
    "\nYou must answer the question using a single word or phrase."
  )
  assert _prompt("ChartQA_TEST", question="max?").text.endswith(
    "max?\nAnswer the question using a single word or phrase.\nYou must answer the question using a single word "
    "or phrase."
  )
  assert _prompt("OCRBench", question="what is written?").text == (
    IM + "what is written?Answer the question.\nDo NOT include any unnecessary text."
  )
  assert _prompt("MathVista_MINI", question="x?").text == (
    IM + "x?\nRead the question carefully. and think step by step if necessary. \nDo NOT repeat the answer or "
    "include any unnecessary text."
  )


def test_chat_template_matches_the_tokenizer():
  from cheers_jax.data.tokenizer import CheersTokenizer

  tok = CheersTokenizer()
  user = _prompt("POPE", question="Is it red?").text
  want = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    + user
    + "<|im_end|>\n<|im_start|>assistant\n"
  )
  assert chat_text(user) == want
  ids = tok.build_prompt(user)
  assert (ids == -200).sum() == 1 and tok.decode(ids) == want


def _b64(color, size=(8, 6), fmt="PNG", mode="RGB"):
  buf = io.BytesIO()
  Image.new(mode, size, color).save(buf, format=fmt)
  return base64.b64encode(buf.getvalue()).decode()


def test_read_tsv_pointers_lists_and_missing_images(tmp_path):
  red, blue = _b64((255, 0, 0)), _b64((0, 0, 255), mode="RGBA")
  rows = [
    dict(index=1, question="a", image=red),
    dict(index=2, question="b", image="1"),
    dict(index=3, question="c", image=str([red, blue])),
    dict(index=4, question="d", image=NAN),
  ]
  path = tmp_path / "x.tsv"
  pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
  data, dropped = read_tsv(path)
  assert dropped == 1 and list(data["index"]) == ["1", "2", "3"]
  assert data["image"][1] == red
  cells = image_cells(data.iloc[2])
  assert [n for _, n in cells] == ["3_0.png", "3_1.png"]
  assert image_cells(data.iloc[0])[0][1] == "1.jpg"
  with pytest.raises(DatasetError, match="no column"):
    pd.DataFrame([dict(index=1, image=red)]).to_csv(tmp_path / "y.tsv", sep="\t", index=False)
    read_tsv(tmp_path / "y.tsv")


def test_decode_image_goes_through_the_file_format():
  src = np.random.RandomState(0).randint(0, 256, (16, 16, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(src).save(buf, format="PNG")
  b64 = base64.b64encode(buf.getvalue()).decode()
  as_png = np.asarray(decode_image(b64, "3_0.png"))
  assert np.array_equal(as_png, src)
  jpeg = io.BytesIO()
  Image.fromarray(src).save(jpeg, format="JPEG")
  as_jpg = np.asarray(decode_image(b64, "3.jpg"))
  assert np.array_equal(as_jpg, np.asarray(Image.open(jpeg).convert("RGB"))) and not np.array_equal(as_jpg, src)
  rgba = decode_image(_b64((10, 20, 30, 128), mode="RGBA"), "1.jpg")
  assert rgba.mode == "RGB"
  with pytest.raises(BadRowImage):
    decode_image("bm90IGFuIGltYWdl", "1.jpg")  # "not an image"


def test_an_image_over_the_pixel_limit_is_a_failed_row(tmp_path):
  """Issue 13 item 1 in evaluation: a base64 image PIL refuses as a decompression bomb is a BadRowImage
  (the row is reported and counted as failed), through the one image decoder."""
  import base64

  from tests.data.test_images import write_bomb_png

  raw = open(write_bomb_png(tmp_path / "huge.png"), "rb").read()
  with pytest.raises(BadRowImage, match="huge.jpg.*too large|too large.*huge.jpg"):
    decode_image(base64.b64encode(raw).decode(), "huge.jpg")
