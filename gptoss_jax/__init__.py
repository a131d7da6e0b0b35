"""gptoss-jax: OpenAI's gpt-oss models in JAX / Flax NNX, experts kept in MXFP4."""

from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.converters.safetensors_io import CheckpointError
from gptoss_jax.loader import load
from gptoss_jax.model import GptOss

__all__ = ["CheckpointError", "ConfigError", "GptOss", "GptOssConfig", "load"]
