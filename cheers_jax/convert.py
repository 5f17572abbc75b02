"""Convert Cheers checkpoints between the published HF layout and Orbax.

  python -m cheers_jax.convert hf-to-orbax --hf HF_DIR --out ORBAX_DIR [--dtype float32]
  python -m cheers_jax.convert orbax-to-hf --orbax ORBAX_DIR|TRAIN_WORKDIR --out HF_DIR [--dtype bfloat16]
  python -m cheers_jax.convert assemble --vae DIR --siglip DIR --llm DIR --config CONFIG --out HF_DIR
  python -m cheers_jax.convert split --hf HF_DIR --out PARTS_DIR

An Orbax checkpoint written here is an export: `state/` (the Orbax StandardCheckpointer tree
{'params', 'batch_stats'}) and `model_config.json` (`ModelConfig.to_dict()`), so converting back
needs no other input (layouts: `cheers_jax.checkpoint.orbax`). `orbax-to-hf` and `assemble` also write
the tokenizer files, preprocessor_config.json and generation_config.json, so the HF directory is
complete for our tools and, with the official modeling files copied in, for the official evaluation.
A non-empty --out folder is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax.numpy as jnp

from cheers_jax import cli
from cheers_jax.checkpoint import parts as parts_lib
from cheers_jax.checkpoint.hf import DEFAULT_MAX_SHARD_BYTES, load_hf_checkpoint, save_hf_checkpoint
from cheers_jax.checkpoint.hf import CheckpointError
from cheers_jax.checkpoint.orbax import (
  CHECKPOINT_DIR,
  CONFIG_JSON,
  STATE_DIR,
  is_export,
  is_run,
  load_export,
  load_run_model,
  save_export,
)
from cheers_jax.checkpoint.support_files import write_support_files


# ---- CLI -----------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
  """'5GB', '500MB', '2GiB' or a byte count -> bytes (GB = 10**9 as in HF's max_shard_size)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
  if not m:
    raise argparse.ArgumentTypeError(f"bad size '{text}': use e.g. 5GB, 500MB or a number of bytes")
  unit = (m.group(2) or "B").upper()
  scale = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
  }[unit]
  return int(float(m.group(1)) * scale)


def _prepare_out(out: Path, overwrite: bool) -> None:
  cli.check_output_dir(out, overwrite)
  if out.exists() and any(out.iterdir()):
    if (out / STATE_DIR).exists():
      shutil.rmtree(out / STATE_DIR)
    for p in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
      p.unlink()  # stale shards would survive next to a new index otherwise


def _hf_to_orbax(args: argparse.Namespace) -> None:
  out = Path(args.out)
  _prepare_out(out, args.overwrite)
  cfg, variables = load_hf_checkpoint(args.hf, dtype=jnp.dtype(args.dtype))
  save_export(variables, cfg, out)
  print(f"wrote {out / STATE_DIR} and {out / CONFIG_JSON} ({args.dtype})")


def _orbax_to_hf(args: argparse.Namespace) -> None:
  out = Path(args.out)
  _prepare_out(out, args.overwrite)
  if is_export(args.orbax):
    cfg, variables = load_export(args.orbax)
  elif is_run(args.orbax):
    cfg, variables = load_run_model(args.orbax)  # a training workdir: its latest (or the given) step
  else:
    raise CheckpointError(
      f"--orbax {args.orbax}: neither an Orbax export ({STATE_DIR}/ + {CONFIG_JSON}, written by "
      f"hf-to-orbax) nor a training workdir (with {CHECKPOINT_DIR}/, written by cheers_jax.train)"
    )
  index = save_hf_checkpoint(
    variables, cfg, out, dtype=args.dtype, max_shard_bytes=args.max_shard_size, store_lm_head=not args.no_lm_head
  )
  write_support_files(out, cfg)
  shards = len(set(index["weight_map"].values()))
  print(
    f"wrote {len(index['weight_map'])} tensors in {shards} shards "
    f"({index['metadata']['total_size']:,} bytes, {args.dtype}) to {out}, with the tokenizer, "
    "preprocessor_config.json and generation_config.json"
  )


def _assemble(args: argparse.Namespace) -> None:
  parts = {p: getattr(args, p) for p in parts_lib.PARTS if getattr(args, p)}
  cfg = parts_lib.read_model_config(args.config)
  out = Path(args.out)
  _prepare_out(out, args.overwrite)
  index = parts_lib.assemble_hf_checkpoint(
    parts, cfg, out, seed=args.seed, dtype=args.dtype, max_shard_bytes=args.max_shard_size
  )
  write_support_files(out, cfg)
  random = [p for p in parts_lib.PARTS if p not in parts]
  print(
    f"wrote {len(index['weight_map'])} tensors ({args.dtype}) to {out}: parts {', '.join(parts) or 'none'}"
    f"; random (seed {args.seed}): head modules{''.join(', ' + p for p in random)}"
  )


def _split(args: argparse.Namespace) -> None:
  out = cli.check_output_dir(args.out, args.overwrite)
  if out.is_dir():
    for part in parts_lib.PARTS:  # stale shards would survive next to a new index otherwise
      shutil.rmtree(out / part, ignore_errors=True)
  written = parts_lib.split_hf_checkpoint(args.hf, out, max_shard_bytes=args.max_shard_size)
  print("wrote " + ", ".join(f"{part} to {path}" for part, path in written.items()))


def _add_overwrite(p: argparse.ArgumentParser, what: str = "the files") -> None:
  p.add_argument("--overwrite", "--force", action="store_true", help=f"replace {what} of a non-empty output directory")


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cheers_jax.convert", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  a = sub.add_parser(
    "hf-to-orbax",
    help="HF safetensors checkpoint -> Orbax checkpoint",
    description="Load an HF-layout Cheers checkpoint (config.json + safetensors shards) "
    "and write it as an Orbax checkpoint with its model config.",
  )
  a.add_argument(
    "--hf",
    required=True,
    metavar="DIR",
    help="HF checkpoint directory (config.json, model.safetensors.index.json + shards, or model.safetensors)",
  )
  a.add_argument("--out", required=True, metavar="DIR", help=f"output directory (gets state/ and {CONFIG_JSON})")
  a.add_argument(
    "--dtype",
    default="float32",
    choices=["float32", "bfloat16", "float16"],
    help="dtype of the stored arrays (default: float32, exact for bf16 checkpoints)",
  )
  _add_overwrite(a)
  a.set_defaults(run=_hf_to_orbax)

  b = sub.add_parser(
    "orbax-to-hf",
    help="Orbax checkpoint -> HF safetensors checkpoint",
    description="Load an Orbax export written by hf-to-orbax, or the params of a training "
    "workdir's latest checkpoint (or of WORKDIR/checkpoints/STEP), and export "
    "config.json, sharded safetensors and the index in the published "
    "checkpoint's layout.",
  )
  b.add_argument(
    "--orbax",
    required=True,
    metavar="DIR",
    help=f"an Orbax export (state/ and {CONFIG_JSON}) or a "
    f"training workdir ({CHECKPOINT_DIR}/; the latest step, or give WORKDIR/{CHECKPOINT_DIR}/STEP)",
  )
  b.add_argument("--out", required=True, metavar="DIR", help="output HF checkpoint directory")
  b.add_argument(
    "--dtype",
    default="bfloat16",
    choices=["bfloat16", "float32", "float16"],
    help="storage dtype of the floating tensors (default: bfloat16, as published)",
  )
  b.add_argument(
    "--max-shard-size",
    type=parse_size,
    default=DEFAULT_MAX_SHARD_BYTES,
    metavar="SIZE",
    help="largest shard, e.g. 5GB (default) or 500MB; GB = 10^9 bytes as in HF",
  )
  b.add_argument(
    "--no-lm-head",
    action="store_true",
    help="with tied embeddings, do not store lm_head.weight (the published checkpoint "
    "stores it as a copy of embed_tokens)",
  )
  _add_overwrite(b)
  b.set_defaults(run=_orbax_to_hf)

  c = sub.add_parser(
    "assemble",
    help="pretrained parts (VAE, SigLIP2, Qwen2.5) -> HF Cheers checkpoint",
    description="Write a Cheers checkpoint from pretrained parts, as the paper's stage 1 "
    "starts: the FLUX.2 VAE (into vae_model and vae_decoder_projector), "
    "SigLIP2's vision tower, Qwen2.5; any part left out and the head modules "
    "are random. Names, shapes and each part's config.json are checked against "
    "CONFIG.",
  )
  c.add_argument(
    "--vae",
    metavar="DIR",
    help="FLUX.2 VAE in the layout Cheers embeds (encoder.*, decoder.*, bn.*): *.safetensors, optional config.json",
  )
  c.add_argument(
    "--siglip",
    metavar="DIR",
    help="SigLIP2 in Hugging Face layout (vision_model.*; the text tower is ignored) with its config.json",
  )
  c.add_argument(
    "--llm", metavar="DIR", help="Qwen2.5 in Hugging Face layout (model.*, lm_head.weight) with its config.json"
  )
  c.add_argument(
    "--config",
    required=True,
    metavar="CONFIG",
    help="the model's shapes: a shipped config name "
    "(tiny, cheers_1p5b), a config file (FILE.py) or a Cheers config.json (or its directory)",
  )
  c.add_argument("--out", required=True, metavar="DIR", help="output HF checkpoint directory")
  c.add_argument(
    "--seed", type=int, default=0, help="seed of the random modules, as config.seed in training (default: 0)"
  )
  c.add_argument(
    "--dtype",
    default="bfloat16",
    choices=["bfloat16", "float32", "float16"],
    help="storage dtype (default: bfloat16, as published; exact for bf16 parts)",
  )
  c.add_argument(
    "--max-shard-size",
    type=parse_size,
    default=DEFAULT_MAX_SHARD_BYTES,
    metavar="SIZE",
    help="largest shard, e.g. 5GB (default) or 500MB",
  )
  _add_overwrite(c)
  c.set_defaults(run=_assemble)

  d = sub.add_parser(
    "split",
    help="HF Cheers checkpoint -> the parts' layouts (vae/, siglip/, llm/)",
    description="Write the VAE (vae_model's copy), SigLIP2 vision tower and Qwen2.5 of a Cheers "
    "checkpoint in the layouts `assemble` and init_from=parts: read, bit for bit.",
  )
  d.add_argument("--hf", required=True, metavar="DIR", help="HF Cheers checkpoint directory")
  d.add_argument("--out", required=True, metavar="DIR", help="output directory (gets vae/, siglip/, llm/)")
  d.add_argument(
    "--max-shard-size",
    type=parse_size,
    default=DEFAULT_MAX_SHARD_BYTES,
    metavar="SIZE",
    help="largest shard of the LLM part (default 5GB)",
  )
  _add_overwrite(d, "the parts")
  d.set_defaults(run=_split)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  args.run(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
