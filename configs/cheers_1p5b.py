"""The published Cheers model (Qwen2.5-1.5B + SigLIP2 so400m-like + FLUX.2-style VAE, 512x512).

Every shape is the config class default (cheers_jax.model.config); used with init_from='hf:DIR' to
evaluate or fine-tune the released weights.
"""
from configs import common


def get_config():
  c = common.base_config()
  c.data.image_size = 512
  c.train.batch_size = 512
  c.checkpoint.every_steps = 1000
  c.mesh.fsdp = -1
  # Memory (python -m cheers_jax.aot --target h100, 512x512, seq 400, half generation, README "Scaling"):
  # remat 'full' recomputes each layer's activations (SigLIP, LLM, DiT heads, VAE decoder blocks) and
  # bf16 Adam moments (as the official code's bf16 AdamW) halve the optimizer state; together they fit
  # batch 8 on one 80 GB H100 with room to spare, and batch 16.
  c.model.remat_policy = "full"
  c.train.opt_state_dtype = "bfloat16"
  return c
