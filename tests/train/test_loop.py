"""The training loop: preemption + resume reproduce the uninterrupted run exactly, NaN stop / skip,
metrics.jsonl, HF export and init_from='orbax:DIR'."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest

from cheers_jax import sharding
from cheers_jax.train import checkpointing as ckpt_lib
from cheers_jax.train import metrics as metrics_lib
from cheers_jax.train import state as state_lib
from cheers_jax.train.loop import NonFiniteError, train
from tests.train.common import fake_iterator, small_config, tree_max_abs_diff


class SigtermAt:
  """Wraps an iterator; sends this process a real SIGTERM while producing batch `index` (0-based)."""

  def __init__(self, inner, index: int):
    self.inner, self.index, self.calls = inner, index, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.calls == self.index:
      os.kill(os.getpid(), signal.SIGTERM)
    self.calls += 1
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


class NanAt(SigtermAt):
  """NaN flow-matching times in batch `index` (uint8 pixels cannot be NaN)."""

  def __next__(self):
    batch = next(self.inner)
    if self.calls == self.index:
      batch = dict(batch, t=np.full_like(batch["t"], np.nan))
    self.calls += 1
    return batch


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


QUIET = dict(evaluate=False, samples=False, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = train(small_config(), workdir, iterator=fake_iterator(), export_hf=True, **QUIET)
  return workdir, result


def test_uninterrupted_run_logs_and_exports(uninterrupted):
  workdir, result = uninterrupted
  assert result.status == "done" and result.step == 6
  records = [r for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for key in (
    "loss",
    "loss_ar",
    "loss_fm",
    "grad_norm",
    "lr",
    "step_time",
    "samples_per_s",
    "tokens_per_s",
    "skipped_samples",
    "skipped_nonfinite",
  ):
    assert key in records[-1], key
  assert "mfu" not in records[-1]  # CPU: no peak figure, MFU n/a
  assert "compile_time" in records[0]
  assert all(np.isfinite(r["loss"]) for r in records)
  assert sorted(ckpt_lib.Checkpointer(workdir).all_steps()) == [2, 4, 6]
  # the HF export loads back into the same (bf16-rounded) params
  from cheers_jax.checkpoint.hf import load_hf_checkpoint

  _, variables = load_hf_checkpoint(workdir / "hf")
  want = jax.device_get(result.state.params)
  got = variables["params"]
  err = tree_max_abs_diff(got, jax.tree.map(lambda x: np.asarray(x, jax.numpy.bfloat16).astype(np.float32), want))
  assert err == 0.0
  for name in (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "generation_config.json",
  ):  # self-contained: tokenizer and processor configs too
    assert (workdir / "hf" / name).is_file(), name


def test_resume_after_sigterm_reproduces_the_run_exactly(uninterrupted, tmp_path):
  ref_dir, ref = uninterrupted
  config = small_config()
  first = train(config, tmp_path, iterator=SigtermAt(fake_iterator(), 3), export_hf=False, **QUIET)
  assert first.status == "preempted" and first.step == 4  # the signal came while fetching batch 4
  assert ckpt_lib.Checkpointer(tmp_path).latest_step() == 4
  # a fresh process would build a fresh iterator: the checkpoint puts it at batch 4
  second = train(config, tmp_path, iterator=fake_iterator(), export_hf=False, **QUIET)
  assert second.status == "done" and second.step == 6
  assert losses(tmp_path) == losses(ref_dir)  # bit for bit, every step
  assert tree_max_abs_diff(jax.device_get(second.state.params), jax.device_get(ref.state.params)) == 0.0


def test_init_from_orbax_workdir(uninterrupted):
  workdir, result = uninterrupted
  config = small_config()
  mesh = sharding.make_mesh(dict(config.mesh))
  state, _ = state_lib.init_train_state(config, mesh, init_from=f"orbax:{workdir}")
  assert int(state.step) == 0  # a new run: fresh optimizer state, same params
  assert tree_max_abs_diff(jax.device_get(state.params), jax.device_get(result.state.params)) == 0.0


def test_nan_stop_keeps_the_last_good_checkpoint(tmp_path):
  config = small_config(nan_policy="stop")
  with pytest.raises(NonFiniteError, match=r"at step 3 .*Last good checkpoint: step 2"):
    train(config, tmp_path, iterator=NanAt(fake_iterator(), 2), export_hf=False, **QUIET)
  assert ckpt_lib.Checkpointer(tmp_path).all_steps() == [2]


def test_nan_skip_goes_on_and_counts(tmp_path):
  config = small_config(nan_policy="skip")
  result = train(config, tmp_path, iterator=NanAt(fake_iterator(), 1), export_hf=False, **QUIET)
  assert result.status == "done" and result.step == 6
  records = {r["step"]: r for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r}
  assert records[2]["skipped_nonfinite"] == 1 and records[2]["loss"] is None  # NaN is logged as null
  assert records[1]["skipped_nonfinite"] == 0 and records[3]["skipped_nonfinite"] == 0
  assert np.isfinite(records[3]["loss"])


def test_inference_loader_reads_a_training_run(uninterrupted):
  """`generate --run WORKDIR`: the latest checkpoint's params, with the run's own model config."""
  from cheers_jax.infer import loader

  workdir, result = uninterrupted
  model, variables = loader.load_run(workdir, "float32")
  assert model.cfg == loader.inference_config(state_lib.model_config(small_config()), "float32")
  assert tree_max_abs_diff(variables["params"], jax.device_get(result.state.params)) == 0.0


def test_resume_after_a_kill_never_repeats_a_step_in_metrics_jsonl(uninterrupted, tmp_path):
  """Issue 13 item 8: after a SIGKILL (here: the last checkpoint never written, a metrics line cut short)
  the resumed run replays steps 5-6; metrics.jsonl held them twice. Now it holds every step once, with
  the replayed values (equal to the uninterrupted run's)."""
  import shutil

  ref_dir, _ = uninterrupted
  shutil.copytree(ref_dir, tmp_path / "run")
  run = tmp_path / "run"
  shutil.rmtree(run / "hf")
  shutil.rmtree(ckpt_lib.checkpoint_dir(run) / "6")  # killed before step 6's checkpoint: resumes at 4
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": 1.')  # the write the kill cut short
  result = train(small_config(), run, iterator=fake_iterator(), export_hf=False, **QUIET)
  assert result.status == "done" and result.step == 6
  steps = [r["step"] for r in metrics_lib.read_jsonl(run / "metrics.jsonl") if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert losses(run) == losses(ref_dir)


def test_training_over_a_jsonl_full_of_bad_lines_finishes_and_names_and_counts_each(tmp_path, caplog):
  """Issue 13, "done means": a run over a JSONL mixing every kind of bad line and bad image with good
  samples finishes; each bad record is named once in the log and counted in metrics.jsonl."""
  import json
  import logging

  from cheers_jax.data.pipeline import SKIP_REASONS
  from tests.data.test_images import write_bomb_png
  from tests.data.test_pipeline import _bad_lines_jsonl

  path, bad_lines = _bad_lines_jsonl(tmp_path)  # good und/gen lines on ok.png + 5 unusable lines
  good = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
  write_bomb_png(tmp_path / "bomb.png")
  os.symlink("loop", tmp_path / "loop")
  (tmp_path / "folder.png").mkdir()
  conv = [{"from": "human", "value": "<im_start><image><im_end>"}, {"from": "gpt", "value": "A square."}]
  bad_images = {
    "missing": "none.png",
    "cut": "cut.png",
    "bomb": "bomb.png",
    "loop": "loop/x.png",
    "folder": "folder.png",
  }
  with open(path, "a") as f:
    for name, image in bad_images.items():
      f.write(json.dumps({"id": f"img_{name}", "image": image, "conversations": conv}) + "\n")
    f.write(
      json.dumps(
        {
          "id": "too_long",
          "image": "ok.png",
          "conversations": [conv[0], {"from": "gpt", "value": " ".join(["word"] * 80)}],
        }
      )
      + "\n"
    )
  config = small_config()  # its batch shapes (4 x 32 tokens, one 64-px image each): the step compiled above serves
  config.data.update(
    dict(
      source="jsonl",
      jsonl_path=str(path),
      image_root="",
      shuffle=True,
      mix={"und": 3.0, "gen": 1.0, "text": 0.0},
      cfg_data_rate=0.0,
      num_threads=2,
    )
  )
  with caplog.at_level(logging.WARNING, logger="cheers_jax.data.pipeline"):
    result = train(config, tmp_path / "run", export_hf=False, **QUIET)
  assert result.status == "done" and result.step == 6
  named = {r.getMessage().split()[2]: r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()}
  assert set(bad_lines) <= set(named) and all(named[k].count("malformed") for k in bad_lines)
  drawn_bad = {f"img_{k}" for k in bad_images} | {"too_long"}
  assert set(named) == set(bad_lines) | drawn_bad  # 18 und draws over 9 und lines: every one came up
  assert "too large" in named["img_bomb"] and "symbolic links" in named["img_loop"]
  rows = [r for r in metrics_lib.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in rows)
  assert rows[-1]["skipped_samples"] >= len(bad_lines)  # every unusable line, plus the bad images drawn so far
  assert set(SKIP_REASONS) >= {"malformed", "bad_image"}


def test_sample_row_of_the_configured_prompts(uninterrupted, tmp_path):
  """Non-synthetic data: config.sample_prompts are drawn as one PNG row and sent to TensorBoard."""
  from PIL import Image
  from cheers_jax.model.cheers import Cheers
  from cheers_jax.train.loop import sample_images
  from cheers_jax.train.state import model_config

  _, result = uninterrupted
  config = small_config()
  with config.unlocked():
    config.sample_prompts = ("a red circle", "a blue square")
    config.sample_steps = 2
  written = []

  class Writer:
    def write_images(self, step, images):
      written.append((step, {k: v.shape for k, v in images.items()}))

  path = sample_images(Cheers(model_config(config)), result.state, config, tmp_path, 6, Writer())
  row = np.asarray(Image.open(path))
  size = row.shape[0]
  assert path.name == "step_0000006.png" and row.shape == (size, 2 * size, 3)
  assert written == [(6, {"samples": (2, size, size, 3)})]


def test_generate_draws_a_run_with_its_own_sampler(uninterrupted, tmp_path):
  """`generate t2i --run` defaults to the run's sample_steps / sample_cfg (what its own samples used);
  flags win, and other sources keep the published 80 steps, CFG 9.5."""
  import argparse

  from cheers_jax import generate

  workdir, _ = uninterrupted
  config = small_config()
  out = str(tmp_path / "out")
  args = generate.build_parser().parse_args(["t2i", "--run", str(workdir), "--out", out, "A RED CIRCLE"])
  generate._validate(args)
  assert (args.steps, args.cfg) == (config.sample_steps, config.sample_cfg) != (80, 9.5)
  args = generate.build_parser().parse_args(["t2i", "--run", str(workdir), "--cfg", "3", "--out", out, "A"])
  generate._validate(args)
  assert (args.steps, args.cfg) == (config.sample_steps, 3.0)
  assert generate._flow_defaults(argparse.Namespace(run=None)) == {"steps": 80, "cfg": 9.5}
  # no readable run there: the published sampler (the model's load then names the problem)
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  for not_a_run in (tmp_path / "missing", tmp_path / "empty"):
    assert generate._flow_defaults(argparse.Namespace(run=str(not_a_run))) == {"steps": 80, "cfg": 9.5}
