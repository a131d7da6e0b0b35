"""Sharding rules and mesh helpers (installed as gptoss_jax.sharding)."""
