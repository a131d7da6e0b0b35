"""Random MXFP4 checkpoints of any config, in either layout, with the real file names,
index and config, loadable by HF transformers. Tensors are generated and written one at a
time, so a checkpoint at the real 20b shape needs little host memory."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters.layouts import E8M0_SCALES, FP4_VALUES, HF, HF_INDEX, LAYOUTS, ORIGINAL, tensor_from_leaves, tensor_specs
from gptoss_jax.converters.safetensors_io import write_safetensors
from gptoss_jax.loader import _random_leaf_fn, abstract_model, leaf_key

HF_SHARD_BYTES = 4_800_000_000


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
    root = Path(path) / ("original" if layout == ORIGINAL else "")
    root.mkdir(parents=True, exist_ok=True)
    _, leaves = abstract_model(config, jnp.bfloat16)
    by_path = dict(leaves)

    def get_leaf(leaf_path):
        var = by_path[leaf_path]
        make = _random_leaf_fn(config, leaf_path[-1], var.shape, var.dtype, expert_scale_shift)
        return np.asarray(make(leaf_key(seed, leaf_path)))

    specs = tensor_specs(config, layout)
    by_name = {s.name: s for s in specs}

    def produce(name):
        return tensor_from_leaves(by_name[name], get_leaf)

    shards = _group_into_shards(specs, max_shard_bytes) if layout == HF else [specs]
    weight_map = {}
    for k, shard in enumerate(shards):
        file_name = (f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if layout == HF
                     else "model.safetensors")
        write_safetensors(root / file_name, [(s.name, s.shape, s.dtype) for s in shard], produce)
        weight_map.update({s.name: file_name for s in shard})

    if layout == HF:
        total = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in specs)
        (root / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
        (root / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    else:
        (root / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2))
        dtypes = {s.name: {FP4_VALUES: "FP4", E8M0_SCALES: "UE8"}.get(s.parts[0].kind, "BF16") for s in specs}
        (root / "dtypes.json").write_text(json.dumps(dtypes, indent=2))
    return root


def _group_into_shards(specs, max_bytes):
    shards, current, size = [], [], 0
    for s in specs:
        nbytes = int(np.prod(s.shape)) * s.dtype.itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += nbytes
    return shards + [current] if current else shards
