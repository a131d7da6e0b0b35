"""gptoss-jax: OpenAI's gpt-oss models in JAX / Flax NNX, experts kept in MXFP4."""

from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.converters.safetensors_io import CheckpointError
from gptoss_jax.loader import load
from gptoss_jax.model import GptOss
from gptoss_jax.tokenizer import get_tokenizer

# After the import above, the name `gptoss_jax.generate` is the function (the public API);
# the module stays importable as `from gptoss_jax.generate import ...` and runnable with -m.
from gptoss_jax.generate import generate  # noqa: E402  (isort: skip)

__all__ = ["CheckpointError", "ConfigError", "GptOss", "GptOssConfig", "generate", "get_tokenizer", "load"]
