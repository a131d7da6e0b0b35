"""gptoss-jax: OpenAI's gpt-oss models in JAX / Flax NNX, experts kept in MXFP4."""

import importlib

from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.converters.safetensors_io import CheckpointError
from gptoss_jax.loader import load
from gptoss_jax.model import GptOss
from gptoss_jax.tokenizer import get_tokenizer

__all__ = ["CheckpointError", "ConfigError", "GptOss", "GptOssConfig", "generate", "get_tokenizer", "load"]


def __getattr__(name):
    # `gptoss_jax.generate` is both the CLI module (`python -m gptoss_jax.generate`) and the API
    # function: the module is callable. It is imported lazily so that running it with -m does
    # not execute it twice.
    if name == "generate":
        return importlib.import_module("gptoss_jax.generate")
    raise AttributeError(f"module 'gptoss_jax' has no attribute {name!r}")
