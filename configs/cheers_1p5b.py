"""The published Cheers model (Qwen2.5-1.5B + SigLIP2 so400m-like + FLUX.2-style VAE, 512x512), shipped
in the package (`--config cheers_1p5b`); defined in `cheers_jax/config.py`.
"""

from cheers_jax.config import cheers_1p5b as get_config  # noqa: F401
