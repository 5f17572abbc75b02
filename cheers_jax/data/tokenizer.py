"""Qwen2 byte-level BPE tokenizer plus the Cheers chat templates and placeholder conventions.

Built with the `tokenizers` library from the vocab/merges shipped in `cheers_jax/assets/tokenizer`, so no
`transformers` dependency. Two templates exist in the reference and they differ on purpose:

* training (`rae_qwen`, `build_conversation`): a default system turn is always prepended, message
  contents are stripped, and labels follow the assistant turns plus a set of structural ids;
* inference (the Qwen2 tokenizer's own chat template, `build_prompt`): the default system turn is added
  only when the first message is not a system message, and contents are NOT stripped.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from cheers_jax import package_data
from cheers_jax.tokens import (  # noqa: F401  (re-exported: the ids live in one place)
  CHAT_END_ID,
  CHAT_START_ID,
  EOS_TOKEN_ID,
  IGNORE_INDEX,
  IM_END_ID,
  IM_START_ID,
  IMAGE_GEN_ID,
  IMAGE_GEN_TOKEN_INDEX,
  IMAGE_ID,
  IMAGE_TOKEN_INDEX,
  NEWLINE_ID,
  NO_MEAN_ID,
  PAD_TOKEN_ID,
)

IMAGE_TOKEN = "<image>"
IMAGE_GEN_TOKEN = "<image_gen>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
NO_MEAN_TOKEN = "<no_mean>"
UND_IMAGE_TEXT = IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN  # how an input image appears in text
GEN_IMAGE_TEXT = IM_START_TOKEN + IMAGE_GEN_TOKEN + IM_END_TOKEN  # how an image to generate appears

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_MAX_SEQ_LEN = 8192  # RAEQwenTemplate.encode_messages default; train_cheers does not override it

# The UMMProcessor adds these (special) in this order after Qwen2.5's own added tokens, giving 151665..151669.
CHEERS_ADDED_TOKENS = (IMAGE_TOKEN, IMAGE_GEN_TOKEN, IM_START_TOKEN, IM_END_TOKEN, NO_MEAN_TOKEN)
# Labelled in every turn by rae_qwen, user and system turns included.
ALWAYS_LABELLED_IDS = frozenset({NEWLINE_ID, CHAT_START_ID, CHAT_END_ID, IM_START_ID, IM_END_ID, NO_MEAN_ID})
# Ids that survive the CFG replacement by <no_mean> (inference: `_build_uncond_full_ids`).
UNCOND_KEEP_IDS = frozenset({IM_START_ID, IM_END_ID, IMAGE_TOKEN_INDEX})
# Ids that survive training-time CFG dropout (train_cheers.process_sample).
CFG_DROPOUT_KEEP_IDS = frozenset({IMAGE_GEN_TOKEN_INDEX, IM_START_ID, IM_END_ID, IMAGE_TOKEN_INDEX})

# Qwen2 pre-tokenizer split pattern (same as Qwen2Tokenizer / Qwen2TokenizerFast).
QWEN2_SPLIT_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PLACEHOLDER_OF = {IMAGE_ID: IMAGE_TOKEN_INDEX, IMAGE_GEN_ID: IMAGE_GEN_TOKEN_INDEX}
_TOKEN_OF_PLACEHOLDER = {IMAGE_TOKEN_INDEX: IMAGE_ID, IMAGE_GEN_TOKEN_INDEX: IMAGE_GEN_ID}
_ROLE_OF_SPEAKER = {"human": "user", "gpt": "assistant"}

Message = Mapping[str, Any]


class Encoded(NamedTuple):
  input_ids: np.ndarray  # int64 (L,), placeholders as -200 / -300
  labels: np.ndarray  # int64 (L,), IGNORE_INDEX where not trained on


def _asset_text(name: str) -> str:
  return (package_data.TOKENIZER / name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _build_backend() -> Tokenizer:
  vocab = json.loads(_asset_text("vocab.json"))
  merges = []
  for line in _asset_text("merges.txt").splitlines():
    if line and not line.startswith("#version"):
      a, b = line.split(" ")
      merges.append((a, b))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()

  config = json.loads(_asset_text("tokenizer_config.json"))
  # Added tokens get consecutive ids after the vocab, so add them in id order and check each id.
  expected: list[tuple[int, str]] = []
  for tid, spec in sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
    tok.add_tokens(
      [
        AddedToken(
          spec["content"],
          single_word=spec.get("single_word", False),
          lstrip=spec.get("lstrip", False),
          rstrip=spec.get("rstrip", False),
          normalized=spec.get("normalized", False),
          special=spec.get("special", False),
        )
      ]
    )
    expected.append((int(tid), spec["content"]))
  for content in CHEERS_ADDED_TOKENS:
    tok.add_tokens([AddedToken(content, normalized=False, special=True)])
    expected.append((expected[-1][0] + 1, content))
  for tid, content in expected:
    if tok.token_to_id(content) != tid:
      raise RuntimeError(f"tokenizer asset mismatch: {content!r} got id {tok.token_to_id(content)}, want {tid}")
  return tok


def uncond_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
  """CFG-unconditional prompt for inference: every id except <im_start>, <im_end> and -200 -> <no_mean>.

  Matches `Cheers._build_uncond_full_ids`: note that -300 and the pad id are replaced too.
  """
  ids = np.asarray(ids, dtype=np.int64)
  return np.where(np.isin(ids, list(UNCOND_KEEP_IDS)), ids, NO_MEAN_ID)


def cfg_dropout_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
  """Training CFG dropout: every id except -300, <im_start>, <im_end>, -200 -> <no_mean>; labels stay.

  The reference applies it with probability `cfg_data_rate` and only to samples that contain -300;
  that decision is the caller's.
  """
  ids = np.asarray(ids, dtype=np.int64)
  return np.where(np.isin(ids, list(CFG_DROPOUT_KEEP_IDS)), ids, NO_MEAN_ID)


def normalize_messages(messages: Iterable[Message] | Mapping[str, Any]) -> list[dict[str, str]]:
  """Accepts role/content dicts, the official JSONL `conversations` list ({"from", "value"}) or a whole
  JSONL record holding `conversations`; returns role/content dicts.

  For the JSONL form this follows veomni's `custom_data` preprocessing: a leading message that is not
  from "human" (e.g. a system line) is dropped, then human -> user and gpt -> assistant.
  """
  if isinstance(messages, Mapping):
    messages = messages["conversations"]
  messages = list(messages)
  if messages and "from" in messages[0]:
    if messages[0]["from"] != "human":
      messages = messages[1:]
    if not messages or messages[0]["from"] != "human":
      raise ValueError("a conversation must start with a 'human' message")
    return [{"role": _ROLE_OF_SPEAKER[m["from"]], "content": m["value"]} for m in messages]
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def _to_placeholders(ids: list[int]) -> list[int]:
  return [_PLACEHOLDER_OF.get(i, i) for i in ids]


class CheersTokenizer:
  """Qwen2 tokenizer with Cheers' added tokens and templates. Outputs are numpy int64."""

  pad_token_id = PAD_TOKEN_ID
  eos_token_id = EOS_TOKEN_ID

  def __init__(self) -> None:
    self._tok = _build_backend()

  @property
  def vocab_size(self) -> int:
    """Tokenizer vocabulary incl. added tokens (151670); the model's embedding table is larger (151936)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    """Plain tokenization (no template, no BOS/EOS); added tokens in the text become single ids."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Decodes ids; placeholders -200/-300 print as <image>/<image_gen> (special, so skippable)."""
    ids = [_TOKEN_OF_PLACEHOLDER.get(int(i), int(i)) for i in ids]
    return self._tok.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

  # ------------------------------------------------------------------ training template (rae_qwen)
  def build_conversation(
    self,
    messages: Iterable[Message] | Mapping[str, Any],
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
  ) -> Encoded:
    """Training ids and labels as veomni's RAEQwenTemplate ('rae_qwen') builds them.

    Turns are `<|im_start|>{role}\\n{content.strip()}<|im_end|>\\n` after a system turn that is always
    added. User/system turns are unlabelled, every other role is labelled with its own ids, and the
    ids 198, 151644, 151645, 151667, 151668, 151669 are labelled wherever they occur. <image>/<image_gen>
    become -200/-300 in input_ids only: the labels keep the raw vocabulary ids (an assistant
    <image_gen> is labelled 151666, as in the reference; the model ignores labels at image positions).
    The last `max_seq_len` tokens are kept.
    """
    turns = [{"role": "system", "content": system_prompt}] + normalize_messages(messages)
    ids: list[int] = []
    labels: list[int] = []
    for m in turns:
      enc = self.encode(f"<|im_start|>{m['role']}\n{m['content'].strip()}<|im_end|>\n")
      ids += enc
      labels += [IGNORE_INDEX] * len(enc) if m["role"] in ("user", "system") else enc
    labels = [t if t in ALWAYS_LABELLED_IDS else lab for t, lab in zip(ids, labels)]
    ids = _to_placeholders(ids)
    return Encoded(np.asarray(ids[-max_seq_len:], np.int64), np.asarray(labels[-max_seq_len:], np.int64))

  # ------------------------------------------------------------------ inference template (Qwen2 chat)
  def build_prompt(
    self,
    text_or_messages: str | Iterable[Message],
    add_generation_prompt: bool = True,
    add_im_start: bool = False,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
  ) -> np.ndarray:
    """Inference prompt ids as Inference/T2I.py and I2T.py build them.

    A string is one user message. The tokenizer's chat template is applied (default system turn only
    if the first message is not a system message; contents are not stripped), <image>/<image_gen>
    become -200/-300 as the processor does, and `add_im_start` appends <im_start> (T2I:
    `add_im_start_id=True`), which makes the model start an image right away.
    """
    messages = (
      [{"role": "user", "content": text_or_messages}]
      if isinstance(text_or_messages, str)
      else normalize_messages(text_or_messages)
    )
    text = ""
    if not messages or messages[0]["role"] != "system":
      text += f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
    for m in messages:
      text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
      text += "<|im_start|>assistant\n"
    ids = _to_placeholders(self.encode(text))
    if add_im_start:
      ids.append(IM_START_ID)
    return np.asarray(ids, np.int64)

  uncond_ids = staticmethod(uncond_ids)
  cfg_dropout_ids = staticmethod(cfg_dropout_ids)
