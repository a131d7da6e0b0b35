"""Model configurations shipped with gptoss-jax (gpt-oss-20b, gpt-oss-120b, tiny)."""
