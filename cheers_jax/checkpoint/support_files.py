"""The non-weight files of a self-contained checkpoint directory, as the published one ships them.

`write_support_files(out_dir, cfg)` adds the Qwen2 tokenizer files (vocab.json, merges.txt,
tokenizer_config.json: the package's copies of the official ones), `preprocessor_config.json` (the
UMMImageProcessor's, with this model's resolution and patch size) and `generation_config.json` (the
published one; note the official `Cheers.generate` ignores it, and so does `cheers_jax.infer.decode`). With them
an exported directory loads in our tools and, once the official modeling files are copied in
(configuration_umm.py, modeling_umm.py, processing_umm.py, image_processing_umm.py), in the official
evaluation (`AutoProcessor` / `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`).
"""

from __future__ import annotations

import json
from pathlib import Path

from cheers_jax import package_data

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")

# Training/cheers_config/generation_config.json of the official repository
GENERATION_CONFIG = {
  "bos_token_id": 151643,
  "do_sample": True,
  "eos_token_id": [151645, 151643],
  "pad_token_id": 151643,
  "repetition_penalty": 1.05,
  "temperature": 0.7,
  "top_k": 20,
  "top_p": 0.8,
  "transformers_version": "4.51.0",
}


def preprocessor_config(image_size: int = 512, patch_size: int = 16) -> dict:
  """Training/cheers_config/preprocessor_config.json, at the model's resolution."""
  return {
    "image_processor_type": "UMMImageProcessor",
    "auto_map": {
      "AutoProcessor": "processing_umm.UMMProcessor",
      "AutoImageProcessor": "image_processing_umm.UMMImageProcessor",
    },
    "processor_class": "UMMProcessor",
    "scale_resolution": int(image_size),
    "patch_size": int(patch_size),
  }


def write_support_files(out_dir: str | Path, cfg=None) -> list[Path]:
  """Writes the tokenizer, preprocessor and generation config files into `out_dir`; returns their paths."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name in TOKENIZER_FILES:
    (out / name).write_bytes((package_data.TOKENIZER / name).read_bytes())
    written.append(out / name)
  vision = getattr(cfg, "vision", None)
  pre = preprocessor_config(getattr(vision, "image_size", 512), getattr(vision, "patch_size", 16))
  for name, content in (("preprocessor_config.json", pre), ("generation_config.json", GENERATION_CONFIG)):
    (out / name).write_text(json.dumps(content, indent=2) + "\n")
    written.append(out / name)
  return written
