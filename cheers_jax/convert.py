"""Convert Cheers checkpoints between the published HF layout and Orbax.

  python -m cheers_jax.convert hf-to-orbax --hf HF_DIR --out ORBAX_DIR [--dtype float32]
  python -m cheers_jax.convert orbax-to-hf --orbax ORBAX_DIR --out HF_DIR [--dtype bfloat16]
  python -m cheers_jax.convert assemble --vae DIR --siglip DIR --llm DIR --config CONFIG --out HF_DIR
  python -m cheers_jax.convert split --hf HF_DIR --out PARTS_DIR

An Orbax checkpoint written here is a directory with `state/` (the Orbax StandardCheckpointer tree
{'params', 'batch_stats'}) and `model_config.json` (`ModelConfig.to_dict()`), so converting back
needs no other input. `orbax-to-hf` also writes the tokenizer files, preprocessor_config.json and
generation_config.json, so the HF directory is complete for our tools and, with the official modeling
files copied in, for the official evaluation.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from cheers_jax.checkpoint.hf import (DEFAULT_MAX_SHARD_BYTES, CheckpointError, load_hf_checkpoint,
                                      save_hf_checkpoint)
from cheers_jax.checkpoint import parts as parts_lib
from cheers_jax.checkpoint.support_files import write_support_files
from cheers_jax.model.config import ConfigError, ModelConfig

PathLike = Union[str, Path]
STATE_DIR = "state"
CONFIG_JSON = "model_config.json"


# ---- orbax ---------------------------------------------------------------------------------------
def save_orbax(variables: dict, cfg: ModelConfig, out_dir: PathLike, force: bool = False) -> Path:
  """Writes `out_dir/state` (Orbax) and `out_dir/model_config.json`; returns out_dir."""
  out_dir = Path(out_dir).absolute()  # orbax wants absolute paths
  out_dir.mkdir(parents=True, exist_ok=True)
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out_dir / STATE_DIR, state, force=force)
    ckptr.wait_until_finished()
  (out_dir / CONFIG_JSON).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
  return out_dir


def load_orbax(ckpt_dir: PathLike, sharding: Optional[jax.sharding.Sharding] = None) -> tuple[ModelConfig, dict]:
  """Reads what `save_orbax` wrote, in the stored dtypes, on `sharding` (default: first device)."""
  ckpt_dir = Path(ckpt_dir).absolute()
  cfg_path, state_path = ckpt_dir / CONFIG_JSON, ckpt_dir / STATE_DIR
  for p in (cfg_path, state_path):
    if not p.exists():
      raise CheckpointError(f"{p} not found: expected an Orbax checkpoint written by cheers_jax.convert "
                            f"(with {STATE_DIR}/ and {CONFIG_JSON})")
  cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(state_path).item_metadata
    meta = getattr(meta, "tree", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta)
    variables = ckptr.restore(state_path, target)
  return cfg, dict(variables)


# ---- CLI -----------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
  """'5GB', '500MB', '2GiB' or a byte count -> bytes (GB = 10**9 as in HF's max_shard_size)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
  if not m:
    raise argparse.ArgumentTypeError(f"bad size '{text}': use e.g. 5GB, 500MB or a number of bytes")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(float(m.group(1)) * scale)


def _prepare_out(out: Path, force: bool) -> None:
  if out.exists() and any(out.iterdir()):
    if not force:
      raise SystemExit(f"error: output directory {out} is not empty (pass --force to overwrite)")
    if (out / STATE_DIR).exists():
      shutil.rmtree(out / STATE_DIR)
    for p in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
      p.unlink()  # stale shards would survive next to a new index otherwise


def _hf_to_orbax(args: argparse.Namespace) -> None:
  out = Path(args.out)
  _prepare_out(out, args.force)
  cfg, variables = load_hf_checkpoint(args.hf, dtype=jnp.dtype(args.dtype))
  save_orbax(variables, cfg, out)
  print(f"wrote {out / STATE_DIR} and {out / CONFIG_JSON} ({args.dtype})")


def _orbax_to_hf(args: argparse.Namespace) -> None:
  out = Path(args.out)
  _prepare_out(out, args.force)
  cfg, variables = load_orbax(args.orbax)
  index = save_hf_checkpoint(variables, cfg, out, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                             store_lm_head=not args.no_lm_head)
  write_support_files(out, cfg)
  shards = len(set(index["weight_map"].values()))
  print(f"wrote {len(index['weight_map'])} tensors in {shards} shards "
        f"({index['metadata']['total_size']:,} bytes, {args.dtype}) to {out}, with the tokenizer, "
        "preprocessor_config.json and generation_config.json")


def _assemble(args: argparse.Namespace) -> None:
  parts = {p: getattr(args, p) for p in parts_lib.PARTS if getattr(args, p)}
  cfg = parts_lib.read_model_config(args.config)
  out = Path(args.out)
  _prepare_out(out, args.force)
  index = parts_lib.assemble_hf_checkpoint(parts, cfg, out, seed=args.seed, dtype=args.dtype,
                                           max_shard_bytes=args.max_shard_size)
  write_support_files(out, cfg)
  random = [p for p in parts_lib.PARTS if p not in parts]
  print(f"wrote {len(index['weight_map'])} tensors ({args.dtype}) to {out}: parts {', '.join(parts) or 'none'}"
        f"; random (seed {args.seed}): head modules{''.join(', ' + p for p in random)}")


def _split(args: argparse.Namespace) -> None:
  out = Path(args.out)
  if out.exists() and any(out.iterdir()):
    if not args.force:
      raise SystemExit(f"error: output directory {out} is not empty (pass --force to overwrite)")
    for part in parts_lib.PARTS:  # stale shards would survive next to a new index otherwise
      shutil.rmtree(out / part, ignore_errors=True)
  written = parts_lib.split_hf_checkpoint(args.hf, out, max_shard_bytes=args.max_shard_size)
  print("wrote " + ", ".join(f"{part} to {path}" for part, path in written.items()))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m cheers_jax.convert", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  a = sub.add_parser("hf-to-orbax", help="HF safetensors checkpoint -> Orbax checkpoint",
                     description="Load an HF-layout Cheers checkpoint (config.json + safetensors shards) "
                                 "and write it as an Orbax checkpoint with its model config.")
  a.add_argument("--hf", required=True, metavar="DIR", help="HF checkpoint directory (config.json, "
                 "model.safetensors.index.json + shards, or model.safetensors)")
  a.add_argument("--out", required=True, metavar="DIR", help="output directory (gets state/ and "
                 f"{CONFIG_JSON})")
  a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="dtype of the stored arrays (default: float32, exact for bf16 checkpoints)")
  a.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
  a.set_defaults(run=_hf_to_orbax)

  b = sub.add_parser("orbax-to-hf", help="Orbax checkpoint -> HF safetensors checkpoint",
                     description="Load an Orbax checkpoint written by hf-to-orbax (or by training, in "
                                 "the same layout) and export config.json, sharded safetensors and the "
                                 "index in the published checkpoint's layout.")
  b.add_argument("--orbax", required=True, metavar="DIR", help=f"directory with state/ and {CONFIG_JSON}")
  b.add_argument("--out", required=True, metavar="DIR", help="output HF checkpoint directory")
  b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                 help="storage dtype of the floating tensors (default: bfloat16, as published)")
  b.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                 help="largest shard, e.g. 5GB (default) or 500MB; GB = 10^9 bytes as in HF")
  b.add_argument("--no-lm-head", action="store_true",
                 help="with tied embeddings, do not store lm_head.weight (the published checkpoint "
                      "stores it as a copy of embed_tokens)")
  b.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
  b.set_defaults(run=_orbax_to_hf)

  c = sub.add_parser("assemble", help="pretrained parts (VAE, SigLIP2, Qwen2.5) -> HF Cheers checkpoint",
                     description="Write a Cheers checkpoint from pretrained parts, as the paper's stage 1 "
                                 "starts: the FLUX.2 VAE (into vae_model and vae_decoder_projector), "
                                 "SigLIP2's vision tower, Qwen2.5; any part left out and the head modules "
                                 "are random. Names, shapes and each part's config.json are checked against "
                                 "CONFIG.")
  c.add_argument("--vae", metavar="DIR", help="FLUX.2 VAE in the layout Cheers embeds (encoder.*, decoder.*, "
                 "bn.*): *.safetensors, optional config.json")
  c.add_argument("--siglip", metavar="DIR", help="SigLIP2 in Hugging Face layout (vision_model.*; the text "
                 "tower is ignored) with its config.json")
  c.add_argument("--llm", metavar="DIR", help="Qwen2.5 in Hugging Face layout (model.*, lm_head.weight) with "
                 "its config.json")
  c.add_argument("--config", required=True, metavar="CONFIG", help="the model's shapes: a configs/*.py file or "
                 "a Cheers config.json (or its directory)")
  c.add_argument("--out", required=True, metavar="DIR", help="output HF checkpoint directory")
  c.add_argument("--seed", type=int, default=0, help="seed of the random modules, as config.seed in training "
                 "(default: 0)")
  c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                 help="storage dtype (default: bfloat16, as published; exact for bf16 parts)")
  c.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                 help="largest shard, e.g. 5GB (default) or 500MB")
  c.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
  c.set_defaults(run=_assemble)

  d = sub.add_parser("split", help="HF Cheers checkpoint -> the parts' layouts (vae/, siglip/, llm/)",
                     description="Write the VAE (vae_model's copy), SigLIP2 vision tower and Qwen2.5 of a Cheers "
                                 "checkpoint in the layouts `assemble` and init_from=parts: read, bit for bit.")
  d.add_argument("--hf", required=True, metavar="DIR", help="HF Cheers checkpoint directory")
  d.add_argument("--out", required=True, metavar="DIR", help="output directory (gets vae/, siglip/, llm/)")
  d.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                 help="largest shard of the LLM part (default 5GB)")
  d.add_argument("--force", action="store_true", help="write into a non-empty output directory")
  d.set_defaults(run=_split)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.run(args)
  except (CheckpointError, ConfigError) as e:  # the user's input: one line, no traceback
    print("error: " + "; ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
