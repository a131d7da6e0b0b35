"""gptoss-jax: OpenAI's gpt-oss models in JAX / Flax NNX, experts kept in MXFP4."""
