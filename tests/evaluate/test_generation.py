"""GenEval and DPG-Bench layouts on the tiny checkpoint with 2 steps, resume, and the pixel conversions."""

import json

import numpy as np
from PIL import Image

from cheers_jax.evaluate.__main__ import main
from cheers_jax.evaluate.generation import (
  DEFAULTS,
  dpg_grid,
  dpg_uint8,
  plan_steps,
  read_geneval_metadata,
  run_dpg,
  run_geneval,
  save_image_uint8,
)
from tests.infer.conftest import TINY


def test_official_defaults():
  assert (DEFAULTS["geneval"]["steps"], DEFAULTS["geneval"]["cfg"], DEFAULTS["geneval"]["shift"]) == (80, 9.5, 1.0)
  assert (DEFAULTS["dpg"]["steps"], DEFAULTS["dpg"]["cfg"], DEFAULTS["dpg"]["shift"]) == (250, 9.5, 0.5)


def test_pixel_conversions_and_grid():
  x = np.array([[[0.0, 0.5, 1.0]]], np.float32)
  assert save_image_uint8(x).tolist() == [[[0, 128, 255]]]  # rounded: 127.5 + 0.5
  assert dpg_uint8(np.array([[[-0.2, 0.5, 1.3]]])).tolist() == [[[0, 127, 255]]]  # truncated, clipped
  tiles = [np.full((2, 3, 3), 10 * i, np.uint8) for i in range(4)]
  grid = dpg_grid(tiles)
  assert grid.shape == (4, 6, 3)
  assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 10 and grid[2, 0, 0] == 20 and grid[2, 3, 0] == 30


def test_metadata_lines_keep_their_numbers(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"prompt": "a cat", "tag": "x"}\n\n{"prompt": "a dog"}\n')
  assert read_geneval_metadata(path) == ([(0, {"prompt": "a cat", "tag": "x"}), (2, {"prompt": "a dog"})], 0)


def test_plan_steps_keeps_each_job_in_its_slot():
  lengths = [64, 128, 64, 64, 128, 64]
  every = plan_steps(lengths, [True] * 6, rows=2)
  assert every == [[0, 2], [3, 5], [1, 4]]  # grouped by padded length, then in order
  assert plan_steps(lengths, [False, True, False, True, False, False], rows=2) == [[3, None], [1, None]]
  assert plan_steps(lengths, [False] * 6, rows=2) == []


def test_geneval_layout_and_resume(tiny, tokenizer, tmp_path):
  meta = tmp_path / "evaluation_metadata.jsonl"
  lines = [
    {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
  ]
  meta.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  model, variables = tiny
  out = tmp_path / "geneval"
  kw = dict(images_per_prompt=3, steps=2, batch_size=4, progress=False, log=lambda s: None)
  res = run_geneval(model, variables, tokenizer, str(meta), str(out), **kw)
  assert res["generated"] == 6
  assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
  for i, line in enumerate(lines):
    assert json.loads((out / f"{i:05}" / "metadata.jsonl").read_text()) == line
    names = sorted(p.name for p in (out / f"{i:05}" / "samples").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
  first = np.asarray(Image.open(out / "00001" / "samples" / "00002.png"))
  assert first.shape == (64, 64, 3)
  (out / "00001" / "samples" / "00002.png").unlink()
  res = run_geneval(model, variables, tokenizer, str(meta), str(out), **kw)
  assert res["generated"] == 1  # only the missing image; same seed, batch and slot: given back exactly
  assert np.array_equal(np.asarray(Image.open(out / "00001" / "samples" / "00002.png")), first)


def _images(folder, prompt_index, n):
  return [np.asarray(Image.open(folder / f"{prompt_index:05}" / "samples" / f"{k:05}.png")) for k in range(n)]


def test_an_image_does_not_depend_on_its_batch(tiny, tokenizer, tmp_path):
  """One prompt drawn alone, and drawn after prompts of other lengths (one in its padded-length group,
  so its images sit in other slots of a batch that holds another prompt; one longer, in a group of its
  own): the same seeds give the same images."""
  model, variables = tiny
  target = "a photo of a red car"
  crowd = [
    {"prompt": "a cow"},
    {"prompt": "a very long and detailed description of a small wooden house " * 3},
    {"prompt": target},
  ]
  kw = dict(images_per_prompt=2, steps=2, batch_size=4, bucket=32, progress=False, log=lambda s: None)
  (tmp_path / "crowd.jsonl").write_text("\n".join(json.dumps(x) for x in crowd))
  (tmp_path / "alone.jsonl").write_text(json.dumps({"prompt": target}))
  run_geneval(model, variables, tokenizer, str(tmp_path / "crowd.jsonl"), str(tmp_path / "crowd"), **kw)
  run_geneval(
    model, variables, tokenizer, str(tmp_path / "alone.jsonl"), str(tmp_path / "alone"), seed=2 * 2, **kw
  )  # the seeds of line 2 (seed + 2 * images_per_prompt + n)
  alone, crowded = _images(tmp_path / "alone", 0, 2), _images(tmp_path / "crowd", 2, 2)
  assert all(np.array_equal(a, b) for a, b in zip(alone, crowded))
  assert not np.array_equal(alone[0], alone[1])


def test_dpg_layout(tiny, tokenizer, tmp_path):
  prompts = tmp_path / "prompts"
  prompts.mkdir()
  (prompts / "7.txt").write_text("A red cube on a table.")
  (prompts / "12.txt").write_text("Two cats sleeping on a sofa, next to a window.\n")
  model, variables = tiny
  res = run_dpg(
    model,
    variables,
    tokenizer,
    str(prompts),
    str(tmp_path / "dpg"),
    steps=2,
    batch_size=4,
    progress=False,
    log=lambda s: None,
  )
  assert res["generated"] == 2
  assert sorted(p.name for p in (tmp_path / "dpg").iterdir()) == ["12.jpg", "7.jpg"]
  grid = Image.open(tmp_path / "dpg" / "7.jpg")
  assert grid.format == "JPEG" and grid.size == (128, 128)
  res = run_dpg(
    model,
    variables,
    tokenizer,
    str(prompts),
    str(tmp_path / "dpg"),
    steps=2,
    batch_size=4,
    progress=False,
    log=lambda s: None,
  )
  assert res["generated"] == 0


def test_cli_errors(tmp_path, capsys):
  assert (
    main(["geneval", "--checkpoint", str(TINY), "--metadata", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)])
    == 2
  )
  assert "cannot read --metadata" in capsys.readouterr().err
  assert main(["dpg", "--checkpoint", str(TINY), "--prompts", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
  assert "not a folder" in capsys.readouterr().err
