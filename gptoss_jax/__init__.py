"""gptoss-jax: OpenAI's gpt-oss models in JAX / Flax NNX, experts kept in MXFP4."""

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import warnings
from pathlib import Path


def _round_every_op() -> None:
    """bf16 rounded after every op, as the reference does (docs/architecture.md, "Every rounding
    happens"): XLA's excess precision off, unless XLA_FLAGS already decides it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_allow_excess_precision" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_allow_excess_precision=false".strip()
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and getattr(bridge, "_backends", None):
        warnings.warn("JAX started before gptoss_jax was imported, so XLA may keep bf16 values in fp32 between fused "
                      "ops on GPUs (not rounding as the reference does); import gptoss_jax first or set "
                      "XLA_FLAGS=--xla_allow_excess_precision=false", stacklevel=3)


_round_every_op()


class _CheckoutSubpackages(importlib.abc.MetaPathFinder):
    """In a source checkout configs/, sharding/ and converters/ sit beside this folder (an
    installed wheel puts them inside it). They are found in this same checkout, before any
    other finder looks: an editable install of another checkout maps them to its own
    folders, and that copy would silently run beside this one's model."""

    def __init__(self, root: Path):
        self.root = str(root)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in SUBPACKAGES:
            return importlib.machinery.PathFinder.find_spec(fullname, [self.root])
        return None


SUBPACKAGES = ("gptoss_jax.configs", "gptoss_jax.sharding", "gptoss_jax.converters")
_here = Path(__file__).resolve().parent
if not (_here / "sharding").is_dir() and (_here.parent / "sharding" / "__init__.py").is_file():
    sys.meta_path.insert(0, _CheckoutSubpackages(_here.parent))

from gptoss_jax.config import ConfigError, GptOssConfig  # noqa: E402 (after the finder)
from gptoss_jax.converters.safetensors_io import CheckpointError  # noqa: E402 (after the finder)
from gptoss_jax.loader import load  # noqa: E402 (after the finder)
from gptoss_jax.model import GptOss  # noqa: E402 (after the finder)
from gptoss_jax.tokenizer import get_tokenizer  # noqa: E402 (after the finder)

__all__ = ["CheckpointError", "ConfigError", "GptOss", "GptOssConfig", "generate", "get_tokenizer", "load"]


def __getattr__(name):
    # `gptoss_jax.generate` is both the CLI module (`python -m gptoss_jax.generate`) and the API
    # function: the module is callable. It is imported lazily so that running it with -m does
    # not execute it twice.
    if name == "generate":
        return importlib.import_module("gptoss_jax.generate")
    raise AttributeError(f"module 'gptoss_jax' has no attribute {name!r}")
