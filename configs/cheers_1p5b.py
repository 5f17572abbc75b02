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
  return c
