"""Cheers training stage 'stage2_pretrain' (SPEC.md table): lr 1e-4, constant schedule, global batch 512,
60000 steps, trainable: all_but_vae; data mix und:gen:text = 3:6:1.

Start from the previous stage with --config.init_from=orbax:DIR (or hf:DIR) and point the data at
your JSONL (--config.data.source=jsonl --config.data.jsonl_path=... --config.data.image_root=...).
"""
from cheers_jax import config


def get_config():
  c = config.cheers_1p5b()
  c.train.lr = 1e-4
  c.train.schedule = "constant"
  c.train.batch_size = 512
  c.train.steps = 60000
  c.train.trainable = "all_but_vae"
  c.data.mix = dict(und=3, gen=6, text=1)
  c.data.source = "jsonl"
  return c
