"""Benchmarks: `python -m cheers_jax.bench SUBCOMMAND ...` (see `python -m cheers_jax.bench --help`)."""
