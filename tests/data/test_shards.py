"""Prepared shards (cheers_jax.data.prepare / shards / ShardSource) and several sources by weight."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from cheers_jax.bench.data import write_dataset
from cheers_jax.data import prepare as prepare_lib
from cheers_jax.data import shards as shards_lib
from cheers_jax.data import sources as sources_lib
from cheers_jax.data.images import load_image
from cheers_jax.data.pipeline import PrepareExample, make_train_iterator, spec_from_config
from cheers_jax.errors import ConfigError, UserError
from tests.data.stream_worker import config as _config

QUIET = dict(log=lambda *a: None)


def _prepare(jsonl: Path | str, out: Path, **kw) -> dict:
  root = kw.pop("image_root", Path(jsonl).parent / "images")  # where write_dataset puts them
  return prepare_lib.prepare([str(jsonl)], [str(root)], str(out), **{"records_per_shard": 16, **kw}, **QUIET)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
  """40 official-format records (understanding, generation, editing, text in turn), JPEGs of several sizes,
  as a JSONL and as prepared shards."""
  folder = tmp_path_factory.mktemp("data")
  jsonl = Path(write_dataset(str(folder), 40, image_sizes=((64, 48), (100, 160), (200, 120))))
  _prepare(jsonl, folder / "shards", image_root=folder / "images")
  return jsonl, folder / "shards"


def _equal_batches(a, b, steps: int) -> None:
  for _ in range(steps):
    x, y = next(a), next(b)
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -------------------------------------------------------------------------------- format parity
def test_every_official_record_kind_gives_the_same_tokens_and_pixels_from_jsonl_and_shards(dataset):
  """The three records of the official Training/data/format.jsonl (understanding, generation, editing
  with 'src, tgt' images) and a text-only one, as our own records in that format: sample by sample and
  batch by batch, the JSONL source and the prepared shards give identical arrays."""
  jsonl, shards = dataset
  from_jsonl = sources_lib.JsonlSource(jsonl, jsonl.parent / "images")
  from_shards = sources_lib.ShardSource(str(shards))
  assert len(from_jsonl) == len(from_shards) == 40
  np.testing.assert_array_equal(from_jsonl.categories(), from_shards.categories())
  prep = PrepareExample(spec_from_config(_config(cfg_data_rate=0.5)))
  kinds = set()
  for i in range(12):
    a, b = from_jsonl[i], from_shards[i]
    assert a["id"] == b["id"] and a["messages"] == b["messages"] and a["image_kinds"] == b["image_kinds"]
    kinds.add(tuple(a["image_kinds"]))
    x, y = prep(i, a), prep(i, b)
    assert "skip" not in x and x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert kinds == {("und",), ("gen",), ("und", "gen"), ()}  # und, gen, editing, text
  # the token lengths of the index are the tokenizer's
  np.testing.assert_array_equal(
    from_shards.lengths()[:4], [len(prep.tokenizer.build_conversation(from_jsonl[i]["messages"])[0]) for i in range(4)]
  )
  config = dict(cfg_data_rate=0.2, shuffle=True)
  as_jsonl = _config(source="jsonl", jsonl_path=str(jsonl), image_root=str(jsonl.parent / "images"), **config)
  _equal_batches(make_train_iterator(as_jsonl), make_train_iterator(_config(sources=(str(shards),), **config)), 4)


# ------------------------------------------------------------------------------------- prepare
def _bad_jsonl(folder: Path) -> tuple[Path, dict[str, str]]:
  jsonl = Path(write_dataset(str(folder), 8, image_sizes=((64, 48),)))
  images = jsonl.parent / "images"
  (images / "text.jpg").write_text("not an image")
  good = (images / "0000000.jpg").read_bytes()
  (images / "cut.jpg").write_bytes(good[: len(good) // 2])  # header fine, data cut: a skip at training
  conv = [{"from": "human", "value": "<im_start><image><im_end>\nWhat?"}, {"from": "gpt", "value": "It."}]
  bad = {"missing": "bad_image", "notimage": "bad_image", "noconv": "malformed", "cut-line": "malformed"}
  with open(jsonl, "a") as f:
    f.write(json.dumps({"id": "missing", "image": "nope.jpg", "conversations": conv}) + "\n\n")
    f.write(json.dumps({"id": "notimage", "image": "text.jpg", "conversations": conv}) + "\n")
    f.write(json.dumps({"id": "noconv", "image": "0000000.jpg"}) + "\n")
    f.write(json.dumps({"id": "cutimage", "image": "cut.jpg", "conversations": conv}) + "\n")
    f.write('{"id": "cut-line", "conversations": [{"from": "hu\n')
  return jsonl, bad


def test_prepare_names_and_counts_every_bad_line_and_image_and_never_stops(tmp_path: Path, caplog):
  jsonl, bad = _bad_jsonl(tmp_path)
  summary = _prepare(jsonl, tmp_path / "shards", image_root=jsonl.parent / "images", records_per_shard=5)
  s = summary["inputs"][str(jsonl)]
  assert (s["records"], s["written"], s["left_out"]) == (13, 9, {"bad_image": 2, "malformed": 2})
  lines = (tmp_path / "shards" / "report-task00000-of-00001.jsonl").read_text().splitlines()
  assert json.loads(lines[0])["summary"]["inputs"][str(jsonl)] == s
  named = {json.loads(line)["id"]: json.loads(line) for line in lines[1:]}
  assert {k: v["reason"] for k, v in named.items()} == bad
  assert named["missing"]["line"] == 9 and named["notimage"]["line"] == 11  # file lines, the blank one counted
  assert "nope.jpg" in named["missing"]["error"] and "not an image" in named["notimage"]["error"]
  # training on the shards: the left-out records named and counted once; the cut image a counted skip
  config = _config(sources=(str(tmp_path / "shards"),), mix={"und": 1.0, "gen": 1.0, "text": 1.0}, shuffle=False)
  with caplog.at_level(logging.WARNING, logger="cheers_jax.data.pipeline"):
    it = make_train_iterator(config)
    for _ in range(3):
      next(it)
  assert it.skipped["malformed"] == 4 and it.skipped["bad_image"] >= 1
  assert all(sid in caplog.text for sid in bad) and "cutimage" in caplog.text


def test_tasks_write_disjoint_shards_and_a_rerun_finishes_only_what_is_missing(tmp_path: Path):
  jsonl = Path(write_dataset(str(tmp_path), 50, image_sizes=((32, 32),), num_images=3))
  out = tmp_path / "shards"
  for task in range(3):  # task 0 with 2 local processes
    _prepare(jsonl, out, records_per_shard=8, task_index=task, num_tasks=3, processes=2 if task == 0 else 1)
  names = sorted(p.name for p in out.glob("*.arrayrecord"))
  assert names == [shards_lib.shard_name("data", k, 7) for k in range(7)]
  reports = [
    json.loads((out / f"report-task{t:05d}-of-00003.jsonl").read_text().splitlines()[0])["summary"] for t in range(3)
  ]
  assert [r["inputs"][str(jsonl)]["shards"] for r in reports] == [3, 2, 2]
  assert sum(r["inputs"][str(jsonl)]["written"] for r in reports) == 50
  whole = sources_lib.ShardSource(str(out))
  assert [whole[i]["id"] for i in range(50)] == [sources_lib.JsonlSource(jsonl)[i]["id"] for i in range(50)]
  # an interrupted run: one shard's index never written, a temporary file left behind
  victim = out / shards_lib.shard_name("data", 4, 7)
  os.remove(shards_lib.index_path(str(victim)))
  (out / (victim.name + ".tmp123")).write_bytes(b"partial")
  before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.index.npz")}
  summary = _prepare(jsonl, out, records_per_shard=8, processes=1)
  assert summary["inputs"][str(jsonl)]["resumed"] == 6 and summary["inputs"][str(jsonl)]["written"] == 50
  assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())  # finished shards kept
  assert not list(out.glob("*.tmp*"))
  again = sources_lib.ShardSource(str(out))
  assert [again[i]["id"] for i in range(50)] == [whole[i]["id"] for i in range(50)]
  with pytest.raises(UserError, match="other inputs or settings"):  # same folder, other settings: refused
    _prepare(jsonl, out, records_per_shard=8, max_side=16)


def test_max_side_reencodes_only_what_training_would_shrink_and_says_so(tmp_path: Path):
  jsonl = Path(
    write_dataset(str(tmp_path), 4, kinds=("und", "gen"), image_sizes=((120, 80), (120, 80), (40, 30), (40, 30)))
  )
  said = []
  summary = prepare_lib.prepare(
    [str(jsonl)], [str(tmp_path / "images")], str(tmp_path / "s"), max_side=64, log=said.append
  )
  assert summary["inputs"][str(jsonl)]["reencoded"] == 2 and "--max-side 64" in said[0]
  source = sources_lib.ShardSource(str(tmp_path / "s"))
  sizes = [load_image(source[i]["images"][0]).size for i in range(4)]
  assert sizes == [(64, 43), (96, 64), (40, 30), (40, 30)]  # und: long side 64; gen: short side 64
  assert source[2]["images"][0] == (tmp_path / "images" / "0000002.jpg").read_bytes()  # small: copied


def test_inspect_and_the_cli(tmp_path: Path, dataset, capsys):
  jsonl, shards = dataset
  assert prepare_lib.main(["inspect", str(shards), "--samples", "2"]) == 0
  out = capsys.readouterr().out
  assert "40 records (und 10, gen 20, text 10)" in out and out.count("\nrecord ") == 2 and "64x48" in out
  assert (
    prepare_lib.main(
      [
        "prepare",
        "--input",
        str(jsonl),
        "--image-root",
        "a",
        "--image-root",
        "b",
        "--input",
        str(jsonl),
        "--input",
        str(jsonl),
        "--output",
        str(tmp_path),
      ]
    )
    == 2
  )
  assert "--image-root" in capsys.readouterr().err
  assert prepare_lib.main(["inspect", str(tmp_path / "nothing*")]) == 2
  assert "nothing*" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bad input
def _copy_shards(shards: Path, to: Path) -> Path:
  to.mkdir()
  for p in shards.iterdir():
    (to / p.name).write_bytes(p.read_bytes())
  return to


def test_a_truncated_shard_is_refused_naming_it(dataset, tmp_path: Path):
  _, shards = dataset
  copy = _copy_shards(shards, tmp_path / "c")
  victim = copy / shards_lib.shard_name("data", 1, 3)
  victim.write_bytes(victim.read_bytes()[:-100])
  with pytest.raises(shards_lib.ShardError, match=f"{victim}.*truncated"):
    make_train_iterator(_config(sources=(str(copy),)))


def test_a_corrupt_record_is_an_error_naming_the_shard_and_the_record(dataset, tmp_path: Path):
  _, shards = dataset
  copy = _copy_shards(shards, tmp_path / "c")
  source = sources_lib.ShardSource(str(copy))
  victim, number = source.locate(20)
  data = bytearray(Path(victim).read_bytes())
  record = shards_lib.encode_record(
    sources_lib.ShardSource(str(shards))[20] | {"images": []}, sources_lib.ShardSource(str(shards))[20]["images"]
  )
  at = bytes(data).find(record[-64:])  # the end of record 20's last image
  assert at > 0
  data[at + 10] ^= 0xFF
  Path(victim).write_bytes(bytes(data))
  with pytest.raises(shards_lib.ShardError, match=f"shard {victim}, record {number}: cannot be read .*corrupt"):
    source[20]
  it = make_train_iterator(_config(sources=(str(copy),), mix={"und": 1.0, "gen": 1.0, "text": 1.0}, shuffle=False))
  with pytest.raises(shards_lib.ShardError, match=f"record {number}"):
    for _ in range(15):
      next(it)


def test_another_format_version_is_refused_with_how_to_reprepare(dataset, tmp_path: Path):
  _, shards = dataset
  copy = _copy_shards(shards, tmp_path / "c")
  index = copy / os.path.basename(shards_lib.index_path(shards_lib.shard_name("data", 0, 3)))
  with np.load(index) as z:
    arrays = dict(z)
  meta = json.loads(str(arrays["meta"]))
  arrays["meta"] = np.asarray(json.dumps({**meta, "format_version": 0}))
  np.savez(index, **arrays)
  with pytest.raises(shards_lib.ShardError, match="format version 0.*re-prepare.*cheers_jax.data.prepare"):
    sources_lib.ShardSource(str(copy))
  os.remove(index)
  with pytest.raises(shards_lib.ShardError, match="no index.*did not finish"):
    sources_lib.ShardSource(str(copy))


@pytest.mark.parametrize("pattern", ["nowhere/*.arrayrecord", "nowhere/*.jsonl", "nowhere"])
def test_a_path_or_glob_that_matches_nothing_names_it(tmp_path: Path, pattern: str):
  path = str(tmp_path / pattern)
  with pytest.raises(UserError, match=path.replace("*", r"\*")):
    make_train_iterator(_config(sources=(path,)))


# ------------------------------------------------------------------------------ several sources
def test_sources_mix_by_weight_within_each_kind_with_the_kind_mix_on_top(tmp_path: Path):
  """A JSONL of text records (weight 1) and shards of text + generation records numbered from 10000 (weight
  3): data.mix sets text : gen = 1 : 1, and within the text samples the sources come 1 : 3."""
  a = write_dataset(str(tmp_path / "a"), 1200, kinds=("text",))
  b = write_dataset(
    str(tmp_path / "b"), 2400, kinds=("text", "gen"), num_images=2, image_sizes=((32, 32),), start=10000
  )
  _prepare(b, tmp_path / "b" / "shards", records_per_shard=1000)
  config = _config(
    batch_size=16,
    image_size=32,
    seq_buckets=(64,),
    max_images_per_sample=1,
    mix={"und": 0.0, "gen": 1.0, "text": 1.0},
    sources=({"path": a, "weight": 1.0}, {"path": str(tmp_path / "b" / "shards"), "weight": 3.0}),
  )
  it = make_train_iterator(config)
  tok = PrepareExample(spec_from_config(config)).tokenizer
  kinds, from_b, texts = np.zeros(3), 0, 0
  for _ in range(64):  # 1024 samples: one shuffle window, in which the kind ratios are exact
    batch = next(it)
    slot = batch["image_index"].max(axis=1)
    kinds += np.bincount(batch["image_kind"][slot], minlength=3)
    for row in np.flatnonzero(batch["image_kind"][slot] == 0):
      text = tok.decode(batch["token_ids"][row][batch["valid"][row] & (batch["image_index"][row] < 0)])
      texts += 1
      from_b += int(text.split("about the number ")[1].split(".")[0]) >= 10000
  np.testing.assert_allclose(kinds / kinds.sum(), [0.5, 0.0, 0.5], atol=0.02)  # text, und, gen
  assert abs(from_b / texts - 0.75) < 0.05, (from_b, texts)


def test_source_entries_are_checked(tmp_path: Path):
  with pytest.raises(ConfigError, match=r"data.sources\[0\].wieght.*did you mean 'weight'"):
    sources_lib.source_entries([{"path": "x", "wieght": 1}])
  with pytest.raises(ConfigError, match=r"data.sources\[1\].weight=-1"):
    sources_lib.source_entries(["x", {"path": "y", "weight": -1}])
  with pytest.raises(ConfigError, match="every weight is 0"):
    sources_lib.source_entries([{"path": "x", "weight": 0}])
  with pytest.raises(ConfigError, match="has no path"):
    sources_lib.source_entries([{"weight": 1}])
  assert sources_lib.source_entries(["x"]) == [{"path": "x", "weight": 1.0, "image_root": ""}]
  jsonl = write_dataset(str(tmp_path), 4, kinds=("text",))
  with pytest.raises(ConfigError, match="both name the training data"):
    make_train_iterator(_config(sources=(jsonl,), source="jsonl", jsonl_path=jsonl))


def test_bench_data_runs_end_to_end(tmp_path: Path, capsys):
  from cheers_jax.bench import data as bench_data

  assert (
    bench_data.main(
      [
        "--records",
        "12",
        "--workers",
        "0",
        "--steps",
        "1",
        "--stage-samples",
        "8",
        "--image-size",
        "64",
        "--batch-size",
        "4",
        "--startup-records",
        "2500",
        "--jsonl-startup-records",
        "100",
        "--processes",
        "1",
        "--workdir",
        str(tmp_path),
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  result = json.loads(out.split("RESULT ")[-1])
  assert set(result["startup_s"]) == {"jsonl", "shards"} and result["startup_large"]["records"] == 2500
  assert set(result["throughput"]) == {"jsonl/workers=0", "shards/workers=0"}
  assert set(result["stages_ms"]["shards"]) == {"read", "decode", "preprocess", "tokenise", "assemble"}
  assert "cores" in out
