"""The embedded default: a tiny Cheers on generated shapes; trains on a laptop CPU in minutes.

python -m cheers_jax.train --config configs/tiny.py --workdir /tmp/cheers_tiny
"""
from configs import common


def get_config():
  c = common.base_config()
  c.model.text = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
  c.model.vision = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=64)
  c.model.vae = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8, resolution=64)
  c.model.dtype = "float32"
  c.data.image_size = 64
  c.data.seq_buckets = (96,)
  c.data.max_images_per_sample = 1
  c.data.mix = dict(und=1.0, gen=1.0, text=0.0)
  c.data.synthetic_size = 4096
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.lr = 1e-3
  c.train.warmup_ratio = 0.05
  c.train.ce_chunk = 256               # ~15 text targets per sample: small chunks skip the rest
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint.every_steps = 100
  c.log_every = 20
  c.sample_steps = 8
  return c
