"""The schema every config starts from lives in the package: `cheers_jax.config.base_config`.

Override anything from the command line: `--config configs/tiny.py --config.train.steps=200`.
"""

from cheers_jax.config import base_config  # noqa: F401  (re-exported for config files)
