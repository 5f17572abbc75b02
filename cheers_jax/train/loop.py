"""The training loop: data -> jitted step -> metrics, checkpoints, resume, samples, export, evaluation.

`train(config, workdir)` is the whole program behind `python -m cheers_jax.train`:
- mesh from `config.mesh`, the grain iterator of `cheers_jax.data.pipeline` (this process's rows,
  turned into global arrays with `jax.make_array_from_process_local_data`);
- resume: the latest checkpoint in workdir/checkpoints restores the train state AND the iterator
  position, so the run continues with the next sample and, given the same config, reproduces the
  uninterrupted run's losses exactly;
- metrics every `log_every` steps with ONE device_get per interval (loss, loss_ar, loss_fm,
  grad_norm, lr, step_time, samples/s, tokens/s, MFU, skipped samples) to TensorBoard, the console and
  workdir/metrics.jsonl; a tqdm bar with ETA;
- non-finite loss or gradient: the step leaves params unchanged; `nan_policy='skip'` goes on (and
  counts), 'stop' raises NonFiniteError naming the step, without saving past the last good checkpoint;
- SIGTERM: checkpoint at the next step boundary, then return (status 'preempted');
- at the end: a final checkpoint, sample images (`config.sample_prompts`), the HF export to
  workdir/hf, and for the synthetic shapes source a greedy-caption evaluation on held-out images.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from cheers_jax import config as config_lib
from cheers_jax import distributed, sharding
from cheers_jax.data import batch as batch_lib
from cheers_jax.data import packing as packing_lib
from cheers_jax.data.pipeline import make_train_iterator
from cheers_jax.infer import images as images_lib
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.config import ModelConfig
from cheers_jax.train import checkpointing as ckpt_lib
from cheers_jax.train import metrics as metrics_lib
from cheers_jax.train import batching
from cheers_jax.train import shapes_eval
from cheers_jax.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """The loss or the gradient became NaN/Inf under nan_policy='stop'."""


@dataclasses.dataclass
class TrainResult:
  status: str                      # 'done' | 'preempted'
  step: int                        # steps completed
  state: Any = None                # the final TrainState (device arrays)
  last_metrics: dict = dataclasses.field(default_factory=dict)
  evaluation: Optional[dict] = None
  hf_dir: Optional[str] = None


# ---- helpers ---------------------------------------------------------------------------------------
def _default_iterator(config) -> Iterator[dict]:
  return make_train_iterator(config, process_index=jax.process_index(), process_count=jax.process_count())


def _first_nonfinite(history: list[tuple[int, dict]]) -> Optional[int]:
  for step, m in history:
    if int(m["skipped_nonfinite"]):
      return step
  return None


def _summarise(history: list[tuple[int, dict]]) -> dict[str, float]:
  """Means of the loss-like metrics over an interval; lr and counts of the last / summed."""
  out = {}
  for key in ("loss", "loss_ar", "loss_fm", "grad_norm"):
    vals = [float(m[key]) for _, m in history if not int(m["skipped_nonfinite"])]
    out[key] = float(np.mean(vals)) if vals else float("nan")
  out["lr"] = float(history[-1][1]["lr"])
  out["num_text_targets"] = float(np.mean([float(m["num_text_targets"]) for _, m in history]))
  out["skipped_nonfinite"] = int(sum(int(m["skipped_nonfinite"]) for _, m in history))
  return out


class _Clock:
  """Steady-state step time: the first step (compilation) is timed separately."""

  def __init__(self):
    self.t = time.perf_counter()
    self.steps = 0

  def lap(self) -> tuple[float, int]:
    now = time.perf_counter()
    dt, n = now - self.t, self.steps
    self.t, self.steps = now, 0
    return dt, n


def sample_images(model: Cheers, state, config, workdir: Path, step: int,
                  writer: Optional[metrics_lib.MetricWriter] = None) -> Optional[Path]:
  """T2I samples of config.sample_prompts as a PNG row (+ TensorBoard); None without prompts."""
  prompts = list(config.get("sample_prompts", ()) or ())
  if not prompts:
    return None
  images = draw_captions(model, state, config, prompts)
  path = workdir / "samples" / f"step_{step:07d}.png"
  if jax.process_index() == 0:
    images_lib.save_png(images_lib.make_grid(images_lib.to_uint8(images), columns=len(images), pad=0), path)
    if writer is not None:
      writer.write_images(step, {"samples": images})
  return path


def draw_captions(model: Cheers, state, config, captions: list[str]) -> np.ndarray:
  """T2I of each caption in the training data's prompt form (seeds 0..), with the config's sampler settings."""
  from cheers_jax.data.sources import T2I_PROMPT, shapes_prompt
  from cheers_jax.data.tokenizer import CheersTokenizer
  from cheers_jax.infer.t2i import t2i_prompt, text_to_image
  tok = CheersTokenizer()
  prompt = shapes_prompt if config.data.source == "synthetic" else T2I_PROMPT.format
  ids = [t2i_prompt(tok, prompt(caption=c)) for c in captions]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  out = text_to_image(model, variables, ids, steps=int(config.sample_steps), cfg_scale=float(config.sample_cfg),
                      seeds=list(range(len(ids))))
  return np.asarray(out.images)


def evaluate_synthetic(model: Cheers, state, config, num_images: int = 96) -> Optional[dict]:
  """Greedy captions of held-out synthetic shapes (indices past the training set), scored by
  sources.score_captions against chance and the best image-blind answer."""
  if config.data.source != "synthetic":
    return None
  try:
    from cheers_jax.data import sources
    from cheers_jax.data.tokenizer import CheersTokenizer, UND_IMAGE_TEXT
    from cheers_jax.infer.decode import GREEDY, generate_text
  except ImportError as e:
    log.info("no caption evaluation: %s", e)
    return None
  size = int(config.data.synthetic_size)
  shapes = sources.SyntheticShapes(size + num_images, int(config.data.image_size), int(config.seed))
  indices = range(size, size + num_images)  # never drawn in training (the training source has `size`)
  tok = CheersTokenizer()
  prompt = tok.build_prompt(UND_IMAGE_TEXT + "\n" + sources.I2T_PROMPT)
  images = [[shapes.render(i).astype(np.float32) / 255.0] for i in indices]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  outs = generate_text(model, variables, [prompt] * num_images, images, max_new_tokens=8, sampling=GREEDY)
  texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in outs]
  wanted = [shapes.label(i) for i in indices]
  scores = sources.score_captions(wanted, texts)
  examples = [f"{sources.describe(w)!r} -> {t!r}" for w, t in zip(wanted[:6], texts)]
  return {**scores, "num_images": num_images, "examples": examples}


def evaluate_synthetic_generation(model: Cheers, state, config, workdir: Path, step: int,
                                  writer: Optional[metrics_lib.MetricWriter] = None,
                                  samples_per_prompt: int = 8) -> dict:
  """Every colour-shape prompt drawn `samples_per_prompt` times (seeds 0..), judged by
  shapes_eval.judge_image; the grid (each prompt under its image) to workdir/samples and TensorBoard."""
  from cheers_jax.data.sources import describe
  wanted = [label for label in shapes_eval.all_prompts() for _ in range(samples_per_prompt)]
  texts = [describe(label) for label in wanted]
  images = draw_captions(model, state, config, texts)
  scores = shapes_eval.score_generations(wanted, images)
  if jax.process_index() == 0:
    grid = shapes_eval.labelled_grid(images, texts, columns=3 * samples_per_prompt)
    path = workdir / "samples" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    Image.fromarray(grid).save(path)
    scores["grid"] = str(path)
    if writer is not None:
      writer.write_images(step, {"samples": grid})
  return scores


def caption_report(ev: dict) -> str:
  """One paragraph a person can judge: the template (well-formed), then image reading against chance."""
  return (f"held-out synthetic captions ({ev['num_images']} images, greedy): well-formed {ev['well_formed']:.0%}, "
          f"{int(ev['distinct'])} distinct; colour {ev['colour_acc']:.0%} (chance {ev['colour_chance']:.0%}, "
          f"blind best {ev['majority_colour']:.0%}), shape {ev['shape_acc']:.0%} (chance {ev['shape_chance']:.0%}, "
          f"blind best {ev['majority_shape']:.0%}), both {ev['both_acc']:.0%} (chance {ev['both_chance']:.1%}, "
          f"blind best {ev['majority_both']:.0%})")


# ---- the loop --------------------------------------------------------------------------------------
def train(config, workdir: str | os.PathLike, *, iterator: Optional[Iterator[dict]] = None,
          preemption: Optional[ckpt_lib.PreemptionHandler] = None, export_hf: Optional[bool] = None,
          evaluate: bool = True, samples: bool = True, progress: bool = True) -> TrainResult:
  """Train (or resume) `config` in `workdir`. See the module docstring.

  iterator: batches in the batch contract with get_state()/set_state() (default: the grain
  pipeline). preemption: a PreemptionHandler (default: one that catches SIGTERM).
  export_hf: write workdir/hf at the end (default: config.export_hf if present, else True).
  """
  trainer = Trainer(config, workdir, iterator=iterator, preemption=preemption, samples=samples, progress=progress)
  try:
    trainer.restore()
    result = trainer.run_steps()
    if result.status == "done":
      do_export = export_hf if export_hf is not None else bool(config.get("export_hf", True))
      trainer.finish(result, export_hf=do_export, evaluate=evaluate)
    return result
  finally:
    trainer.close()


class Trainer:
  """One run, in named phases: `restore` (or initialise) the state, `run_steps` (per step: stop if
  preempted, fetch a batch, step, log, checkpoint, sample), `finish` (samples, HF export, caption
  evaluation), `close`."""

  def __init__(self, config, workdir: str | os.PathLike, *, iterator: Optional[Iterator[dict]] = None,
               preemption: Optional[ckpt_lib.PreemptionHandler] = None, samples: bool = True, progress: bool = True):
    self.config = config
    self.workdir = Path(workdir)
    self.cfg = config_lib.model_config(config)  # config.load checked the config; the process count is known now
    distributed.check_batch_splits_over_processes(int(config.train.batch_size))
    self.lead = jax.process_index() == 0
    if self.lead:
      self.workdir.mkdir(parents=True, exist_ok=True)
    self.mesh = sharding.make_mesh(dict(config.mesh))
    self.model = Cheers(self.cfg)
    self.iterator = iterator if iterator is not None else _default_iterator(config)
    self.checkpointer = ckpt_lib.Checkpointer.from_config(self.workdir, config)
    self.own_preemption = preemption is None
    self.preemption = preemption or ckpt_lib.PreemptionHandler()
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.lead)
    self.samples = samples
    self.show_progress = progress and self.lead
    self.total = int(config.train.steps)
    self.state = self.step_fn = None
    self.step = 0
    self.meter = _Throughput(self.cfg, config.train.trainable)
    self.pending: list[tuple[int, dict]] = []  # (step number after the update, device metrics)
    self.last_summary: dict = {}
    self.skipped_samples = 0
    self.batch_shardings = None

  # -- phase 1 --
  def restore(self) -> None:
    """The latest checkpoint of the workdir (state + data position), else a fresh state."""
    config, mesh = self.config, self.mesh
    self.state, shardings, resumed = ckpt_lib.restore_or_init(
        config, self.workdir, mesh, jax.random.PRNGKey(int(config.seed)), self.iterator, self.checkpointer)
    self.step = int(jax.device_get(self.state.step))
    replayed = self.writer.drop_after(self.step)  # the steps after the checkpoint run again
    if replayed:
      log.info("dropped %d metrics.jsonl rows after step %d (those steps run again)", replayed, self.step)
    log.info("%s at step %d of %d; mesh %s; %d devices (%s)", "resumed" if resumed else "starting", self.step,
             self.total, dict(mesh.shape), jax.device_count(), jax.devices()[0].device_kind)
    self.step_fn = step_lib.make_train_step(self.model, config, mesh, shardings)

  # -- phase 2 --
  def run_steps(self) -> TrainResult:
    log_every = max(1, int(self.config.log_every))
    sample_every = int(self.config.get("sample_every", 0) or 0)
    every = max(1, int(self.config.checkpoint.every_steps))
    bar = None
    if self.show_progress:
      bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", dynamic_ncols=True, smoothing=0.1)
    try:
      while self.step < self.total:
        if self.preemption.requested or self.checkpointer.reached_preemption(self.step):
          return self._stop_preempted()
        self._train_one_step()
        if bar is not None:
          bar.update(1)
        if self.step % log_every == 0 or self.step == self.total:
          self._log_metrics(bar)
        if (self.step % every == 0 or self.step == self.total) and self.checkpointer.latest_step() != self.step:
          self._save_checkpoint()
        if self.samples and sample_every and self.step % sample_every == 0 and self.step != self.total:
          sample_images(self.model, self.state, self.config, self.workdir, self.step, self.writer)
    finally:
      if bar is not None:
        bar.close()
    if self.pending:
      self._fetch_metrics()
    self.checkpointer.wait()
    return TrainResult("done", self.step, self.state, self.last_summary)

  def _train_one_step(self) -> None:
    batch = next(self.iterator)
    self.skipped_samples = int(batch.get("num_skipped", self.skipped_samples))
    host = {k: v for k, v in batch.items() if k not in batch_lib.HOST_ONLY_KEYS and not k.startswith("_")}
    if self.batch_shardings is None:
      self.batch_shardings = batching.batch_shardings(self.mesh, host)
    self.meter.count(host)
    self.state, metrics = self.step_fn(self.state, batching.device_batch(host, self.batch_shardings))
    self.step += 1
    self.pending.append((self.step, metrics))
    self.meter.stepped(metrics)

  def _fetch_metrics(self) -> list[tuple[int, dict]]:
    """ONE device_get of the metrics since the last fetch; stops on non-finite values if asked."""
    fetched = list(zip([s for s, _ in self.pending], jax.device_get([m for _, m in self.pending])))
    self.pending = []
    bad = _first_nonfinite(fetched)
    if bad is not None and self.config.train.nan_policy == "stop":
      last = self.checkpointer.latest_step()
      raise NonFiniteError(
          f"non-finite loss or gradient at step {bad} (train.nan_policy='stop'); the params were not updated "
          f"at that step and no checkpoint was written after it. Last good checkpoint: "
          f"{'step ' + str(last) if last is not None else 'none'} in {self.checkpointer.directory}. Lower train.lr, "
          f"check the data, or set --config.train.nan_policy=skip to skip such steps.")
    return fetched

  def _log_metrics(self, bar) -> None:
    summary = {**_summarise(self._fetch_metrics()), **self.meter.lap()}
    summary["skipped_samples"] = self.skipped_samples
    if not self.last_summary and self.meter.compile_time is not None:
      summary["compile_time"] = self.meter.compile_time  # first log of this run
    self.writer.write_scalars(self.step, summary)
    self.last_summary = summary
    if bar is not None:
      bar.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{summary['lr']:.2e}",
                      mfu=f"{summary['mfu']:.1%}" if "mfu" in summary else "n/a")

  def _save_checkpoint(self) -> None:
    if self.pending:
      self._fetch_metrics()  # never checkpoint past a non-finite step under 'stop'
    self.checkpointer.save(self.step, self.state, self.iterator.get_state(), self.config, force=True)

  def _stop_preempted(self) -> TrainResult:
    if self.pending:
      self._fetch_metrics()
    if self.checkpointer.latest_step() != self.step:
      self.checkpointer.save(self.step, self.state, self.iterator.get_state(), self.config, force=True)
    self.checkpointer.wait()
    log.warning("preempted (%s): saved step %d in %s; rerun the same command to resume",
                self.preemption.signal_name, self.step, self.checkpointer.directory)
    return TrainResult("preempted", self.step, self.state, self.last_summary)

  # -- phase 3 --
  def finish(self, result: TrainResult, *, export_hf: bool, evaluate: bool) -> None:
    state = result.state
    generation = None
    if self.samples:  # every process: the sampler is SPMD over the global params
      if self.config.data.source == "synthetic":  # every colour-shape prompt, judged and labelled
        generation = evaluate_synthetic_generation(self.model, state, self.config, self.workdir, result.step,
                                                   self.writer)
        if self.lead:
          print(shapes_eval.generation_report(generation), flush=True)
      else:
        sample_images(self.model, state, self.config, self.workdir, result.step, self.writer)
    if export_hf:
      hf_dir = self.workdir / "hf"
      ckpt_lib.export_hf(state, self.cfg, hf_dir)
      result.hf_dir = str(hf_dir)
      log.info("exported the final params to %s (HF layout)", hf_dir)
    if evaluate:
      ev = evaluate_synthetic(self.model, state, self.config)
      if ev is not None:
        result.evaluation = ev
        if self.lead:
          print(caption_report(ev) + "\n  " + "\n  ".join(ev["examples"]), flush=True)
        self.writer.write_scalars(result.step, {f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
    if self.config.data.source == "synthetic" and (result.evaluation or generation):
      summary = shapes_eval.eval_summary(result.evaluation, generation)
      summary["timing_s"] = self.meter.timing()
      result.evaluation = {**(result.evaluation or {}), **summary}
      if self.lead:
        shapes_eval.write_eval(self.workdir / "eval.json", summary)
        self.writer.write_scalars(result.step, {f"eval/{k}": v for k, v in generation.items()
                                                if isinstance(v, float)} if generation else {})

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()
    if self.own_preemption:
      self.preemption.close()


class _Throughput:
  """Steady-state step time, samples/s, tokens/s and MFU between log lines; the first step
  (compilation) is timed on its own."""

  def __init__(self, cfg: ModelConfig, trainable: str):
    self.cfg, self.trainable = cfg, trainable
    self.n_dev = jax.device_count()
    self.device_kind = jax.devices()[0].device_kind
    self.flops_per_sample: dict[tuple, float] = {}
    self.flops = self.tokens = self.samples = 0
    self.compile_time: Optional[float] = None
    self.step_seconds, self.steady_steps = 0.0, 0
    self.clock = _Clock()

  def count(self, host: dict) -> None:
    """Work of the batch about to run (global: this process's rows x process count)."""
    b, s = host["token_ids"].shape
    m = host["pixels"].shape[0]
    if (s, m) not in self.flops_per_sample:  # per global sample, at this bucket length and slots per sample
      self.flops_per_sample[(s, m)] = metrics_lib.flops_per_sample(self.cfg, s, self.cfg.vision.image_size, m / b,
                                                                   self.trainable)
    self.flops += self.flops_per_sample[(s, m)] * b * jax.process_count()
    self.tokens += int(np.sum(host["valid"])) * jax.process_count()
    self.samples += packing_lib.samples_in(host) * jax.process_count()  # packed rows hold several

  def stepped(self, metrics) -> None:
    self.clock.steps += 1
    if self.compile_time is None:  # the first step includes compilation: time it on its own
      jax.block_until_ready(metrics)
      self.compile_time, _ = self.clock.lap()
      self.flops = self.tokens = self.samples = 0

  def timing(self) -> dict[str, float]:
    """Seconds of the first step (compilation included) and of the steady steps so far."""
    return {"first_step_compile": round(self.compile_time or 0.0, 1), "steps": round(self.step_seconds, 1),
            "steady_steps": self.steady_steps}

  def lap(self) -> dict[str, float]:
    dt, n = self.clock.lap()
    self.step_seconds += dt
    self.steady_steps += n
    out = {}
    if n:
      out["step_time"] = dt / n
      out["samples_per_s"] = self.samples / dt
      out["tokens_per_s"] = self.tokens / dt
      util = metrics_lib.mfu(self.flops / dt, self.n_dev, self.device_kind)
      if util is not None:
        out["mfu"] = util
      out["tflops_per_device"] = self.flops / dt / self.n_dev / 1e12
    self.flops = self.tokens = self.samples = 0
    return out
