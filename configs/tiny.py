"""The embedded default: a tiny Cheers on generated shapes; trains on a laptop CPU in minutes.

python -m cheers_jax.train --config configs/tiny.py --workdir /tmp/cheers_tiny

Two choices differ from the published recipe, on purpose:
- 32-px images (one image token each): the step cost is then dominated by the 151,936-token LM head,
  not the VAE, so the run fits in minutes;
- train.fm_gen_only=True: with the reference's default (FM on understanding images too, target 0) a
  randomly initialised tokenizer path learns to make its image tokens constant, which meets the zero
  target for free. Measured on understanding-only data: the image-token std across images fell from
  0.16 to 0.007 in 250 steps. With this flag it stays at 0.14.
- train.calibrate_latent_norm=256: the random VAE's latent BatchNorm statistics are set from training
  images (a trained VAE ships them), so latents have unit variance instead of std ~0.15 against FM's
  unit noise.
Known limit: the tiny model learns the caption template (after ~125 steps every held-out caption is a
well-formed 'a {colour} {shape}') but not to read the image: every image gets the same caption, so the
accuracy equals the best image-blind answer. Measured: 250 and 1000 steps (colour 22 %, shape 22-28 %,
one distinct caption), also with 3x the lr on the tokenizer path, bigger shapes, or understanding-only
data. The cause is the random VAE: its GroupNorms remove each image's per-channel mean, i.e. the colour.
Ridge probes on 1200 held-out images at init decode the colour from the VAE latent at 66 % but from the
LLM's image token at 19 % (chance 17 %); with shapes covering ~3x the area (extent 0.7-0.95, not
0.3-0.6): latent 80 %, the decoded pixels' mean colour 19 %, the token 31 %. A trained VAE (the
published checkpoint, `init_from=hf:...`) does not lose the colour this way.
"""
from configs import common


def get_config():
  c = common.base_config()
  c.model.text = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
  c.model.vision = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=32)
  c.model.vae = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8, resolution=32)
  c.model.dtype = "float32"
  c.data.image_size = 32
  c.data.seq_buckets = (96,)
  c.data.max_images_per_sample = 1
  c.data.mix = dict(und=3.0, gen=1.0, text=0.0)
  c.data.synthetic_size = 4096
  c.train.steps = 150  # the template is learnt by ~125 (see above); keeps the run in minutes
  c.train.batch_size = 8
  c.train.lr = 3e-3
  c.train.schedule = "cosine"
  c.train.warmup_ratio = 0.05
  c.train.fm_gen_only = True
  c.train.calibrate_latent_norm = 256  # the random VAE's latents have std ~0.15 otherwise
  c.train.ce_chunk = 128               # ~17 text targets per sample: small chunks skip the padding
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint.every_steps = 75
  c.log_every = 10
  c.sample_steps = 8
  return c
