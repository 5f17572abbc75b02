"""Orbax checkpoints on disk: the two layouts this project writes, and reading their params.

1. An EXPORT (`python -m cheers_jax.convert hf-to-orbax`, read by `generate --orbax`):
     DIR/state/               Orbax StandardCheckpointer tree {'params', 'batch_stats'}
     DIR/model_config.json    ModelConfig.to_dict(): converting back needs no other input
2. A TRAINING RUN's workdir (`python -m cheers_jax.train`, read by `init_from=orbax:DIR`,
   `generate --run` and `convert orbax-to-hf`):
     WORKDIR/checkpoints/<step>/state    the whole TrainState (params, BN statistics, optimizer state,
                                         step, rng), restored straight into its shardings
     WORKDIR/checkpoints/<step>/data     the data iterator's state (JSON): a resumed run goes on with
                                         the next sample
     WORKDIR/checkpoints/<step>/config   the run's ConfigDict as JSON (for humans and tools)
     WORKDIR/hf/                         the final export in the published HF layout
   written by `cheers_jax.train.checkpointing.Checkpointer` (async, keeps the last K).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import jax
import orbax.checkpoint as ocp

from cheers_jax.checkpoint.hf import CheckpointError
from cheers_jax.checkpoint.hf import abstract_variables
from cheers_jax.model.config import ModelConfig

PathLike = Union[str, Path]
PyTree = Any

# 1. export
STATE_DIR = "state"
CONFIG_JSON = "model_config.json"
# 2. training run
CHECKPOINT_DIR = "checkpoints"
RUN_ITEMS = ("state", "data", "config")


# ---- 1. export ------------------------------------------------------------------------------------
def save_export(variables: dict, cfg: ModelConfig, out_dir: PathLike, force: bool = False) -> Path:
  """Writes `out_dir/state` (Orbax) and `out_dir/model_config.json`; returns out_dir."""
  out_dir = Path(out_dir).absolute()  # orbax wants absolute paths
  out_dir.mkdir(parents=True, exist_ok=True)
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir / STATE_DIR, state, force=force)
    ckptr.wait_until_finished()
  (out_dir / CONFIG_JSON).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
  return out_dir


def is_export(path: PathLike) -> bool:
  path = Path(path)
  return (path / CONFIG_JSON).is_file() and (path / STATE_DIR).is_dir()


def load_export(ckpt_dir: PathLike, sharding: Optional[jax.sharding.Sharding] = None) -> tuple[ModelConfig, dict]:
  """Reads what `save_export` wrote, in the stored dtypes, on `sharding` (default: first device)."""
  ckpt_dir = Path(ckpt_dir).absolute()
  cfg_path, state_path = ckpt_dir / CONFIG_JSON, ckpt_dir / STATE_DIR
  for p in (cfg_path, state_path):
    if not p.exists():
      raise CheckpointError(
        f"{p} not found: expected an Orbax export written by cheers_jax.convert (with {STATE_DIR}/ and {CONFIG_JSON})"
      )
  cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(state_path).item_metadata
    meta = getattr(meta, "tree", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    variables = ckptr.restore(state_path, target)
  return cfg, dict(variables)


# ---- 2. training run ------------------------------------------------------------------------------
def run_checkpoint_dir(workdir: PathLike) -> Path:
  """WORKDIR/checkpoints; `workdir` may also be that folder itself."""
  directory = Path(workdir)
  if directory.name == CHECKPOINT_DIR:
    return directory
  if not (directory / CHECKPOINT_DIR).is_dir():
    raise CheckpointError(
      f"{directory} has no {CHECKPOINT_DIR}/ folder: expected a training workdir "
      "(written by python -m cheers_jax.train)"
    )
  return directory / CHECKPOINT_DIR


def _restore_run(workdir: PathLike, step: Optional[int], args: Callable[[], Any]) -> tuple[int, Any]:
  """(step, restored items) of a training workdir's checkpoint `step` (default: the latest)."""
  directory = run_checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(
    directory.absolute(), item_names=RUN_ITEMS, options=ocp.CheckpointManagerOptions(read_only=True)
  )
  try:
    if step is not None and step not in manager.all_steps():
      raise CheckpointError(f"no checkpoint of step {step} in {directory} (steps: {sorted(manager.all_steps())})")
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {directory}")
    return step, manager.restore(step, args=args())
  finally:
    manager.close()


def load_run_config(workdir: PathLike, step: Optional[int] = None) -> tuple[int, dict]:
  """(step, the run's config as a dict) of a training workdir's latest (or given) checkpoint."""
  step, out = _restore_run(workdir, step, lambda: ocp.args.Composite(config=ocp.args.JsonRestore()))
  return step, dict(out.config or {})


def run_step_dir(path: PathLike) -> tuple[Path, Optional[int]]:
  """(workdir, step) of a training workdir, its checkpoints/ folder (latest step: None) or one step's
  folder WORKDIR/checkpoints/STEP."""
  path = Path(path)
  if path.name.isdigit() and path.parent.name == CHECKPOINT_DIR:
    return path.parent, int(path.name)
  return path, None


def is_run(path: PathLike) -> bool:
  workdir, _ = run_step_dir(path)
  return workdir.name == CHECKPOINT_DIR and workdir.is_dir() or (workdir / CHECKPOINT_DIR).is_dir()


def load_run_model(path: PathLike) -> tuple[ModelConfig, dict]:
  """(the run's ModelConfig, {'params', 'batch_stats'} in their stored dtypes on the first device) of a
  training workdir's latest checkpoint (or of WORKDIR/checkpoints/STEP); no optimizer state is read."""
  workdir, step = run_step_dir(path)
  step, saved = load_run_config(workdir, step)
  if "model" not in saved:
    raise CheckpointError(f"{workdir}: the checkpoint of step {step} does not record the run's config")
  cfg = ModelConfig.from_dict(saved["model"])
  abstract = abstract_variables(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return cfg, load_run_variables(workdir, abstract, jax.tree.map(lambda _: device, abstract), step)


def load_run_variables(
  workdir: PathLike,
  abstract_variables: Mapping[str, PyTree],
  shardings: Mapping[str, PyTree],
  step: Optional[int] = None,
) -> dict:
  """{'params', 'batch_stats'} of a training workdir's latest (or given) checkpoint, placed in
  `shardings`; no optimizer state is read."""
  target = {
    k: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_variables[k], shardings[k]
    )
    for k in ("params", "batch_stats")
  }
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
  _, out = _restore_run(
    workdir,
    step,
    lambda: ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    ),
  )
  return {"params": out.state["params"], "batch_stats": out.state["batch_stats"]}
