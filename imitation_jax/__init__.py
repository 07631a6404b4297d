"""imitation_jax: train and evaluate LLaMA-family imitation students with JAX/Flax."""
