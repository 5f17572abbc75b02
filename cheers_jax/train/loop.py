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
  workdir/hf, and on the shapes demo (`data.source='synthetic'`) its evaluation (`demo.evaluate.run`).
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
from cheers_jax.data import sources
from cheers_jax.data.pipeline import make_train_iterator
from cheers_jax.demo import evaluate as demo_eval
from cheers_jax.infer import images as images_lib
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.config import ModelConfig
from cheers_jax.train import checkpointing as ckpt_lib
from cheers_jax.train import metrics as metrics_lib
from cheers_jax.train import batching
from cheers_jax.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """The loss or the gradient became NaN/Inf under nan_policy='stop'."""


@dataclasses.dataclass
class TrainResult:
  status: str  # 'done' | 'preempted'
  step: int  # steps completed
  state: Any = None  # the final TrainState (device arrays)
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


def sample_prompt_texts(config, captions: list[str]) -> list[str]:
  """The T2I prompt texts of `captions` in the training data's form (the shapes demo's: in capitals)."""
  form = sources.shapes_prompt if demo_eval.trains_on_shapes(config) else sources.T2I_PROMPT.format
  return [form(caption=c) for c in captions]


def sample_images(
  model: Cheers, state, config, workdir: Path, step: int, writer: Optional[metrics_lib.MetricWriter] = None
) -> Optional[Path]:
  """T2I samples of config.sample_prompts as a PNG row (+ TensorBoard); None without prompts."""
  prompts = list(config.get("sample_prompts", ()) or ())
  if not prompts:
    return None
  images = demo_eval.draw(model, state, config, sample_prompt_texts(config, prompts))
  path = workdir / "samples" / f"step_{step:07d}.png"
  if jax.process_index() == 0:
    images_lib.save_png(images_lib.make_grid(images_lib.to_uint8(images), columns=len(images), pad=0), path)
    if writer is not None:
      writer.write_images(step, {"samples": images})
  return path


# ---- the loop --------------------------------------------------------------------------------------
def train(
  config,
  workdir: str | os.PathLike,
  *,
  iterator: Optional[Iterator[dict]] = None,
  preemption: Optional[ckpt_lib.PreemptionHandler] = None,
  export_hf: Optional[bool] = None,
  evaluate: bool = True,
  samples: bool = True,
  progress: bool = True,
) -> TrainResult:
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
  preempted, fetch a batch, step, log, checkpoint, sample), `finish` (samples, HF export, the
  demo's evaluation), `close`."""

  def __init__(
    self,
    config,
    workdir: str | os.PathLike,
    *,
    iterator: Optional[Iterator[dict]] = None,
    preemption: Optional[ckpt_lib.PreemptionHandler] = None,
    samples: bool = True,
    progress: bool = True,
  ):
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
      config, self.workdir, mesh, jax.random.PRNGKey(int(config.seed)), self.iterator, self.checkpointer
    )
    self.step = int(jax.device_get(self.state.step))
    replayed = self.writer.drop_after(self.step)  # the steps after the checkpoint run again
    if replayed:
      log.info("dropped %d metrics.jsonl rows after step %d (those steps run again)", replayed, self.step)
    log.info(
      "%s at step %d of %d; mesh %s; %d devices (%s)",
      "resumed" if resumed else "starting",
      self.step,
      self.total,
      dict(mesh.shape),
      jax.device_count(),
      jax.devices()[0].device_kind,
    )
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
        f"check the data, or set --config.train.nan_policy=skip to skip such steps."
      )
    return fetched

  def _log_metrics(self, bar) -> None:
    summary = {**_summarise(self._fetch_metrics()), **self.meter.lap()}
    summary["skipped_samples"] = self.skipped_samples
    if not self.last_summary and self.meter.compile_time is not None:
      summary["compile_time"] = self.meter.compile_time  # first log of this run
    self.writer.write_scalars(self.step, summary)
    self.last_summary = summary
    if bar is not None:
      bar.set_postfix(
        loss=f"{summary['loss']:.4f}",
        lr=f"{summary['lr']:.2e}",
        mfu=f"{summary['mfu']:.1%}" if "mfu" in summary else "n/a",
      )

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
    log.warning(
      "preempted (%s): saved step %d in %s; rerun the same command to resume",
      self.preemption.signal_name,
      self.step,
      self.checkpointer.directory,
    )
    return TrainResult("preempted", self.step, self.state, self.last_summary)

  # -- phase 3 --
  def finish(self, result: TrainResult, *, export_hf: bool, evaluate: bool) -> None:
    """Samples, the HF export and, on the shapes demo, its evaluation (every process: the samplers are
    SPMD over the global params)."""
    state = result.state
    demo = demo_eval.trains_on_shapes(self.config)
    if self.samples and not demo:
      sample_images(self.model, state, self.config, self.workdir, result.step, self.writer)
    if export_hf:
      hf_dir = self.workdir / "hf"
      ckpt_lib.export_hf(state, self.cfg, hf_dir)
      result.hf_dir = str(hf_dir)
      log.info("exported the final params to %s (HF layout)", hf_dir)
    if demo and (self.samples or evaluate):
      result.evaluation = demo_eval.run(
        self.model,
        state,
        self.config,
        self.workdir,
        result.step,
        self.writer,
        captions=evaluate,
        generation=self.samples,
        timing=self.meter.timing(),
      )

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
      self.flops_per_sample[(s, m)] = metrics_lib.flops_per_sample(
        self.cfg, s, self.cfg.vision.image_size, m / b, self.trainable
      )
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
    return {
      "first_step_compile": round(self.compile_time or 0.0, 1),
      "steps": round(self.step_seconds, 1),
      "steady_steps": self.steady_steps,
    }

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
