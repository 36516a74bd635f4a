"""rapq-jax: exact power-of-two post-training quantization for JAX/Flax."""
