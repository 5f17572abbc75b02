"""The `python -m cheers_jax.generate` CLI on the tiny checkpoint (CPU): PNGs, grid, seeds, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cheers_jax.generate import main
from cheers_jax.infer.images import make_grid
from tests.infer.conftest import TINY

T2I = [
  "t2i",
  "--checkpoint",
  str(TINY),
  "a red circle",
  "a small blue square on a wooden table",
  "--steps",
  "2",
  "--batch-size",
  "2",
]


def test_t2i_writes_pngs_and_grid(tiny, tmp_path, capsys):
  # `tiny` first: the CLI then reuses the programs the library tests compiled
  assert main(T2I + ["--out", str(tmp_path / "s0"), "--seed", "0"]) == 0
  files = sorted(p.name for p in (tmp_path / "s0").iterdir())
  assert files == ["0000_a_red_circle.png", "0001_a_small_blue_square_on_a_wooden_table.png", "grid.png"]
  single = np.asarray(Image.open(tmp_path / "s0" / files[0]))
  assert single.shape == (64, 64, 3) and single.dtype == np.uint8
  grid = np.asarray(Image.open(tmp_path / "s0" / "grid.png"))
  assert grid.shape == (64 + 4, 2 * 64 + 6, 3)
  assert "saved" in capsys.readouterr().out
  assert main(T2I + ["--out", str(tmp_path / "s1"), "--seed", "1"]) == 0
  other = np.asarray(Image.open(tmp_path / "s1" / "grid.png"))
  assert other.shape == grid.shape and not np.array_equal(other, grid)
  second = np.asarray(Image.open(tmp_path / "s0" / files[1]))
  assert not np.array_equal(single, second)


def test_grid_layout():
  tiles = [np.full((4, 6, 3), i * 40, np.uint8) for i in range(5)]
  grid = make_grid(tiles, columns=2, pad=1)
  assert grid.shape == (3 * 4 + 4, 2 * 6 + 3, 3)
  assert (grid[1:5, 8:14] == 40).all() and (grid[11:15, 1:7] == 160).all() and (grid[11:15, 8:14] == 0).all()


def _error(capsys, argv) -> str:
  assert main(argv) == 2
  return capsys.readouterr().err


def test_errors_before_loading(capsys, tmp_path):
  assert "empty prompt" in _error(capsys, ["t2i", "--checkpoint", str(TINY), "   "])
  assert "at least 1" in _error(capsys, T2I + ["--steps", "0"])
  assert "no prompt" in _error(capsys, ["t2i", "--checkpoint", str(TINY)])
  assert "exactly one" in _error(capsys, ["chat", "--prompt", "hi"])
  missing = str(tmp_path / "x.png")
  assert "image file not found" in _error(capsys, ["ask", "--checkpoint", str(TINY), "--image", missing])
  assert "Orbax" in _error(capsys, ["chat", "--orbax", str(tmp_path), "--prompt", "hi"])
  assert "prompt-file" in _error(capsys, ["t2i", "--checkpoint", str(TINY), "--prompt-file", str(tmp_path / "none")])


def test_checkpoint_without_generation_head(capsys, tmp_path):
  ckpt = tmp_path / "und_only"
  shutil.copytree(TINY, ckpt)
  index = json.loads((ckpt / "model.safetensors.index.json").read_text())
  index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.gen_projector.")}
  (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
  err = _error(capsys, ["t2i", "--checkpoint", str(ckpt), "a cat", "--steps", "2"])
  assert "no generation head" in err and "gen_projector" in err


def test_errors_after_loading(tiny, capsys, tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image at all")
  assert "cannot read image" in _error(capsys, ["ask", "--checkpoint", str(TINY), "--image", str(bad)])
  err = _error(capsys, ["chat", "--checkpoint", str(TINY), "--prompt", "hello " * 10, "--max-len", "16"])
  assert "does not fit" in err and "--max-len" in err


@pytest.mark.parametrize(
  "argv, flag",
  [
    (["t2i", "a cat", "--cfg", "nan"], "--cfg"),
    (["t2i", "a cat", "--cfg", "inf"], "--cfg"),
    (["t2i", "a cat", "--shift", "nan"], "--shift"),
    (["t2i", "a cat", "--batch-size", "0"], "--batch-size"),
    (["t2i", "a cat", "--steps", "-3"], "--steps"),
    (["chat", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["chat", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["chat", "--prompt", "hi", "--top-p", "nan"], "--top-p"),
    (["chat", "--prompt", "hi", "--top-k", "-2"], "--top-k"),
    (["chat", "--prompt", "hi", "--repetition-penalty", "nan"], "--repetition-penalty"),
    (["chat", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["chat", "--prompt", "hi", "--max-len", "0"], "--max-len"),
  ],
)
def test_nan_and_impossible_sampling_numbers_exit_2_naming_the_flag(argv, flag, capsys, tmp_path):
  """Issue 13 item 2: `--cfg nan` wrote a black image and `--temperature nan` printed '!!!!' with exit 0.
  Every sampling number is checked where it is parsed: one line naming the flag, before any loading."""
  err = _error(
    capsys,
    argv[:1] + ["--checkpoint", str(tmp_path)] + argv[1:] + ["--out", str(tmp_path / "o")]
    if argv[0] == "t2i"
    else argv[:1] + ["--checkpoint", str(tmp_path)] + argv[1:],
  )
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err
  assert "config.json" not in err  # rejected before the (missing) checkpoint is looked at


def test_sampling_library_rejects_nan():
  """The library's own checks (for callers that bypass the CLI)."""
  from cheers_jax.infer.decode import GenerationError, SamplingConfig

  for bad in (dict(temperature=float("nan")), dict(repetition_penalty=float("nan")), dict(top_p=float("nan"))):
    with pytest.raises(GenerationError):
      SamplingConfig(**bad).validate()


def test_image_over_the_pixel_limit_is_one_line_before_loading(capsys, tmp_path):
  """Issue 13 item 1 at inference: `ask` / `edit` with an image PIL refuses as a decompression bomb."""
  from tests.data.test_images import write_bomb_png

  bomb = write_bomb_png(tmp_path / "huge.png")
  for argv in (
    ["ask", "--checkpoint", str(tmp_path), "--image", bomb],
    ["edit", "--checkpoint", str(tmp_path), "--image", bomb, "--prompt", "x", "--out", str(tmp_path / "o")],
  ):
    err = _error(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "huge.png" in lines[0] and "too large" in lines[0] and "--image" in lines[0], err


def test_ask_answers_every_image_in_one_batched_call(tiny, tmp_path, capsys, monkeypatch):
  from cheers_jax.infer import decode

  calls = []
  real = decode.generate_text
  monkeypatch.setattr(decode, "generate_text", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i, colour in enumerate([(220, 40, 40), (40, 80, 220)]):
    Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
  (folder / "notes.txt").write_text("not an image")
  single = tmp_path / "one.png"
  Image.new("RGB", (32, 32), (40, 170, 60)).save(single)
  assert (
    main(
      [
        "ask",
        "--checkpoint",
        str(TINY),
        "--image",
        str(single),
        "--image",
        str(folder),
        "--prompt",
        "What?",
        "--max-new-tokens",
        "3",
        "--jsonl",
      ]
    )
    == 0
  )
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert calls == [3]  # one call, all three images
  assert [x["image"] for x in lines] == [str(single), str(folder / "0.png"), str(folder / "1.png")]
  assert all(x["prompt"] == "What?" and isinstance(x["answer"], str) for x in lines)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "without image files" in _error(capsys, ["ask", "--checkpoint", str(TINY), "--image", str(empty)])
