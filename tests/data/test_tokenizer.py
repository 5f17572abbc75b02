"""Tokenizer, chat templates and CFG ids, checked against the oracle goldens (tokenized by HF Qwen2)."""

from __future__ import annotations

import numpy as np
import pytest

from cheers_jax.data.tokenizer import (
  IGNORE_INDEX,
  IMAGE_GEN_TOKEN_INDEX,
  IMAGE_TOKEN_INDEX,
  IM_END_ID,
  IM_START_ID,
  NO_MEAN_ID,
  CheersTokenizer,
  cfg_dropout_ids,
  uncond_ids,
)
from tests.oracle import instance_params

# The conversations and prompts make_golden.py tokenized (its `samples`, `chat_prompt` calls).
TRAIN_SAMPLES = {
  "und": [
    {"role": "user", "content": "<im_start><image><im_end>\nWhat is this?"},
    {"role": "assistant", "content": "A small red apple."},
  ],
  "gen": [
    {"role": "user", "content": "An apple.\nBased on the above description, generate an image."},
    {"role": "assistant", "content": "<im_start><image_gen><im_end>"},
  ],
  "text": [
    {"role": "user", "content": "Please introduce yourself briefly."},
    {"role": "assistant", "content": "I am a model."},
  ],
}
TRAIN_BATCHES = {"train": ["und", "gen"], "train3": ["und", "gen", "text"]}
PROMPTS = {  # golden name -> (user content, add_im_start)
  "und": ("<im_start><image><im_end>\nWhat is in this picture?", False),
  "drift": ("A red apple on a wooden table.", True),
  "t2i": ("A red apple on a wooden table.", True),
  "i2t": ("<im_start><image><im_end>\n Describe this image.", False),
}


@pytest.fixture(scope="module")
def tok() -> CheersTokenizer:
  return CheersTokenizer()


@pytest.fixture(scope="module", params=instance_params())
def golden(request):
  with np.load(request.param / "golden.npz", allow_pickle=False) as g:
    return {k: g[k] for k in g.files if not k.startswith(("train.grad", "train3.grad"))}


# ------------------------------------------------------------------------------------------ golden
@pytest.mark.parametrize("batch", sorted(TRAIN_BATCHES))
def test_training_ids_and_labels_match_golden(tok, golden, batch):
  ids, labels, mask = (
    golden[f"{batch}.input_ids"],
    golden[f"{batch}.labels"],
    golden[f"{batch}.attention_mask"],
  )
  assert ids.shape[0] == len(TRAIN_BATCHES[batch])
  for row, kind in enumerate(TRAIN_BATCHES[batch]):
    enc = tok.build_conversation(TRAIN_SAMPLES[kind])
    assert enc.input_ids.dtype == np.int64 and enc.labels.dtype == np.int64
    n = int(mask[row].sum())
    assert mask[row, :n].all() and not mask[row, n:].any(), "golden rows are right-padded"
    np.testing.assert_array_equal(enc.input_ids, ids[row, :n])
    np.testing.assert_array_equal(enc.labels, labels[row, :n])
    # the collator pads ids with 0 and labels with -100
    assert (ids[row, n:] == 0).all() and (labels[row, n:] == IGNORE_INDEX).all()


def test_official_jsonl_format_gives_same_encoding(tok, golden):
  conv = [
    {"from": "human", "value": "An apple.\nBased on the above description, generate an image."},
    {"from": "gpt", "value": "<im_start><image_gen><im_end>"},
  ]
  enc = tok.build_conversation({"id": "02_generation", "conversations": conv})
  n = int(golden["train.attention_mask"][1].sum())
  np.testing.assert_array_equal(enc.input_ids, golden["train.input_ids"][1, :n])
  np.testing.assert_array_equal(enc.labels, golden["train.labels"][1, :n])


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_inference_prompts_match_golden(tok, golden, name):
  content, add_im_start = PROMPTS[name]
  ids = tok.build_prompt(content, add_im_start=add_im_start)
  assert ids.dtype == np.int64
  np.testing.assert_array_equal(ids, golden[f"{name}.input_ids"][0])
  # messages form gives the same
  np.testing.assert_array_equal(
    tok.build_prompt([{"role": "user", "content": content}], add_im_start=add_im_start), ids
  )


def test_uncond_ids_match_golden(tok, golden):
  np.testing.assert_array_equal(tok.uncond_ids(golden["drift.input_ids"]), golden["drift.uncond_input_ids"])


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize(
  "token, tid",
  [
    ("<|endoftext|>", 151643),
    ("<|im_start|>", 151644),
    ("<|im_end|>", 151645),
    ("<image>", 151665),
    ("<image_gen>", 151666),
    ("<im_start>", 151667),
    ("<im_end>", 151668),
    ("<no_mean>", 151669),
  ],
)
def test_special_tokens_are_single_ids(tok, token, tid):
  assert tok.encode(token) == [tid]
  assert tok.encode(f"a{token}b") == tok.encode("a") + [tid] + tok.encode("b")
  assert tok.token_to_id(token) == tid
  assert tok.decode([tid]) == token


def test_known_encodings(tok):
  # ids from transformers' Qwen2TokenizerFast with the same files and the five added tokens
  assert tok.encode("Hello world! 你好，世界 🙂👍") == [
    9707,
    1879,
    0,
    220,
    108386,
    3837,
    99489,
    27484,
    144349,
  ]
  assert tok.encode("Cheers: e\u0301 café  \n\n  x=42;") == [
    74861,
    25,
    3958,
    51950,
    18611,
    220,
    856,
    28,
    19,
    17,
    26,
  ]
  assert tok.vocab_size == 151670


@pytest.mark.parametrize(
  "text",
  [
    "Hello, world!",
    "你好，世界。今天天气很好。",
    "emoji 🙂👍🏽 👨‍👩‍👧 🇯🇵",
    "  leading and trailing  \n\n",
    "tabs\tand\r\nnewlines",
    "mixed: naïve café 日本語 русский 123.45",
    "<im_start><image><im_end>\nDescribe.",
  ],
)
def test_encode_decode_roundtrip(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_nfc_normalisation(tok):
  assert tok.encode("e\u0301") == tok.encode("\u00e9")


def test_decode_placeholders_and_skip_special(tok):
  ids = tok.build_prompt("<im_start><image><im_end>\nHi")
  assert IMAGE_TOKEN_INDEX in ids.tolist()
  assert "<im_start><image><im_end>\nHi" in tok.decode(ids)
  assert tok.decode(ids, skip_special_tokens=True) == "system\nYou are a helpful assistant.\nuser\n\nHi\nassistant\n"
  assert tok.decode([IMAGE_GEN_TOKEN_INDEX]) == "<image_gen>"


# ------------------------------------------------------------------------------------------ templates
def test_conversation_labels_rules(tok):
  enc = tok.build_conversation([{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "yo\n"}])
  text = tok.decode(enc.input_ids)
  assert text == (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
  )
  ids, labels = enc.input_ids, enc.labels
  structural = np.isin(ids, [198, 151644, 151645, IM_START_ID, IM_END_ID, NO_MEAN_ID])
  np.testing.assert_array_equal(labels[structural], ids[structural])
  n_assist = len(tok.encode("<|im_start|>assistant\nyo<|im_end|>\n"))
  np.testing.assert_array_equal(labels[-n_assist:], ids[-n_assist:])
  assert (labels[:-n_assist][~structural[:-n_assist]] == IGNORE_INDEX).all()


def test_conversation_placeholders(tok):
  enc = tok.build_conversation(
    [
      {"role": "user", "content": "<im_start><image><im_end>\nedit"},
      {"role": "assistant", "content": "<im_start><image_gen><im_end>"},
    ]
  )
  ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
  assert 151665 not in ids and 151666 not in ids
  i, j = ids.index(IMAGE_TOKEN_INDEX), ids.index(IMAGE_GEN_TOKEN_INDEX)
  # reference quirk: only input_ids are replaced; a user <image> is unlabelled, an assistant <image_gen>
  # keeps its vocabulary id as label
  assert labels[i] == IGNORE_INDEX and labels[j] == 151666
  assert labels[i - 1] == IM_START_ID and labels[i + 1] == IM_END_ID


def test_conversation_truncation_keeps_tail(tok):
  msgs = TRAIN_SAMPLES["text"]
  full = tok.build_conversation(msgs)
  cut = tok.build_conversation(msgs, max_seq_len=10)
  np.testing.assert_array_equal(cut.input_ids, full.input_ids[-10:])
  np.testing.assert_array_equal(cut.labels, full.labels[-10:])


def test_jsonl_leading_non_human_is_dropped(tok):
  conv = [
    {"from": "system", "value": "ignored"},
    {"from": "human", "value": "hi"},
    {"from": "gpt", "value": "yo"},
  ]
  ref = tok.build_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
  enc = tok.build_conversation(conv)
  np.testing.assert_array_equal(enc.input_ids, ref.input_ids)
  with pytest.raises(ValueError):
    tok.build_conversation([{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}])


def test_prompt_with_system_message_and_no_generation_prompt(tok):
  ids = tok.build_prompt(
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " x "}],
    add_generation_prompt=False,
  )
  assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n x <|im_end|>\n"


# ------------------------------------------------------------------------------------------ CFG ids
def test_uncond_and_cfg_dropout():
  ids = np.array([[151644, 872, IM_START_ID, IMAGE_TOKEN_INDEX, IM_END_ID, IMAGE_GEN_TOKEN_INDEX, 151643]])
  np.testing.assert_array_equal(
    uncond_ids(ids),
    [[NO_MEAN_ID, NO_MEAN_ID, IM_START_ID, IMAGE_TOKEN_INDEX, IM_END_ID, NO_MEAN_ID, NO_MEAN_ID]],
  )
  np.testing.assert_array_equal(
    cfg_dropout_ids(ids[0]),
    [NO_MEAN_ID, NO_MEAN_ID, IM_START_ID, IMAGE_TOKEN_INDEX, IM_END_ID, IMAGE_GEN_TOKEN_INDEX, NO_MEAN_ID],
  )
  assert uncond_ids(ids).dtype == np.int64
