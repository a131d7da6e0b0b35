"""Checkpoint layouts and conversion (installed as gptoss_jax.converters)."""
