"""cheers-jax: a JAX/Flax port of the Cheers unified multimodal model."""
