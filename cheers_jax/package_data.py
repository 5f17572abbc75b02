"""The package's data folders (cheers_jax/assets/, all of it in the wheel: pyproject.toml's package-data),
named once here."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER = ASSETS / "tokenizer"  # the Qwen2 tokenizer files (vocab.json, merges.txt, tokenizer_config.json)
TINY_PARTS = ASSETS / "tiny_parts"  # the embedded default's pretrained VAE and ViT (cheers_jax.train.tiny_parts)
GPU_TARGETS = ASSETS / "gpu_targets"  # XLA:GPU device descriptions of the aot targets (NAME.txtpb)
