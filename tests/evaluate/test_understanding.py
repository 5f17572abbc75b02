"""`evaluate understanding` end to end on the tiny oracle checkpoint (CPU): MCQ (circular copies with a
pointer image), Y/N and VQA files made here, a broken image, resume after an interruption, and scores
that equal a recomputation from the written `extracted` column."""

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cheers_jax.evaluate import understanding as und
from cheers_jax.evaluate.__main__ import main
from cheers_jax.evaluate.datasets import dataset_spec, read_tsv
from cheers_jax.evaluate.understanding import reference_answer_budget, run_understanding
from tests.infer.conftest import TINY

BROKEN = base64.b64encode(b"definitely not an image file, just some bytes" * 3).decode()


def _b64(seed, size=(40, 30)):
  rng = np.random.RandomState(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def _write(tmp_path, name, rows):
  path = tmp_path / f"{name}.tsv"
  pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
  return path


def _mmbench(tmp_path):
  q = dict(question="Which shape is it?", hint=float("nan"), category="coarse_perception", split="dev")
  return _write(
    tmp_path,
    "MMBench_DEV_EN_V11",
    [
      dict(index=1, image=_b64(1), A="circle", B="square", answer="A", **q),
      dict(index=1000001, image="1", A="square", B="circle", answer="B", **q),  # rotated copy, pointer image
      dict(index=2, image=_b64(2, (20, 50)), A="red", B="blue", C="green", answer="C", **q),
      dict(index=3, image=BROKEN, A="x", B="y", answer="A", **q),
    ],
  )


def test_reference_answer_budget():
  assert reference_answer_budget(1000) == 25  # sampled while prompt + answer ids <= 1024
  assert reference_answer_budget(1024) == 1 and reference_answer_budget(1025) == 0
  assert reference_answer_budget(10, cap=8) == 8


def _recompute_mcq(frame):
  ok = frame[frame["status"] == "ok"].copy()
  ok["index"] = ok["index"].astype(int)
  groups = {}
  for _, r in ok.iterrows():
    groups.setdefault(r["index"] % 1_000_000, []).append(r["extracted"] == r["answer"])
  return np.mean([all(v) for v in groups.values()])


def test_understanding_end_to_end_with_resume(tiny, tmp_path, monkeypatch):
  data = _mmbench(tmp_path)
  out = tmp_path / "out"
  calls = []
  real = und.decode_chunk

  def interrupted(decoder, chunk):
    calls.append(len(chunk))
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(decoder, chunk)

  monkeypatch.setattr(und, "decode_chunk", interrupted)
  kw = dict(batch_size=1, max_new_tokens=5, progress=False, log=lambda s: None)
  with pytest.raises(KeyboardInterrupt):
    run_understanding(*tiny, str(data), "MMBench_DEV_EN_V11", str(out), **kw)
  first = calls[0]  # 1 row, or one per device where several (the batch is rounded up to the devices)
  partial = pd.read_csv(out / "MMBench_DEV_EN_V11.tsv", sep="\t", dtype=str)
  assert list(partial["status"]).count("ok") == first and "failed" in list(partial["status"])
  assert "image" not in partial.columns

  def counted(decoder, chunk):
    calls.append(len(chunk))
    return real(decoder, chunk)

  monkeypatch.setattr(und, "decode_chunk", counted)
  calls.clear()
  scores = run_understanding(*tiny, str(data), "MMBench_DEV_EN_V11", str(out), **dict(kw, batch_size=4))
  frame = pd.read_csv(out / "MMBench_DEV_EN_V11.tsv", sep="\t", dtype=str, keep_default_na=False)
  assert list(frame["status"]) == ["ok", "ok", "ok", "failed"]
  assert "cannot decode image" in frame["error"][3]
  assert scores["n"] == 3 and scores["n_failed"] == 1
  written = json.loads((out / "MMBench_DEV_EN_V11_score.json").read_text())
  assert written == scores
  assert written["overall"] == pytest.approx(_recompute_mcq(frame))
  assert calls == [3 - first]  # only the rows the interrupted run had not answered (the broken one is retried)
  done_before = partial["index"][partial["status"] == "ok"].iloc[0]
  assert (
    frame["raw"][frame["index"] == done_before].iloc[0]
    == (partial["raw"][partial["index"] == done_before].fillna("").iloc[0])
  )

  # batch 1 and batch 4 (unequal prompt lengths padded together) give the same answers
  single = run_understanding(*tiny, str(data), "MMBench_DEV_EN_V11", str(tmp_path / "one"), **dict(kw, batch_size=1))
  again = pd.read_csv(tmp_path / "one" / "MMBench_DEV_EN_V11.tsv", sep="\t", dtype=str, keep_default_na=False)
  assert list(again["raw"]) == list(frame["raw"]) and single["overall"] == scores["overall"]


def test_yes_no_and_vqa_files(tiny, tmp_path):
  pope = _write(
    tmp_path,
    "pope",
    [
      dict(index=i, image=_b64(10 + i), question="Is there a dog in the image?", answer=a, category=c)
      for i, (a, c) in enumerate([("Yes", "adversarial"), ("No", "popular"), ("No", "random")])
    ],
  )
  kw = dict(batch_size=4, max_new_tokens=4, progress=False, log=lambda s: None)
  s = run_understanding(*tiny, str(pope), "POPE", str(tmp_path / "p"), **kw)
  frame = pd.read_csv(tmp_path / "p" / "POPE.tsv", sep="\t", dtype=str, keep_default_na=False)
  assert set(frame["extracted"]) <= {"Yes", "No", "Unknown"}
  assert s["acc"] == pytest.approx(100 * np.mean(frame["extracted"] == frame["answer"]))
  vqa = _write(
    tmp_path,
    "tv",
    [dict(index=i, image=_b64(20 + i), question="what is written?", answer=str(["stop"] * 10)) for i in range(2)],
  )
  s = run_understanding(*tiny, str(vqa), "TextVQA_VAL", str(tmp_path / "v"), **kw)
  frame = pd.read_csv(tmp_path / "v" / "TextVQA_VAL.tsv", sep="\t", dtype=str, keep_default_na=False)
  assert s["overall"] == pytest.approx(100 * np.mean(frame["extracted"] == "stop"))


def test_mmmu_interleaved_images(tiny, tokenizer, tmp_path):
  rows = [
    dict(
      index="validation_1",
      image=str([_b64(30), _b64(31, (16, 48))]),
      question="Compare <image 1> and <image 2>.",
      A="same",
      B="different",
      answer="B",
      split="validation",
    ),
    dict(
      index="dev_1", image=_b64(32), question="What is 6 times 7? <image 1>", A=float("nan"), answer="42", split="dev"
    ),
  ]
  path = _write(tmp_path, "mmmu", rows)
  data, _ = read_tsv(path)
  prepared = und.prepare_row(dataset_spec("MMMU_DEV_VAL"), data.iloc[0].to_dict(), tokenizer, tiny[0].cfg, 4)
  assert (prepared.ids == -200).sum() == 2 and len(prepared.images) == 2
  assert not np.array_equal(prepared.images[0], prepared.images[1])
  s = run_understanding(
    *tiny,
    str(path),
    "MMMU_DEV_VAL",
    str(tmp_path / "m"),
    batch_size=2,
    max_new_tokens=4,
    progress=False,
    log=lambda s: None,
  )
  frame = pd.read_csv(tmp_path / "m" / "MMMU_DEV_VAL.tsv", sep="\t", dtype=str, keep_default_na=False)
  assert list(frame["status"]) == ["ok", "ok"] and s["n"] == 2
  assert s["overall"] == float(frame["extracted"][0] == "B")  # the validation split
  assert s["splits"]["dev"]["overall"] == float(frame["extracted"][1] == "A")


def test_cli_errors(tmp_path, capsys):
  assert (
    main(["understanding", "--checkpoint", str(TINY), "--data", str(tmp_path / "none.tsv"), "--out", str(tmp_path)])
    == 2
  )
  assert "data file not found" in capsys.readouterr().err
  path = _write(tmp_path, "Unknown_Set", [dict(index=1, image=_b64(0), question="q")])
  assert main(["understanding", "--checkpoint", str(TINY), "--data", str(path), "--out", str(tmp_path)]) == 2
  assert "unknown dataset" in capsys.readouterr().err


def test_orbax_export_gives_the_checkpoints_answers(tiny, tmp_path):
  """--orbax (an export of the tiny checkpoint) loads through the inference loader and answers as the
  HF checkpoint does."""
  from cheers_jax import convert

  export = tmp_path / "orbax"
  assert convert.main(["hf-to-orbax", "--hf", str(TINY), "--out", str(export)]) == 0
  data = _mmbench(tmp_path)
  common = ["--data", str(data), "--dtype", "float32", "--limit", "2", "--max-new-tokens", "3", "--no-progress"]
  assert main(["understanding", "--orbax", str(export), "--out", str(tmp_path / "o"), *common]) == 0
  kw = dict(limit=2, max_new_tokens=3, progress=False, log=lambda s: None)
  run_understanding(*tiny, str(data), "MMBench_DEV_EN_V11", str(tmp_path / "hf"), **kw)
  got, want = (
    pd.read_csv(tmp_path / d / "MMBench_DEV_EN_V11.tsv", sep="\t", dtype=str, keep_default_na=False)
    for d in ("o", "hf")
  )
  assert list(got["status"]) == ["ok", "ok"] and list(got["raw"]) == list(want["raw"])


def test_a_bad_image_is_one_line_naming_file_and_row(tiny, tmp_path):
  path = _write(
    tmp_path,
    "SEEDBench_IMG",
    [
      dict(index=7, image=BROKEN, question="q", A="x", B="y", answer="A"),
      dict(index=8, image=_b64(60), question="q", A="x", B="y", answer="B"),
    ],
  )
  lines = []
  s = run_understanding(
    *tiny, str(path), "SEEDBench_IMG", str(tmp_path / "o"), max_new_tokens=2, progress=False, log=lines.append
  )
  bad = [line for line in lines if "index=7" in line]
  assert len(bad) == 1 and str(path) in bad[0] and "cannot decode image" in bad[0] and "\n" not in bad[0]
  assert s["n_failed"] == 1 and s["n"] == 1  # counted as failed; the other row is answered and scored
