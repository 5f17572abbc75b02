"""Cheers training stage 'stage1_align' (SPEC.md table): lr 1e-4, constant schedule, global batch 512,
30000 steps, trainable: align; data mix und:gen:text = 4.5:10:0.

Start, as the paper does, from the pretrained parts (--config.init_from=parts:vae=FLUX2_VAE_DIR,
siglip=SIGLIP2_DIR,llm=QWEN2.5_DIR; the head modules start random), or from a Cheers checkpoint
(orbax:DIR or hf:DIR), and point the data at your JSONL (--config.data.source=jsonl --config.data.jsonl_path=... --config.data.image_root=...).
"""
from cheers_jax import config


def get_config():
  c = config.cheers_1p5b()
  c.train.lr = 1e-4
  c.train.schedule = "constant"
  c.train.batch_size = 512
  c.train.steps = 30000
  c.train.trainable = "align"
  c.data.mix = dict(und=4.5, gen=10, text=0)
  c.data.source = "jsonl"
  return c
