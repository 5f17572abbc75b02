"""A model ready for inference, from any of the three kinds of checkpoint, with ONE dtype policy.

Kinds: an HF checkpoint (the published layout: config.json + safetensors), an Orbax export (written by
`python -m cheers_jax.convert hf-to-orbax`) and a training run's workdir (its latest checkpoint); the
Orbax layouts are described in `cheers_jax.checkpoint.orbax`. Used by generate, parity, bench and
evaluate; `load_model` takes the source from the tools' --checkpoint / --orbax / --run flags.

The dtype policy (`inference_config`): parameters are cast to `dtype` and computation runs in it; in
bf16 the reference's inference casts are reproduced (reference_bf16_casts), in fp32 it computes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from cheers_jax.checkpoint import orbax as orbax_lib
from cheers_jax.checkpoint.hf import CheckpointError, abstract_variables, load_hf_checkpoint
from cheers_jax.checkpoint.safetensors_io import read_header
from cheers_jax.errors import UserError
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.config import ModelConfig

PathLike = Union[str, Path]
DTYPES = ("float32", "bfloat16")
GENERATION_HEAD = (
  "model.gen_projector.",
  "model.hi_gate.",
  "model.hi_projector.",
  "model.time_embed.",
  "model.vae_decoder_projector.",
  "model.vae_model.decoder.",
)


def default_dtype() -> str:
  """float32 on a CPU (exact, and bf16 is slow there), bfloat16 on GPU/TPU."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def inference_config(cfg: ModelConfig, dtype: str) -> ModelConfig:
  """The dtype policy: parameters and computation in `dtype`; the reference's casts in bf16."""
  if dtype not in DTYPES:
    raise UserError(f"dtype {dtype!r}: use one of {DTYPES}")
  return cfg.replace(dtype=dtype, param_dtype=dtype, reference_bf16_casts=(dtype == "bfloat16"))


def _ready(cfg: ModelConfig, variables: dict, dtype: str) -> tuple[Cheers, dict]:
  variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), variables)
  return Cheers(inference_config(cfg, dtype)), variables


# ---- HF -------------------------------------------------------------------------------------------
def _tensor_names(ckpt_dir: Path) -> Optional[set[str]]:
  """Tensor names of an HF checkpoint from its index or header only (None if unreadable)."""
  index = ckpt_dir / "model.safetensors.index.json"
  try:
    if index.is_file():
      return set(json.loads(index.read_text())["weight_map"])
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
      return set(read_header(single)[0])
  except Exception:  # the loader reports a broken checkpoint with its own, better message
    return None
  return None


def missing_generation_head(ckpt_dir: PathLike) -> list[str]:
  """Modules of the generation path with no tensor in the HF checkpoint."""
  names = _tensor_names(Path(ckpt_dir))
  if names is None:
    return []
  return [p.rstrip(".") for p in GENERATION_HEAD if not any(n.startswith(p) for n in names)]


def load_hf(ckpt_dir: PathLike, dtype: str, need_generation: bool = False) -> tuple[Cheers, dict]:
  path = Path(ckpt_dir)
  if not (path / "config.json").is_file():
    raise CheckpointError(
      f"{ckpt_dir}: no config.json there; give a Hugging Face Cheers checkpoint directory "
      "(config.json + model*.safetensors)"
    )
  if need_generation:
    missing = missing_generation_head(path)
    if missing:
      raise CheckpointError(
        f"checkpoint {ckpt_dir} has no generation head (no tensors for {', '.join(missing)}): "
        "it cannot make images; use a full Cheers checkpoint, or the chat/ask commands"
      )
  cfg, variables = load_hf_checkpoint(path, dtype=jnp.dtype(dtype))
  return Cheers(inference_config(cfg, dtype)), variables


# ---- Orbax export and training run ------------------------------------------------------------------
def load_orbax_export(ckpt_dir: PathLike, dtype: str) -> tuple[Cheers, dict]:
  if not orbax_lib.is_export(ckpt_dir):
    raise CheckpointError(
      f"{ckpt_dir}: expected an Orbax export with {orbax_lib.CONFIG_JSON} and "
      f"{orbax_lib.STATE_DIR}/ (write one with `python -m cheers_jax.convert hf-to-orbax`)"
    )
  cfg, variables = orbax_lib.load_export(ckpt_dir)
  return _ready(cfg, variables, dtype)


def load_run(workdir: PathLike, dtype: str) -> tuple[Cheers, dict]:
  """The params of a training workdir's latest checkpoint, with the run's own model config."""
  cfg, variables = orbax_lib.load_run_model(workdir)
  return _ready(cfg, variables, dtype)


def check_one_source(checkpoint, orbax, run) -> None:
  """Exactly one model source is given (checked before slow work, and by load_model)."""
  if sum(bool(s) for s in (checkpoint, orbax, run)) != 1:
    raise UserError("give exactly one of --checkpoint HF_DIR, --orbax ORBAX_EXPORT_DIR or --run TRAIN_WORKDIR")


def load_model(
  checkpoint: Optional[PathLike] = None,
  orbax: Optional[PathLike] = None,
  run: Optional[PathLike] = None,
  dtype: Optional[str] = None,
  need_generation: bool = False,
) -> tuple[Cheers, dict]:
  """The model from exactly one source: an HF checkpoint, an Orbax export or a training run's workdir;
  `dtype` None is `default_dtype()`. need_generation: an HF checkpoint must hold the generation head."""
  check_one_source(checkpoint, orbax, run)
  dtype = dtype or default_dtype()
  if checkpoint:
    return load_hf(checkpoint, dtype, need_generation)
  if orbax:
    return load_orbax_export(orbax, dtype)
  return load_run(run, dtype)


# ---- random weights (speed measurements) -------------------------------------------------------------
def fake_constant(path) -> Optional[float]:
  """The fake weights' one rule (random_variables here, train.synthetic's state): by the last key of a leaf's
  path, 1 for norm weights and BatchNorm variances, 0 for biases and BatchNorm means, None = drawn at random."""
  name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
  if name in ("weight", "scale", "running_var"):
    return 1.0
  if name.endswith("bias") or name == "running_mean":
    return 0.0
  return None


def random_variables(cfg: ModelConfig, key) -> dict:
  """Random weights of the right shapes, drawn in one small jitted program.

  Much faster than `init` (which compiles a whole forward pass); the values only need to be sane:
  norm weights and variances 1, biases and means 0, other tensors N(0, 1/fan_in).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_variables(cfg))
  sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
  offsets = np.cumsum([0] + sizes)

  def draw(key):
    # one normal draw sliced into every leaf: a single RNG op compiles in seconds, 500 take a minute
    pool = jax.random.normal(key, (int(offsets[-1]),), jnp.dtype(cfg.param_dtype))
    out = []
    for (path, leaf), start, size in zip(leaves, offsets, sizes):
      constant = fake_constant(path)
      if constant is not None:
        out.append(jnp.full(leaf.shape, constant, leaf.dtype))
      else:
        name = str(getattr(path[-1], "key", path[-1]))
        fan_in = int(np.prod(leaf.shape[:-1][-3:] if len(leaf.shape) == 4 else leaf.shape[-2:-1])) or 1
        std = 0.02 if name == "embed_tokens" else fan_in**-0.5
        out.append((std * pool[start : start + size].reshape(leaf.shape)).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  return jax.jit(draw)(key)


def load_random(cfg: ModelConfig, dtype: str, seed: int = 0) -> tuple[Cheers, dict]:
  cfg = inference_config(cfg, dtype)
  return Cheers(cfg), random_variables(cfg, jax.random.PRNGKey(seed))
