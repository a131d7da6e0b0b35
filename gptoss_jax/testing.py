"""Random MXFP4 checkpoints of any config, in either layout, with the real file names,
index and config, loadable by HF transformers. Tensors are generated and written one at a
time, so a checkpoint at the real 20b shape needs little host memory."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters.layouts import HF_SHARD_BYTES, LAYOUTS, tensor_from_leaves, write_checkpoint
from gptoss_jax.loader import _random_leaf_fn, abstract_model, leaf_key


def write_random_checkpoint(path, config: GptOssConfig | str, layout: str = "hf", seed: int = 0, *,
                            expert_scale_shift: int = 0, max_shard_bytes: int = HF_SHARD_BYTES) -> Path:
    """Writes the same weights `gptoss_jax.loader.random_model(config, seed=seed)` holds.

    HF layout: `config.json`, `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json`
    in `path`. Original layout: `config.json`, `model.safetensors` and `dtypes.json` in
    `path/original`. Returns the folder holding the files."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    if isinstance(config, str):
        config = GptOssConfig.preset(config)
    _, leaves = abstract_model(config, jnp.bfloat16)
    by_path = dict(leaves)

    def get_leaf(leaf_path):
        var = by_path[leaf_path]
        make = _random_leaf_fn(config, leaf_path[-1], var.shape, var.dtype, expert_scale_shift)
        return np.asarray(make(leaf_key(seed, leaf_path)))

    return write_checkpoint(path, config, layout, lambda spec: tensor_from_leaves(spec, get_leaf),
                            max_shard_bytes=max_shard_bytes)
