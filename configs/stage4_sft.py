"""Cheers training stage 'stage4_sft' (SPEC.md table): lr 2e-5, cosine schedule, global batch 128,
30000 steps, trainable: all_but_vae; data mix und:gen:text = 1:1:0.

Start from the previous stage with --config.init_from=orbax:DIR (or hf:DIR) and point the data at
your JSONL (--config.data.source=jsonl --config.data.jsonl_path=... --config.data.image_root=...).
"""
from cheers_jax import config


def get_config():
  c = config.cheers_1p5b()
  c.train.lr = 2e-5
  c.train.schedule = "cosine"
  c.train.batch_size = 128
  c.train.steps = 30000
  c.train.trainable = "all_but_vae"
  c.data.mix = dict(und=1, gen=1, text=0)
  c.data.source = "jsonl"
  return c
