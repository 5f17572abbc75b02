"""The embedded default, a tiny Cheers on generated shapes: shipped in the package (`--config tiny`
works from anywhere). Its definition and the reasons for its choices: `cheers_jax/config.py`.

python -m cheers_jax.train --config configs/tiny.py --workdir /tmp/cheers_tiny
"""

from cheers_jax.config import tiny as get_config  # noqa: F401
