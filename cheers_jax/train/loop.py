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
import difflib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from cheers_jax import sharding
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.config import ConfigError, ModelConfig
from cheers_jax.train import checkpointing as ckpt_lib
from cheers_jax.train import metrics as metrics_lib
from cheers_jax.train import step as step_lib

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")


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


# ---- config checks ---------------------------------------------------------------------------------
def _reference_keys() -> Optional[Any]:
  try:
    from configs import common
  except ImportError:  # installed package without the configs folder
    return None
  return common.base_config()


def check_config(config) -> ModelConfig:
  """Fails early, with a suggestion, on misspelt keys and inconsistent values."""
  ref = _reference_keys()
  if ref is not None:
    # data.* is the pipeline's (it accepts optional extras such as data.num_threads)
    for section in ("", "train", "checkpoint", "mesh"):
      have = config if not section else config.get(section)
      want = ref if not section else ref.get(section)
      if have is None or want is None:
        continue
      for key in have.keys():
        if key not in want and key not in ("export_hf",):
          where = f"{section}.{key}" if section else key
          close = difflib.get_close_matches(key, list(want.keys()), n=1)
          hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(want.keys()))}"
          raise ConfigError(f"unknown config key '{where}'{hint}")
  cfg = ModelConfig.from_dict(config.model)
  t = config.train
  if t.nan_policy not in NAN_POLICIES:
    raise ConfigError(f"train.nan_policy='{t.nan_policy}': choose one of {NAN_POLICIES}")
  if t.batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {jax.process_count()} processes")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  if int(config.data.image_size) != cfg.vision.image_size:
    raise ConfigError(f"data.image_size={config.data.image_size} but model.vision.image_size="
                      f"{cfg.vision.image_size}; set both")
  return cfg


# ---- helpers ---------------------------------------------------------------------------------------
def _default_iterator(config) -> Iterator[dict]:
  from cheers_jax.data.pipeline import make_train_iterator
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


def save_image_grid(images: np.ndarray, path: Path) -> None:
  """(N, H, W, 3) in [0, 1] -> one row PNG."""
  from PIL import Image
  row = np.concatenate(list(np.clip(images, 0.0, 1.0)), axis=1)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray((row * 255.0 + 0.5).astype(np.uint8)).save(path)


def sample_images(model: Cheers, state, config, workdir: Path, step: int,
                  writer: Optional[metrics_lib.MetricWriter] = None) -> Optional[Path]:
  """T2I samples of config.sample_prompts as a PNG row (+ TensorBoard); None if t2i is unavailable."""
  prompts = list(config.get("sample_prompts", ()) or ())
  if not prompts:
    return None
  try:
    from cheers_jax.data.sources import T2I_PROMPT
    from cheers_jax.data.tokenizer import CheersTokenizer
    from cheers_jax.infer.t2i import t2i_prompt, text_to_image
  except ImportError as e:
    log.info("no sample images: %s", e)
    return None
  tok = CheersTokenizer()
  ids = [t2i_prompt(tok, T2I_PROMPT.format(caption=p)) for p in prompts]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  out = text_to_image(model, variables, ids, steps=int(config.sample_steps), cfg_scale=float(config.sample_cfg),
                      seeds=list(range(len(ids))))
  path = workdir / "samples" / f"step_{step:07d}.png"
  if jax.process_index() == 0:
    save_image_grid(np.asarray(out.images), path)
    if writer is not None:
      writer.write_images(step, {"samples": np.asarray(out.images)})
  return path


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

  iterator: batches in the pipeline's contract with get_state()/set_state() (default: the grain
  pipeline). preemption: a PreemptionHandler (default: one that catches SIGTERM).
  export_hf: write workdir/hf at the end (default: config.export_hf if present, else True).
  """
  workdir = Path(workdir)
  cfg = check_config(config)
  t = config.train
  lead = jax.process_index() == 0
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(dict(config.mesh))
  model = Cheers(cfg)
  iterator = iterator if iterator is not None else _default_iterator(config)
  checkpointer = ckpt_lib.Checkpointer.from_config(workdir, config)
  own_handler = preemption is None
  preemption = preemption or ckpt_lib.PreemptionHandler()
  writer = metrics_lib.MetricWriter(workdir, enabled=lead)

  try:
    state, shardings, resumed = ckpt_lib.restore_or_init(
        config, workdir, mesh, jax.random.PRNGKey(int(config.seed)), iterator, checkpointer)
    start = int(jax.device_get(state.step))
    total = int(t.steps)
    log.info("%s at step %d of %d; mesh %s; %d devices (%s)", "resumed" if resumed else "starting", start, total,
             dict(mesh.shape), jax.device_count(), jax.devices()[0].device_kind)
    step_fn = step_lib.make_train_step(model, config, mesh, shardings)
    result = _run(config, cfg, model, state, step_fn, iterator, checkpointer, preemption, writer, workdir,
                  mesh, start, total, progress and lead, samples)
    if result.status != "done":
      return result
    state = result.state
    if samples:  # every process: the sampler is SPMD over the global params
      sample_images(model, state, config, workdir, result.step, writer)
    do_export = export_hf if export_hf is not None else bool(config.get("export_hf", True))
    if do_export:
      hf_dir = workdir / "hf"
      ckpt_lib.export_hf(state, cfg, hf_dir)
      result.hf_dir = str(hf_dir)
      log.info("exported the final params to %s (HF layout)", hf_dir)
    if evaluate:
      ev = evaluate_synthetic(model, state, config)
      if ev is not None:
        result.evaluation = ev
        report = caption_report(ev)
        if lead:
          print(report + "\n  " + "\n  ".join(ev["examples"]), flush=True)
        writer.write_scalars(result.step, {f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
    return result
  finally:
    checkpointer.close()
    writer.close()
    if own_handler:
      preemption.close()


def _run(config, cfg: ModelConfig, model: Cheers, state, step_fn: Callable, iterator, checkpointer, preemption,
         writer, workdir: Path, mesh, start: int, total: int, show_progress: bool, samples: bool) -> TrainResult:
  t = config.train
  log_every = max(1, int(config.log_every))
  sample_every = int(config.get("sample_every", 0) or 0)
  every = max(1, int(config.checkpoint.every_steps))
  batch_shardings = None
  pending: list[tuple[int, dict]] = []  # (step number after the update, device metrics)
  last_summary: dict = {}
  seen_tokens = 0
  seen_samples = 0
  skipped_samples = 0
  n_dev = jax.device_count()
  device_kind = jax.devices()[0].device_kind
  flops_cache: dict[tuple, float] = {}
  step_flops = 0.0
  compile_time = None
  clock = _Clock()

  bar = None
  if show_progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, smoothing=0.1)

  def check_pending() -> list[tuple[int, dict]]:
    """ONE device_get of the metrics since the last check; stops on non-finite values if asked."""
    nonlocal pending
    fetched = [(s, m) for s, m in zip([s for s, _ in pending], jax.device_get([m for _, m in pending]))]
    pending = []
    bad = _first_nonfinite(fetched)
    if bad is not None and t.nan_policy == "stop":
      last = checkpointer.latest_step()
      raise NonFiniteError(
          f"non-finite loss or gradient at step {bad} (train.nan_policy='stop'); the params were not updated "
          f"at that step and no checkpoint was written after it. Last good checkpoint: "
          f"{'step ' + str(last) if last is not None else 'none'} in {checkpointer.directory}. Lower train.lr, "
          f"check the data, or set --config.train.nan_policy=skip to skip such steps.")
    return fetched

  step = start
  try:
    while step < total:
      if preemption.requested or checkpointer.reached_preemption(step):
        if pending:
          check_pending()
        if checkpointer.latest_step() != step:
          checkpointer.save(step, state, iterator.get_state(), config, force=True)
        checkpointer.wait()
        log.warning("preempted (%s): saved step %d in %s; rerun the same command to resume",
                    preemption.signal_name, step, checkpointer.directory)
        return TrainResult("preempted", step, state, last_summary)

      batch = next(iterator)
      skipped_samples = int(batch.get("num_skipped", skipped_samples))
      host = {k: v for k, v in batch.items() if k not in step_lib.HOST_ONLY_KEYS and not k.startswith("_")}
      if batch_shardings is None:
        batch_shardings = step_lib.batch_shardings(mesh, host)
      b, s = host["token_ids"].shape
      m = host["pixels"].shape[0]
      key = (s, m)
      if key not in flops_cache:  # per global sample, at this bucket length and slots per sample
        flops_cache[key] = metrics_lib.flops_per_sample(cfg, s, cfg.vision.image_size, m / b, t.trainable)
      step_flops += flops_cache[key] * b * jax.process_count()
      seen_tokens += int(np.sum(host["valid"])) * jax.process_count()
      seen_samples += b * jax.process_count()

      state, metrics = step_fn(state, step_lib.device_batch(host, batch_shardings))
      step += 1
      pending.append((step, metrics))
      clock.steps += 1

      if compile_time is None:  # the first step includes compilation: time it on its own
        jax.block_until_ready(metrics)
        compile_time, _ = clock.lap()
        step_flops = seen_tokens = seen_samples = 0
      if bar is not None:
        bar.update(1)

      if step % log_every == 0 or step == total:
        fetched = check_pending()
        summary = _summarise(fetched)
        dt, n = clock.lap()
        if n:
          summary["step_time"] = dt / n
          summary["samples_per_s"] = seen_samples / dt
          summary["tokens_per_s"] = seen_tokens / dt
          util = metrics_lib.mfu(step_flops / dt, n_dev, device_kind)
          if util is not None:
            summary["mfu"] = util
          summary["tflops_per_device"] = step_flops / dt / n_dev / 1e12
        step_flops = seen_tokens = seen_samples = 0
        summary["skipped_samples"] = skipped_samples
        if not last_summary and compile_time is not None:
          summary["compile_time"] = compile_time  # first log of this run
        writer.write_scalars(step, summary)
        last_summary = summary
        if bar is not None:
          bar.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{summary['lr']:.2e}",
                          mfu=f"{summary['mfu']:.1%}" if "mfu" in summary else "n/a")

      if (step % every == 0 or step == total) and checkpointer.latest_step() != step:
        if pending:
          check_pending()  # never checkpoint past a non-finite step under 'stop'
        checkpointer.save(step, state, iterator.get_state(), config, force=True)

      if samples and sample_every and step % sample_every == 0 and step != total:
        sample_images(model, state, config, workdir, step, writer)
  finally:
    if bar is not None:
      bar.close()
  if pending:
    check_pending()
  checkpointer.wait()
  return TrainResult("done", step, state, last_summary)
