"""Defaults shared by every config (ml_collections). `get_config()` in each file returns a ConfigDict.

Override anything from the command line: `--config configs/tiny.py --config.train.steps=200`.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # --workdir on the command line wins

  # Keys of cheers_jax.model.config.ModelConfig (nested text / vision / vae).
  c.model = ml_collections.ConfigDict(dict(
      text={}, vision={}, vae={}, dtype="bfloat16", param_dtype="float32", remat_policy="none",
      attention="xla", reference_bf16_casts=False, max_seq_len=4096))
  # '' = random init; 'hf:DIR' = a Hugging Face checkpoint dir; 'orbax:DIR' = params from an orbax workdir.
  c.init_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"          # synthetic | jsonl | tfds
  c.data.jsonl_path = ""               # official conversation format (one JSON object per line)
  c.data.image_root = ""               # folder the JSONL image paths are relative to
  c.data.tfds_name = ""                # e.g. 'my_captions' (image + caption/label features)
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""
  c.data.tfds_image_key = "image"
  c.data.tfds_text_key = "caption"     # a text feature, or a ClassLabel feature (its names are used)
  c.data.tfds_tasks = ("t2i", "i2t")   # which samples a TFDS example becomes
  c.data.image_size = 512              # must equal model.vision.image_size
  c.data.seq_buckets = (512, 1024, 2048, 4096)  # static sequence lengths (few compiles)
  c.data.max_images_per_sample = 2     # image slots per sample in a batch (editing = 2)
  c.data.mix = ml_collections.ConfigDict(dict(und=3.0, gen=6.0, text=1.0))  # sampling ratios
  c.data.cfg_data_rate = 0.2           # CFG dropout for generation samples
  c.data.worker_count = 0              # grain worker processes (0 = in-process)
  c.data.shuffle = True
  c.data.synthetic_size = 20000        # examples in the synthetic source

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 512             # global batch (samples per optimizer step)
  c.train.grad_accum = 1               # micro-batches per step (batch_size % grad_accum == 0)
  c.train.lr = 1e-4
  c.train.schedule = "constant"        # constant | cosine
  c.train.warmup_ratio = 0.02
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.opt_state_dtype = "float32"  # Adam moments: float32 | bfloat16 (halves the optimizer state)
  c.train.clip_norm = 1.0
  c.train.trainable = "all_but_vae"    # align | all_but_vae (the VAE encoder is always frozen)
  c.train.lr_multipliers = ""          # per-module lr factors: 'und_projector=10,language_model/embed_tokens=0.5'
  c.train.calibrate_latent_norm = 0    # random init only: set the VAE's latent BN stats from N training images
  c.train.fm_weight = 1.0              # lambda
  c.train.fm_gen_only = False          # True: FM loss on generation images only (paper variant)
  c.train.ce_chunk = 1024              # sequence chunk of the chunked cross-entropy
  c.train.nan_policy = "stop"          # stop | skip

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
  c.log_every = 10
  c.sample_every = 0                   # steps between sample grids (0 = only at the end)
  c.sample_prompts = ("a red circle", "a blue square")
  c.sample_steps = 20
  c.sample_cfg = 4.0
  return c
