"""The paper's four training stages, one recipe each, on the published model (`cheers_1p5b`):

  python -m cheers_jax.train --config configs/stages.py:stage2_pretrain --workdir W
  (configs/stage1_align.py ... stage4_sft.py are the same four, by file name)

| stage           | lr    | schedule | global batch | steps | trainable   | mix und:gen:text |
| stage1_align    | 1e-4  | constant | 512          | 30000 | align       | 4.5:10:0         |
| stage2_pretrain | 1e-4  | constant | 512          | 60000 | all_but_vae | 3:6:1            |
| stage3_refined  | 4e-5  | constant | 512          | 65000 | all_but_vae | 3:6:1            |
| stage4_sft      | 2e-5  | cosine   | 128          | 30000 | all_but_vae | 1:1:0            |

Stage 1 starts, as the paper does, from the pretrained parts (--config.init_from=parts:vae=FLUX2_VAE_DIR,
siglip=SIGLIP2_DIR,llm=QWEN2.5_DIR; the head modules start random) or from a Cheers checkpoint (orbax:DIR or
hf:DIR); each later stage from the previous one (--config.init_from=orbax:DIR or hf:DIR). Point the data at your
JSONL: --config.data.jsonl_path=... --config.data.image_root=...
"""

from cheers_jax import config
from cheers_jax.errors import ConfigError, unknown_key

# stage: (lr, schedule, global batch, steps, trainable, data mix)
STAGES = {
  "stage1_align": (1e-4, "constant", 512, 30000, "align", dict(und=4.5, gen=10, text=0)),
  "stage2_pretrain": (1e-4, "constant", 512, 60000, "all_but_vae", dict(und=3, gen=6, text=1)),
  "stage3_refined": (4e-5, "constant", 512, 65000, "all_but_vae", dict(und=3, gen=6, text=1)),
  "stage4_sft": (2e-5, "cosine", 128, 30000, "all_but_vae", dict(und=1, gen=1, text=0)),
}


def get_config(stage: str = ""):
  if stage not in STAGES:
    raise ConfigError(unknown_key(stage, stage, STAGES, noun="stage") + " (configs/stages.py:STAGE)")
  lr, schedule, batch, steps, trainable, mix = STAGES[stage]
  c = config.cheers_1p5b()
  c.train.lr = lr
  c.train.schedule = schedule
  c.train.batch_size = batch
  c.train.steps = steps
  c.train.trainable = trainable
  c.data.mix = mix
  c.data.source = "jsonl"
  return c
