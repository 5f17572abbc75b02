"""The grain training pipeline: batch contract, golden targets, bad data, mixing, resume, CFG dropout."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from cheers_jax.data import pipeline
from cheers_jax.data.images import preprocess_generation, preprocess_understanding
from cheers_jax.data.pipeline import PipelineSpec, PrepareExample, collate, make_train_iterator
from cheers_jax.data.sources import category_of_kinds, is_marker
from cheers_jax.errors import UserError
from cheers_jax.data.tokenizer import (
  IGNORE_INDEX,
  IM_END_ID,
  IM_START_ID,
  IMAGE_GEN_TOKEN_INDEX,
  IMAGE_TOKEN_INDEX,
  NO_MEAN_ID,
  CheersTokenizer,
)
from cheers_jax.model.cheers import UNIT_PIXEL_TABLE
from cheers_jax.model.sequence import assemble
from tests import oracle

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN = oracle.GOLDEN
TOK = CheersTokenizer()

# The conversations make_golden.py tokenized for its `train` / `train3` batches.
UND = [
  {"role": "user", "content": "<im_start><image><im_end>\nWhat is this?"},
  {"role": "assistant", "content": "A small red apple."},
]
GEN = [
  {"role": "user", "content": "An apple.\nBased on the above description, generate an image."},
  {"role": "assistant", "content": "<im_start><image_gen><im_end>"},
]
TEXT = [
  {"role": "user", "content": "Please introduce yourself briefly."},
  {"role": "assistant", "content": "I am a model."},
]


class ListSource:
  """In-memory source of raw examples."""

  def __init__(self, examples: list[dict]) -> None:
    self.examples = examples

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> dict:
    return self.examples[i]

  def categories(self) -> np.ndarray:
    return np.asarray([category_of_kinds(e.get("image_kinds", [])) for e in self.examples], np.int8)


def _image(seed: int, shape=(24, 40, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _example(i: int, kind: str, words: int = 1) -> dict:
  text = " ".join(f"w{j}" for j in range(words))
  if kind == "und":
    msgs = [
      {"role": "user", "content": f"<im_start><image><im_end>\nsample {i}"},
      {"role": "assistant", "content": text},
    ]
    return {"id": f"s{i}", "messages": msgs, "images": [_image(i)], "image_kinds": ["und"]}
  if kind == "gen":
    msgs = [
      {"role": "user", "content": f"sample {i} {text}"},
      {"role": "assistant", "content": "<im_start><image_gen><im_end>"},
    ]
    return {"id": f"s{i}", "messages": msgs, "images": [_image(i)], "image_kinds": ["gen"]}
  msgs = [{"role": "user", "content": f"sample {i}"}, {"role": "assistant", "content": text}]
  return {"id": f"s{i}", "messages": msgs, "images": [], "image_kinds": []}


def _config(batch_size: int = 4, **data: Any):
  c = tiny.get_config()
  c.train.batch_size = batch_size
  c.data.image_size = 64  # 4 tokens per image at the published patch 16 (the tests below count them)
  c.model.vision.patch_size = 16
  c.data.num_threads = 2
  for k, v in data.items():
    c.data[k] = v
  return c


def _spec(**kw: Any) -> PipelineSpec:
  base = dict(
    batch_size=4, image_size=32, seq_buckets=(64,), max_images_per_sample=2, max_seq_len=4096, cfg_data_rate=0.0, seed=0
  )
  base.update(kw)
  return PipelineSpec(**base)


def check_batch(batch: dict, spec: PipelineSpec) -> None:
  """Every promise of the batch contract."""
  b, m, n_tok, hw = spec.batch_size, spec.image_slots, spec.tokens_per_image, spec.image_size
  s = batch["token_ids"].shape[1]
  assert s in spec.seq_buckets
  want = {
    "token_ids": (np.int32, (b, s)),
    "image_index": (np.int32, (b, s)),
    "image_mask": (np.int32, (b, s)),
    "positions": (np.int32, (b, s)),
    "segment_ids": (np.int32, (b, s)),
    "targets": (np.int32, (b, s)),
    "valid": (np.bool_, (b, s)),
    "pixels": (np.uint8, (m, hw, hw, 3)),
    "t": (np.float32, (m,)),
    "image_kind": (np.int32, (m,)),
    "image_weight": (np.float32, (m,)),
    "image_positions": (np.int32, (m, n_tok)),
    "num_skipped": (np.int32, ()),
  }
  assert set(batch) == set(want)
  for k, (dtype, shape) in want.items():
    assert batch[k].dtype == dtype and batch[k].shape == shape, (k, batch[k].dtype, batch[k].shape)
  lengths = batch["valid"].sum(1)
  smaller = [x for x in spec.seq_buckets if x < s]
  assert not smaller or lengths.max() > smaller[-1]  # the smallest bucket that fits
  for row, n in enumerate(lengths):
    assert batch["valid"][row, :n].all() and not batch["valid"][row, n:].any()
  pad = ~batch["valid"]
  assert (batch["token_ids"][pad] == 0).all() and (batch["image_index"][pad] == -1).all()
  assert (batch["targets"][pad] == IGNORE_INDEX).all() and (batch["image_mask"][pad] == 0).all()
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(s), (b, s)))
  np.testing.assert_array_equal(batch["segment_ids"], batch["valid"])  # one sample per row
  per = spec.max_images_per_sample
  real = batch["image_weight"] > 0
  assert set(np.unique(batch["image_weight"]).tolist()) <= {0.0, 1.0}
  blocks = real.reshape(b, per)  # slot b*K + i: a sample's images first, then its padding
  assert (np.sort(blocks, axis=1)[:, ::-1] == blocks).all() and blocks[:, 0].all()
  pad = ~real
  assert (batch["pixels"][pad] == 0).all() and (batch["t"][pad] == 1).all() and (batch["image_kind"][pad] == 0).all()
  np.testing.assert_array_equal(
    batch["image_positions"][pad], np.repeat((np.flatnonzero(pad) // per * s)[:, None], n_tok, axis=1)
  )
  idx = batch["image_index"].reshape(-1)
  assert (idx >= 0).sum() == real.sum() * n_tok  # no reference to a padding slot
  assert set(np.unique(idx[idx >= 0] // n_tok).tolist()) == set(np.flatnonzero(real).tolist())
  for k in np.flatnonzero(real):
    pos = batch["image_positions"][k]
    assert (pos // s == k // per).all()  # the slot's image lies in its own row
    np.testing.assert_array_equal(idx[pos], k * n_tok + np.arange(n_tok))
    kind, t = batch["image_kind"][k], batch["t"][k]
    assert (t == 1.0) if kind == 1 else (0 < t < 1) if kind == 2 else (t == 0.0 and not batch["pixels"][k].any())
    mask = batch["image_mask"].reshape(-1)[pos]
    assert (mask == (1 if kind else 0)).all()
    targets = batch["targets"].reshape(-1)[pos]
    if kind:  # image tokens predict nothing
      assert (targets == IGNORE_INDEX).all()
    else:  # the prepended dummy's last position predicts the first <|im_start|>
      assert (targets[:-1] == IGNORE_INDEX).all() and targets[-1] == 151644
  assert ((batch["image_mask"] == 1) <= (batch["image_index"] >= 0)).all()


# ------------------------------------------------------------------------------------------ golden
@pytest.mark.parametrize("name, kinds", [("train", ["und", "gen"]), ("train3", ["und", "gen", "text"])])
def test_golden_batch(name: str, kinds: list[str]):
  if not GOLDEN.exists():
    pytest.skip(f"{GOLDEN} not present")
  with np.load(GOLDEN) as g:
    ids, am, labels = g[f"{name}.input_ids"], g[f"{name}.attention_mask"], g[f"{name}.labels"]
    text_labels, seq = g[f"{name}.text_labels"], g[f"{name}.hidden"].shape[1]
  n_tok = 4  # 64x64 images
  # The golden ids / labels assemble to the reference's rebuilt targets.
  lay = assemble(ids, n_tok, am, labels, seq_len=seq, check_fm_positions=True)
  np.testing.assert_array_equal(lay.targets[:, : seq - 1].reshape(-1), text_labels)

  spec = _spec(batch_size=len(kinds), image_size=64, seq_buckets=(seq, 64))
  msgs = {"und": UND, "gen": GEN, "text": TEXT}
  imgs = {"und": _image(1, (50, 30, 3)), "gen": _image(2, (30, 50, 3))}
  raws = [
    {
      "id": k,
      "messages": msgs[k],
      "images": [imgs[k]] if k != "text" else [],
      "image_kinds": [k] if k != "text" else [],
    }
    for k in kinds
  ]
  prep = PrepareExample(spec, TOK)
  samples = [prep(i, r) for i, r in enumerate(raws)]
  for row, s in enumerate(samples):  # the pipeline tokenises exactly as the reference template
    n = am[row].sum()
    np.testing.assert_array_equal(s["input_ids"], ids[row, :n])
    np.testing.assert_array_equal(s["labels"], labels[row, :n])
  batch = collate(samples, spec)
  check_batch(batch, spec)
  assert batch["token_ids"].shape == (len(kinds), seq)
  np.testing.assert_array_equal(batch["targets"][:, : seq - 1].reshape(-1), text_labels)
  assert (batch["targets"][:, seq - 1] == IGNORE_INDEX).all()

  # Hand-computed layout: each placeholder -> 4 slots; the text-only sample's dummy goes in front.
  tok_ids = np.zeros((len(kinds), seq), np.int32)
  image_index = np.full((len(kinds), seq), -1, np.int32)
  image_mask = np.zeros((len(kinds), seq), np.int32)
  positions = []
  for row, kind in enumerate(kinds):
    n = am[row].sum()
    r = ids[row, :n]
    if kind == "text":
      start, row_ids, mask = 0, np.concatenate([np.zeros(n_tok), r]), 0
    else:
      p = int(np.flatnonzero(r == (IMAGE_TOKEN_INDEX if kind == "und" else IMAGE_GEN_TOKEN_INDEX))[0])
      assert r[p - 1] == IM_START_ID and r[p + 1] == IM_END_ID
      start, row_ids, mask = p, np.concatenate([r[:p], np.zeros(n_tok), r[p + 1 :]]), 1
      # the token before <im_start> predicts it; <im_start> and the image predict nothing
      assert batch["targets"][row, p - 2] == IM_START_ID
      assert (batch["targets"][row, p - 1 : p + n_tok] == IGNORE_INDEX).all()
    tok_ids[row, : len(row_ids)] = row_ids
    image_index[row, start : start + n_tok] = 2 * row * n_tok + np.arange(n_tok)  # slot 2*row (K = 2)
    image_mask[row, start : start + n_tok] = mask
    positions += [row * seq + start + np.arange(n_tok), np.full(n_tok, row * seq)]  # image, padding slot
    assert batch["valid"][row].sum() == len(row_ids)
  np.testing.assert_array_equal(batch["token_ids"], tok_ids)
  np.testing.assert_array_equal(batch["image_index"], image_index)
  np.testing.assert_array_equal(batch["image_mask"], image_mask)
  np.testing.assert_array_equal(batch["image_positions"], np.stack(positions))
  kind_code = {"und": 1, "gen": 2, "text": 0}
  np.testing.assert_array_equal(batch["image_kind"], [c for k in kinds for c in (kind_code[k], 0)])
  np.testing.assert_array_equal(batch["image_weight"], [1.0, 0.0] * len(kinds))
  # uint8, divided by 255 on the device: the processor's pixels exactly
  np.testing.assert_array_equal(
    UNIT_PIXEL_TABLE[batch["pixels"][0]], preprocess_understanding(imgs["und"], 64).pixel_values.transpose(1, 2, 0)
  )
  np.testing.assert_array_equal(
    UNIT_PIXEL_TABLE[batch["pixels"][2]], preprocess_generation(imgs["gen"], 64).pixel_values.transpose(1, 2, 0)
  )
  assert not batch["pixels"][1::2].any() and (batch["t"][1::2] == 1).all()
  assert batch["t"][0] == 1.0 and 1e-6 <= batch["t"][2] <= 1 - 1e-6
  if "text" in kinds:
    assert batch["t"][4] == 0.0 and not batch["pixels"][4].any()


def test_per_sample_rng_is_deterministic():
  prep = PrepareExample(_spec(cfg_data_rate=0.5), TOK)
  raw = _example(0, "gen")
  a, b, c = prep(7, raw), prep(7, raw), prep(8, raw)
  assert a["t"] == b["t"] and np.array_equal(a["input_ids"], b["input_ids"])
  assert a["t"] != c["t"]
  assert PrepareExample(_spec(seed=1), TOK)(7, raw)["t"] != a["t"]


# ---------------------------------------------------------------------------------- JSONL, bad data
def _write_jsonl(tmp_path: Path) -> tuple[Path, dict]:
  def save(name, shape, seed):
    arr = _image(seed, shape)
    Image.fromarray(arr).save(tmp_path / name)
    return arr

  arrays = {
    "und": save("und.png", (30, 40, 3), 1),
    "gen": save("gen.png", (70, 50, 3), 2),
    "src": save("src.png", (64, 64, 3), 3),
    "tgt": save("tgt.png", (80, 64, 3), 4),
  }
  good = (tmp_path / "und.png").read_bytes()
  (tmp_path / "corrupt.png").write_bytes(good[: len(good) // 2])  # truncated PNG

  def conv(human, gpt):
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]

  und_conv = conv("<im_start><image><im_end>\nWhat is this?", "A small red apple.")
  lines = [
    {"id": "und1", "image": "und.png", "conversations": und_conv},
    {"id": "gen1", "image": "gen.png", "conversations": conv("An apple.", "<im_start><image_gen><im_end>")},
    {"id": "text1", "conversations": conv("Please introduce yourself briefly.", "I am a model.")},
    {
      "id": "edit1",
      "image": "src.png, tgt.png",
      "conversations": conv("<im_start><image><im_end>\nRemove the apple.", "<im_start><image_gen><im_end>"),
    },
    '{"id": "broken1", "conversations": [{"from": "human", "value": "hi"',
    {"id": "missing1", "image": "nope.png", "conversations": und_conv},
    {"id": "corrupt1", "image": "corrupt.png", "conversations": und_conv},
    {"id": "long1", "conversations": conv("Tell me a story.", " ".join(["once upon a time"] * 60))},
    {"id": "mismatch1", "image": "und.png, gen.png", "conversations": und_conv},
  ]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  bad = {
    "broken1": "malformed",
    "missing1": "bad_image",
    "corrupt1": "bad_image",
    "long1": "too_long",
    "mismatch1": "malformed",
  }
  return path, {"arrays": arrays, "bad": bad}


def _jsonl_config(path: Path, **kw: Any):
  data = dict(
    source="jsonl",
    jsonl_path=str(path),
    image_root="",
    seq_buckets=(64, 128),
    max_images_per_sample=2,
    mix={"und": 1.0, "gen": 1.0, "text": 1.0},
    cfg_data_rate=0.0,
    shuffle=False,
  )
  data.update(kw)
  return _config(batch_size=4, **data)


def test_jsonl_batches_and_skips(tmp_path: Path, caplog):
  path, info = _write_jsonl(tmp_path)
  config = _jsonl_config(path)
  spec = pipeline.spec_from_config(config)
  it = make_train_iterator(config)
  with caplog.at_level(logging.WARNING, logger="cheers_jax.data.pipeline"):
    batches = [next(it) for _ in range(4)]
  for batch in batches:
    check_batch(batch, spec)
  skips = list(it.recent_skips)
  assert {sid: reason for sid, reason, _ in skips} == info["bad"]  # every bad sample, with its reason
  assert sum(it.skipped.values()) == len(skips) == int(batches[-1]["num_skipped"]) > 0
  assert it.skipped["bad_image"] == sum(r == "bad_image" for _, r, _ in skips)
  assert [int(b["num_skipped"]) for b in batches] == sorted(int(b["num_skipped"]) for b in batches)
  lines = [r.getMessage() for r in caplog.records if r.name == "cheers_jax.data.pipeline"]
  assert len(lines) == len(skips)  # one line per skip, naming the id and the reason
  for (sid, reason, _), line in zip(skips, lines):
    assert sid in line and reason in line

  # The editing sample: source image understood, target generated, both preprocessed right.
  n_tok, arrays = spec.tokens_per_image, info["arrays"]
  found = 0
  for batch in batches:
    for row in range(spec.batch_size):
      text = TOK.decode(batch["token_ids"][row][batch["valid"][row]])
      slots = np.unique(batch["image_index"][row][batch["image_index"][row] >= 0] // n_tok)
      kinds = batch["image_kind"][slots].tolist()
      if "Remove the apple" in text:
        found += 1
        assert kinds == [1, 2]
        np.testing.assert_array_equal(
          UNIT_PIXEL_TABLE[batch["pixels"][slots[0]]],
          preprocess_understanding(arrays["src"], 64).pixel_values.transpose(1, 2, 0),
        )
        np.testing.assert_array_equal(
          UNIT_PIXEL_TABLE[batch["pixels"][slots[1]]],
          preprocess_generation(arrays["tgt"], 64).pixel_values.transpose(1, 2, 0),
        )
      elif "introduce yourself" in text:
        assert kinds == [0] and batch["t"][slots[0]] == 0.0
      elif "What is this" in text:
        assert kinds == [1]
        np.testing.assert_array_equal(
          UNIT_PIXEL_TABLE[batch["pixels"][slots[0]]],
          preprocess_understanding(arrays["und"], 64).pixel_values.transpose(1, 2, 0),
        )
      else:
        assert "An apple." in text and kinds == [2]
        np.testing.assert_array_equal(
          UNIT_PIXEL_TABLE[batch["pixels"][slots[0]]],
          preprocess_generation(arrays["gen"], 64).pixel_values.transpose(1, 2, 0),
        )
  assert found >= 2


def test_truncation_and_over_long():
  spec = _spec(batch_size=1, max_seq_len=40, seq_buckets=(48, 64))
  prep = PrepareExample(spec, TOK)
  early = _example(0, "und", words=60)  # image near the start: truncated like the reference, kept
  s = prep(0, early)
  assert "skip" not in s and s["length"] == 40
  batch = collate([s], spec)
  check_batch(batch, spec)
  assert batch["valid"].sum() == 40 and batch["token_ids"].shape == (1, 48)
  assert batch["targets"][0, 39] == IGNORE_INDEX  # the last kept token has nothing to predict
  late = _example(1, "gen", words=60)  # image after the cut
  assert prep(1, late)["skip"] == "too_long" and "cut" in prep(1, late)["message"]
  long_spec = _spec(batch_size=1, seq_buckets=(48,))
  r = PrepareExample(long_spec, TOK)(0, _example(2, "text", words=60))
  assert r["skip"] == "too_long" and "bucket" in r["message"]
  two = dict(_example(3, "und"), images=[_image(0), _image(1)], image_kinds=["und", "gen"])
  two["messages"] = [
    {"role": "user", "content": "<im_start><image><im_end> edit"},
    {"role": "assistant", "content": "<im_start><image_gen><im_end>"},
  ]
  assert PrepareExample(_spec(max_images_per_sample=1), TOK)(0, two)["skip"] == "too_many_images"
  # labels that do not mark the image with an <im_start> label: the FM positions would be wrong
  bad = _example(4, "und")
  bad["messages"] = [{"role": "user", "content": "<image> what?"}, {"role": "assistant", "content": "x"}]
  assert prep(0, bad)["skip"] == "bad_sequence"
  bad_array = dict(_example(5, "und"), images=[np.zeros((4, 4), np.float32)])
  assert prep(0, bad_array)["skip"] == "bad_image"
  assert is_marker({"id": "x", "error": "e"}) and prep(0, {"id": "x", "error": "e"})["skip"] == "malformed"


# ------------------------------------------------------------------------- shapes, mix, processes
def test_static_bucket_shapes():
  examples = [_example(i, ("und", "gen", "text")[i % 3], words=(1, 4, 15, 40, 60)[i % 5]) for i in range(60)]
  config = _config(
    batch_size=4,
    image_size=32,
    seq_buckets=(64, 128, 256),
    max_images_per_sample=1,
    mix={"und": 1.0, "gen": 1.0, "text": 1.0},
  )
  spec = pipeline.spec_from_config(config)
  it = make_train_iterator(config, source=ListSource(examples))
  seen = set()
  for _ in range(12):
    batch = next(it)
    check_batch(batch, spec)
    seen.add(batch["token_ids"].shape)
  assert seen <= {(4, 64), (4, 128), (4, 256)} and len(seen) >= 2


def test_mix_ratios():
  # pools of >= 1000: grain's index shuffle is slow on tiny domains
  examples = [_example(i, ("und", "gen", "text")[i % 3]) for i in range(3072)]
  config = _config(
    batch_size=16, image_size=32, seq_buckets=(64,), max_images_per_sample=1, mix={"und": 3.0, "gen": 6.0, "text": 1.0}
  )
  it = make_train_iterator(config, source=ListSource(examples))
  counts = np.zeros(3)
  for _ in range(64):  # 1024 samples: one shuffle window, in which the ratios are exact
    batch = next(it)
    slot = batch["image_index"].max(axis=1)  # N = 1: each row's only image slot
    counts += np.bincount(batch["image_kind"][slot], minlength=3)
  frac = counts / counts.sum()  # kinds 0 text, 1 und, 2 gen
  np.testing.assert_allclose(frac, [0.1, 0.3, 0.6], atol=0.01)


def test_first_phase_then_the_mix_and_resume_across_the_boundary():
  examples = [_example(i, ("und", "gen", "text")[i % 3]) for i in range(3072)]
  config = _config(
    batch_size=16,
    image_size=32,
    seq_buckets=(64,),
    max_images_per_sample=1,
    mix={"und": 3.0, "gen": 6.0, "text": 1.0},
    first_samples=64,
    first_mix={"und": 0.0, "gen": 1.0, "text": 0.0},
  )
  it = make_train_iterator(config, source=ListSource(examples))
  kinds = lambda batch: np.bincount(batch["image_kind"][batch["image_index"].max(axis=1)], minlength=3)
  for _ in range(3):
    assert kinds(next(it)).tolist() == [0, 0, 16]  # generation only (kinds 0 text, 1 und, 2 gen)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  assert kinds(want[0]).tolist() == [0, 0, 16]
  counts = kinds(want[1]) + sum(kinds(next(it)) for _ in range(63))  # the next 1024 samples: one mix window
  np.testing.assert_allclose(counts / counts.sum(), [0.1, 0.3, 0.6], atol=0.01)
  resumed = make_train_iterator(config, source=ListSource(examples))
  resumed.set_state(state)
  for w in want:
    g = next(resumed)
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_tokens_per_image_follow_the_patch_size():
  config = _config(batch_size=2, image_size=32, seq_buckets=(96,), max_images_per_sample=1)
  assert pipeline.spec_from_config(config).tokens_per_image == 1  # 32 px, patch 16: 2x2 patches, one token
  config.model.vision = dict(config.model.vision, patch_size=8)
  spec = pipeline.spec_from_config(config)
  assert spec.tokens_per_image == 4
  batch = next(make_train_iterator(config))
  assert batch["image_positions"].shape == (2, 4) and batch["pixels"].shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match="multiple of 16"):
    _spec(image_size=40, patch_size=8)


def test_processes_get_disjoint_halves():
  examples = [_example(i, "text") for i in range(64)]
  config = _config(batch_size=8, image_size=32, seq_buckets=(64,), mix={"und": 1.0, "gen": 1.0, "text": 1.0})
  texts = []
  for p in range(2):
    it = make_train_iterator(config, process_index=p, process_count=2, source=ListSource(examples))
    seen = set()
    for _ in range(3):
      batch = next(it)
      assert batch["token_ids"].shape[0] == 4
      for row in range(4):
        seen.add(TOK.decode(batch["token_ids"][row][batch["valid"][row] & (batch["image_index"][row] < 0)]))
    texts.append(seen)
  assert len(texts[0]) == len(texts[1]) == 12 and not texts[0] & texts[1]


# ------------------------------------------------------------------------------ checkpoint / resume
def test_grain_checkpoint_handler_round_trip(tmp_path: Path):
  import grain
  from etils import epath

  config = _config(batch_size=4)
  it = make_train_iterator(config)
  next(it)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  want = next(it)
  resumed = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=make_train_iterator(config))
  got = next(resumed)
  for k in want:
    np.testing.assert_array_equal(want[k], got[k], err_msg=k)


def test_resume_continues_at_next_batch(tmp_path: Path):
  path, _ = _write_jsonl(tmp_path)
  config = _jsonl_config(path, shuffle=True, cfg_data_rate=0.5)
  it = make_train_iterator(config)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  want = [next(it) for _ in range(2)]
  resumed = make_train_iterator(config)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(2)]
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)
  assert resumed.skipped == it.skipped and int(got[-1]["num_skipped"]) > 0
  first = next(make_train_iterator(config))  # a fresh iterator starts elsewhere: the state did matter
  assert not (np.array_equal(first["token_ids"], want[0]["token_ids"]) and np.array_equal(first["t"], want[0]["t"]))


# ----------------------------------------------------------------------------------- CFG dropout
def test_cfg_dropout_rate_and_content():
  spec = _spec(cfg_data_rate=0.2)
  prep = PrepareExample(spec, TOK)
  gen, und, text = _example(0, "gen"), _example(1, "und"), _example(2, "text")
  clean = PrepareExample(_spec(cfg_data_rate=0.0), TOK)(0, gen)
  n = 2000
  dropped = 0
  for i in range(n):
    s = prep(i, gen)
    if s["cfg_dropped"]:
      dropped += 1
      ids = s["input_ids"]
      keep = np.isin(ids, [IMAGE_GEN_TOKEN_INDEX, IMAGE_TOKEN_INDEX, IM_START_ID, IM_END_ID])
      assert (ids[~keep] == NO_MEAN_ID).all() and keep.sum() == 3
      np.testing.assert_array_equal(s["labels"], clean["labels"])  # labels unchanged
    else:
      np.testing.assert_array_equal(s["input_ids"], clean["input_ids"])
  assert abs(dropped / n - 0.2) < 0.03
  assert not any(prep(i, und)["cfg_dropped"] or prep(i, text)["cfg_dropped"] for i in range(300))


def test_cfg_dropout_in_batches():
  examples = [_example(i, ("und", "gen")[i % 2]) for i in range(2048)]
  config = _config(
    batch_size=16,
    image_size=32,
    seq_buckets=(64,),
    max_images_per_sample=1,
    cfg_data_rate=0.2,
    mix={"und": 1.0, "gen": 1.0, "text": 0.0},
  )
  it = make_train_iterator(config, source=ListSource(examples))
  rows = {1: [0, 0], 2: [0, 0]}  # image kind -> [dropped, total]
  for _ in range(20):
    batch = next(it)
    for row in range(16):
      kind = batch["image_kind"][batch["image_index"][row].max()]
      text = batch["token_ids"][row][batch["valid"][row] & (batch["image_index"][row] < 0)]
      rows[kind][0] += int(np.all(np.isin(text, [NO_MEAN_ID, IM_START_ID, IM_END_ID])))
      rows[kind][1] += 1
  assert rows[1][0] == 0 and rows[1][1] > 100
  assert abs(rows[2][0] / rows[2][1] - 0.2) < 0.06


def _bad_lines_jsonl(tmp_path: Path, mix_text: bool = False) -> tuple[Path, dict[str, str]]:
  """Good und/gen lines mixed with every kind of bad line the byte test used to class as text."""
  Image.fromarray(_image(5, (40, 40, 3))).save(tmp_path / "ok.png")
  conv = lambda h, g: [{"from": "human", "value": h}, {"from": "gpt", "value": g}]
  und = conv("<im_start><image><im_end>", "A square.")  # 30 tokens with the image's 4: fits a 32 bucket
  gen = conv("A square.", "<im_start><image_gen><im_end>")
  good = [json.dumps({"id": f"und{i}", "image": "ok.png", "conversations": und}) for i in range(3)] + [
    json.dumps({"id": f"gen{i}", "image": "ok.png", "conversations": gen}) for i in range(3)
  ]
  bad = {
    "noconv": json.dumps({"id": "noconv", "image": "ok.png", "turns": und}),  # no `conversations`
    "noplaceholder": json.dumps(
      {
        "id": "noplaceholder",
        "image": "ok.png",  # image, no placeholder
        "conversations": conv("What is this?", "A square."),
      }
    ),
    "cut": json.dumps({"id": "cut", "image": "ok.png", "conversations": und})[:40],  # cut off mid-way
    "empty": json.dumps({"id": "empty", "conversations": []}),
    "latin1": '{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}',
  }
  lines = good[:3] + list(bad.values())[:3] + good[3:] + list(bad.values())[3:]
  if mix_text:
    lines.append(json.dumps({"id": "text0", "conversations": conv("Hi.", "Hello.")}))
  path = tmp_path / "mixed.jsonl"
  with open(path, "wb") as f:
    for line in lines:
      f.write((line.encode("latin-1") if "latin1" in line else line.encode()) + b"\n")
  return path, bad


def test_every_bad_jsonl_line_is_named_and_counted_whatever_the_mix(tmp_path: Path, caplog):
  """Issue 13 item 3: lines are classed by their parsed content, so with data.mix.text=0 (configs/tiny.py)
  a line without `conversations`, with an image but no placeholder, cut off, empty or not UTF-8 is still
  read, named once (id, line number) and counted as 'malformed', not silently dropped."""
  path, bad = _bad_lines_jsonl(tmp_path, mix_text=True)
  config = _jsonl_config(path, mix={"und": 1.0, "gen": 1.0, "text": 0.0}, seq_buckets=(64,), max_images_per_sample=1)
  with caplog.at_level(logging.WARNING, logger="cheers_jax.data.pipeline"):
    it = make_train_iterator(config)
    batches = [next(it) for _ in range(3)]
  skipped = {sid: message for sid, reason, message in it.recent_skips if reason == "malformed"}
  assert set(skipped) == set(bad) and it.skipped["malformed"] == len(bad)  # each once, never re-drawn
  assert int(batches[-1]["num_skipped"]) == it.num_skipped == len(bad)
  assert "line 5 of" in skipped["noplaceholder"] and "0 image placeholders" in skipped["noplaceholder"]
  assert "conversations" in skipped["noconv"] and "malformed JSON" in skipped["cut"]
  text = caplog.text
  assert all(sid in text for sid in bad) and "1 'text' samples" in text and "data.mix.text=0" in text
  # resuming restores the count without counting the lines again
  again = make_train_iterator(config)
  again.set_state(it.get_state())
  next(again)
  assert again.skipped["malformed"] == len(bad)


@pytest.mark.parametrize(
  "content, wanted",
  [
    ("", "0 und, 0 gen, 0 text"),
    ('{"id": "t", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Yo."}]}\n', "1 text"),
    ('{"id": "cut", "conv\n{"nope": 1}\n', "2 unusable"),
  ],
)
def test_a_file_with_no_usable_line_of_the_wanted_kinds_says_so(tmp_path: Path, content: str, wanted: str):
  path = tmp_path / "data.jsonl"
  path.write_text(content)
  config = _jsonl_config(path, mix={"und": 3.0, "gen": 1.0, "text": 0.0})
  with pytest.raises(UserError, match="no usable sample of the kinds data.mix draws") as info:
    make_train_iterator(config)
  assert str(path) in str(info.value) and wanted in str(info.value)


def test_unreadable_paths_and_all_bad_data_are_user_errors(tmp_path: Path):
  """Probes beyond issue 13's list: a JSONL path that is a symlink loop (or empty), and an image root that
  is one (every image unreadable), are one-line user errors, not tracebacks."""
  import os

  os.symlink("loop", tmp_path / "loop")
  with pytest.raises(UserError, match="cannot read the JSONL file .*loop.*symbolic links"):
    make_train_iterator(_jsonl_config(tmp_path / "loop"))
  config = _jsonl_config(tmp_path / "loop")
  config.data.jsonl_path = ""
  with pytest.raises(UserError, match="data.jsonl_path is empty"):
    make_train_iterator(config)
  conv = [{"from": "human", "value": "<im_start><image><im_end>"}, {"from": "gpt", "value": "A square."}]
  path = tmp_path / "d.jsonl"
  path.write_text(
    "".join(json.dumps({"id": f"s{i}", "image": "x.png", "conversations": conv}) + "\n" for i in range(3))
  )
  it = make_train_iterator(_jsonl_config(path, image_root=str(tmp_path / "loop")))
  with pytest.raises(UserError, match=r"consecutive samples were skipped .*bad_image.*symbolic links"):
    next(it)
