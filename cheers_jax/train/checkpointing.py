"""A training run's checkpoints: save every N steps, resume, SIGTERM, the final HF export.

The workdir's layout (checkpoints/<step>/{state, data, config}, hf/) is described, with the other
Orbax layout, in `cheers_jax.checkpoint.orbax`, which also reads a run's params for `init_from`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cheers_jax import config as config_lib
from cheers_jax.checkpoint.hf import save_hf_checkpoint
from cheers_jax.checkpoint.orbax import CHECKPOINT_DIR, RUN_ITEMS
from cheers_jax.checkpoint.support_files import write_support_files
from cheers_jax.errors import ConfigError
from cheers_jax.model.config import ModelConfig, describe_differences, differences
from cheers_jax.train import state as state_lib

PyTree = Any


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir) / CHECKPOINT_DIR


def config_json(config) -> dict:
  """ConfigDict -> JSON-able dict (tuples become lists)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def encode_iterator_state(state: Any) -> dict:
  """grain DataLoader iterators return JSON bytes, dataset iterators a dict: store either."""
  if state is None:
    return {"kind": "none"}
  if isinstance(state, (bytes, bytearray)):
    return {"kind": "bytes", "value": bytes(state).decode("utf-8")}
  if isinstance(state, str):
    return {"kind": "str", "value": state}
  return {"kind": "json", "value": state}


def decode_iterator_state(stored: Mapping[str, Any]) -> Any:
  kind = stored.get("kind")
  if kind == "bytes":
    return stored["value"].encode("utf-8")
  if kind in ("str", "json"):
    return stored["value"]
  return None


class Checkpointer:
  """A CheckpointManager saving {state, data, config} every `every_steps` steps, keeping `keep`."""

  def __init__(self, workdir: str | Path, every_steps: int = 1000, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, int(every_steps)),
      max_to_keep=int(keep) if keep else None,
      enable_async_checkpointing=bool(async_save),
      create=True,
      cleanup_tmp_directories=True,
    )
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options, item_names=RUN_ITEMS)

  @classmethod
  def from_config(cls, workdir: str | Path, config) -> "Checkpointer":
    c = config.checkpoint
    return cls(workdir, c.every_steps, c.keep, c.async_save)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: PyTree, iterator_state: Any = None, config=None, force: bool = False) -> bool:
    """Starts a (possibly async) save; device arrays are copied before this returns, so the
    caller may donate `state` to the next step right away."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(encode_iterator_state(iterator_state)),
      config=ocp.args.JsonSave(config_json(config) if config is not None else {}),
    )
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state: PyTree, shardings: PyTree, step: Optional[int] = None) -> tuple[PyTree, Any, dict]:
    """(state placed in `shardings`, iterator state, config dict) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
      ),
    )
    return out.state, decode_iterator_state(out.data or {}), out.config or {}

  def saved_config(self, step: int) -> dict:
    """The run config stored with checkpoint `step` (read alone: no array is touched)."""
    out = self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(out.config or {})

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: JAX's preemption sync point (all hosts agree on the step)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_or_init(
  config, workdir: str | Path, mesh, rng=None, iterator=None, checkpointer: Optional[Checkpointer] = None
):
  """Resume from the latest checkpoint in `workdir` (state + iterator position) or start fresh
  (`config.init_from`). Returns (state, state_shardings, resumed: bool)."""
  checkpointer = checkpointer or Checkpointer.from_config(workdir, config)
  latest = checkpointer.latest_step()
  if latest is None:
    init_from = config.get("init_from", "")
    state, shardings = state_lib.init_train_state(config, mesh, rng, init_from)
    count = int(config.train.get("calibrate_latent_norm", 0))
    if count > 0 and state_lib.vae_is_random(init_from):  # a checkpoint or a VAE part brings its own statistics
      images = state_lib.calibration_images(config, count)
      state = state_lib.calibrate_latent_norm(config, state, shardings, images)
      short = f" (of the {count} asked: the first samples held no more)" if len(images) < count else ""
      logging.info("latent BN statistics of the random VAE calibrated on %d training images%s", len(images), short)
    return state, shardings, False
  where = checkpointer.directory / str(latest)
  check_resumable(config, checkpointer.saved_config(latest), where)  # before any array is restored
  abstract, shardings = state_lib.abstract_train_state(config, mesh)
  state, data_state, saved_config = checkpointer.restore(abstract, shardings, latest)
  _check_model_config(config, saved_config, where)
  if iterator is not None and data_state is not None:
    iterator.set_state(data_state)
  logging.info("resumed from %s at step %d", checkpointer.directory, latest)
  return state, shardings, True


# train keys that shape the stored state (the optimizer state's tree and dtypes)
STATE_TRAIN_KEYS = ("trainable", "opt_state_dtype", "lr_multipliers")


def check_resumable(config, saved: Mapping[str, Any], where: Path) -> None:
  """A checkpoint restores only into the state of the model (and optimizer) it was saved from: any
  difference that changes the stored arrays is a ConfigError naming the fields, in one paragraph."""
  if not saved or "model" not in saved:
    return
  try:
    then = ModelConfig.from_dict(saved["model"])
  except (ConfigError, TypeError, ValueError):  # a config this version cannot read: leave it to the restore
    return
  now = config_lib.model_config(config)
  ignore = tuple(k for k in state_lib.NOT_ARCHITECTURE if k != "scan_layers")  # scanning changes the tree
  diffs = [(f"model.{k}", a, b) for k, a, b in differences(now, then, ignore=ignore)]
  saved_train, train = saved.get("train", {}), config_json(config).get("train", {})
  diffs += [
    (f"train.{k}", train.get(k), saved_train[k])
    for k in STATE_TRAIN_KEYS
    if k in saved_train and train.get(k) != saved_train[k]
  ]
  if diffs:
    raise ConfigError(
      f"cannot resume from {where}: the checkpoint was saved with another config in {len(diffs)} field(s): "
      f"{describe_differences(diffs, 'now', 'checkpoint')}. Resume with the config the run was started with "
      f"(e.g. {' '.join(f'--config.{k}={b}' for k, _, b in diffs[:3])}), or start a new run in another --workdir"
    )


def _check_model_config(config, saved: Mapping[str, Any], where: Path) -> None:
  if not saved or "model" not in saved:
    return
  now, then = config_json(config).get("model"), saved["model"]
  if now != then:
    logging.warning(
      "the model config of %s differs from the current one:\n  saved   %s\n  current %s", where, then, now
    )


# ---- preemption ----------------------------------------------------------------------------------
class PreemptionHandler:
  """SIGTERM (and SIGINT on request) set a flag; the loop saves at the next step boundary and exits.

  Only the main thread may install signal handlers; elsewhere this is a no-op flag.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    self.signal_name: Optional[str] = None
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    self.signal_name = signal.Signals(signum).name
    logging.warning("received %s: saving a checkpoint at the next step boundary, then exiting", self.signal_name)
    self._event.set()

  def request(self) -> None:
    """Simulate a preemption (tests)."""
    self.signal_name = self.signal_name or "request"
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


# ---- export --------------------------------------------------------------------------------------
def export_hf(state, model_cfg, out_dir: str | Path, dtype: Any = "bfloat16") -> dict:
  """Writes the state's params + BN statistics in the published HF layout (config.json + safetensors,
  the tokenizer files, preprocessor_config.json and generation_config.json).

  Runs on every process (arrays are gathered leaf by leaf) but only process 0 writes.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if jax.process_count() > 1:  # make every leaf fully addressable on this process
    variables = multihost_utils.process_allgather(variables, tiled=True)
  if jax.process_index() != 0:
    return {}
  index = save_hf_checkpoint(variables, model_cfg, out_dir, dtype=dtype)
  write_support_files(out_dir, model_cfg)  # tokenizer + processor and generation config files: a self-contained export
  return index
