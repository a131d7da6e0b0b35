"""`gptoss_jax.load`: a model from a checkpoint directory (either MXFP4 layout) or from a
preset name with seeded random weights, placed parameter by parameter onto the devices
(or the mesh's shardings), so the host never holds more than one tensor at a time.

Every source is read in the model's own layout (ExpertWeights for the experts). When the
kernels include the TPU expert kernel, each MoE layer's experts are then re-laid out for
it on the devices (`model.experts_for_tpu`), once, as soon as the layer's six expert
arrays are in; the checkpoint formats do not change."""

from __future__ import annotations

import collections
import functools
import json
import math
import zlib
from functools import partial
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.config import PRESETS, GptOssConfig
from gptoss_jax.converters.layouts import DENSE, E8M0_SCALES, FP4_VALUES, Checkpoint, tensor_to_leaves
from gptoss_jax.converters.orbax_io import ConvertedCheckpoint, is_converted
from gptoss_jax.kernels.common import ExpertWeights
from gptoss_jax.kernels.dispatch import XLA, Kernels
from gptoss_jax.kernels.moe_tpu import TpuExperts
from gptoss_jax.model import EXPERT_AXES, GptOss, abstract_model, expert_hidden_shards, experts_for_tpu
from gptoss_jax.sharding.memory import TPU_EXPERTS
from gptoss_jax.sharding.placement import place_params, put_host_array
from gptoss_jax.sharding.rules import named_sharding

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def parse_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        return jnp.dtype(DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
    return dtype


def load(path=None, *, mesh=None, dtype="bfloat16", seed: int = 0, kernels: str | Kernels = "auto") -> GptOss:
    """A checkpoint directory (converted by `python -m gptoss_jax.convert`, or HF or original
    MXFP4 layout), a preset name ("tiny", "gpt-oss-20b", "gpt-oss-120b") for random
    weights drawn from `seed`, or None for the built-in model (trained on a small synthetic
    task, gptoss_jax.builtin). `kernels`: "auto" (the kernels that measured faster than XLA
    on the devices the model is placed on: none on a CPU), "pallas", "xla" (see
    `Kernels.choose`) or a `Kernels` value."""
    dtype = parse_dtype(dtype)
    if not isinstance(kernels, Kernels):
        kernels = Kernels.auto(kernels, mesh=mesh)
    if path is None:
        return load_builtin(mesh=mesh, dtype=dtype, kernels=kernels)
    if isinstance(path, str) and path in PRESETS and not Path(path).exists():
        return random_model(GptOssConfig.preset(path), mesh=mesh, dtype=dtype, seed=seed, kernels=kernels)
    if is_converted(path):
        return model_from_converted(ConvertedCheckpoint(path), mesh=mesh, dtype=dtype, kernels=kernels)
    return model_from_checkpoint(Checkpoint(path), mesh=mesh, dtype=dtype, kernels=kernels)


def _assemble(graphdef, leaves, values: dict) -> GptOss:
    place_params(leaves, values)
    for path, var in leaves:
        var.set_value(values[path])
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.update_weight_facts()
    return model


def shard_model(model: GptOss, mesh) -> GptOss:
    """The same model (same values and kernels) with its parameters spread over `mesh` by the
    rules table (None: gathered onto the default device). One process only: several
    processes load with `gptoss_jax.load(..., mesh=mesh)`, which reads only each process's
    shards."""
    graphdef, leaves = abstract_model(model.config, model.dtype, mesh, model.kernels)
    current = dict(nnx.to_flat_state(nnx.state(model)))
    values = {}
    relayout = ExpertRelayout(model.config, leaves, mesh, values)
    for path, var in leaves:
        if _in_tpu_layout(path):  # the old mesh may have split the hidden units another way
            continue
        values[path] = jax.device_put(current[path][...], leaf_sharding(var, mesh))
    for layer in sorted(relayout.layers):
        weights = model.blocks[layer[1]].mlp.expert_weights()
        for name, array, axes in zip(ExpertWeights._fields, weights, EXPERT_AXES):
            relayout.add((*layer, name), jax.device_put(array, named_sharding(axes, array.shape, mesh)))
    return _assemble(graphdef, leaves, values)


class ExpertRelayout:
    """Puts parameter values into `values` by path, and for the MoE layers the target
    model stores in the TPU kernel's layout, gathers each layer's six ExpertWeights arrays
    and converts them as soon as the last one arrives (so at most one layer is held in
    both layouts)."""

    def __init__(self, config, target_leaves, mesh, values: dict):
        self.layers = {path[:-2] for path, _ in target_leaves if _in_tpu_layout(path)}
        self.shards = expert_hidden_shards(config, mesh)
        self.mesh, self.values = mesh, values
        self.pending: dict[tuple, dict] = collections.defaultdict(dict)

    def add(self, path: tuple, array) -> None:
        layer, name = path[:-1], path[-1]
        if layer not in self.layers or name not in ExpertWeights._fields:
            self.values[path] = array
            return
        pending = self.pending[layer]
        pending[name] = array
        if len(pending) == len(ExpertWeights._fields):
            converted = experts_for_tpu(ExpertWeights(**self.pending.pop(layer)), self.mesh, self.shards)
            for field, value in zip(TpuExperts._fields, converted):
                self.values[(*layer, TPU_EXPERTS, field)] = value


def _in_tpu_layout(path: tuple) -> bool:
    return len(path) > 1 and path[-2] == TPU_EXPERTS


def _source_leaves(config, dtype, mesh):
    """The parameters as the sources hold them (ExpertWeights), with their shardings."""
    return abstract_model(config, dtype, mesh, XLA)[1]


def leaf_sharding(var, mesh):
    return named_sharding(var.get_metadata()["axes"], var.shape, mesh)


def model_from_checkpoint(checkpoint: Checkpoint, *, mesh=None, dtype=jnp.bfloat16, kernels: Kernels = XLA
                          ) -> GptOss:
    graphdef, leaves = abstract_model(checkpoint.config, dtype, mesh, kernels)
    by_path = dict(_source_leaves(checkpoint.config, dtype, mesh))
    values = {}
    relayout = ExpertRelayout(checkpoint.config, leaves, mesh, values)
    for spec in checkpoint.specs:
        for part, piece in tensor_to_leaves(spec, checkpoint.read(spec)):
            var = by_path[part.leaf]
            sharding = leaf_sharding(var, mesh)
            if part.kind == FP4_VALUES:
                packed = put_host_array(piece, sharding)
                value = jax.jit(mxfp4.blocks_to_fp4, out_shardings=sharding)(packed)
            elif part.kind == E8M0_SCALES:
                value = put_host_array(piece, sharding)
            else:
                value = _put_dense(piece, sharding, var.dtype)
            relayout.add(part.leaf, value)
    return _assemble(graphdef, leaves, values)


def model_from_converted(checkpoint: ConvertedCheckpoint, *, mesh=None, dtype=jnp.bfloat16,
                         kernels: Kernels = XLA) -> GptOss:
    """Restores a converted checkpoint straight into each parameter's sharding: every process
    reads only its shards, dense parameters are cast to `dtype` as they are read, and MXFP4
    bytes become FP4 by a bitcast on the devices."""
    graphdef, leaves = abstract_model(checkpoint.config, dtype, mesh, kernels)
    sources = _source_leaves(checkpoint.config, dtype, mesh)
    targets = {}
    for path, var in sources:
        stored = checkpoint.leaves[path]
        target_dtype = var.dtype if stored.kind == DENSE else stored.dtype
        targets[path] = jax.ShapeDtypeStruct(stored.shape, target_dtype, sharding=leaf_sharding(var, mesh))
    restored = checkpoint.restore(targets)
    values = {}
    relayout = ExpertRelayout(checkpoint.config, leaves, mesh, values)
    for path, _ in sources:
        array = restored.pop(path)
        if checkpoint.leaves[path].kind == FP4_VALUES:
            array = jax.jit(mxfp4.blocks_to_fp4, out_shardings=targets[path].sharding)(array)
        relayout.add(path, array)
    return _assemble(graphdef, leaves, values)


def _put_dense(array: np.ndarray, sharding, dtype):
    if array.dtype == dtype:
        return put_host_array(array, sharding)
    return jax.jit(lambda a: a.astype(dtype), out_shardings=sharding)(put_host_array(array, sharding))


# ------------------------------------------------------------------------ the built-in model
BUILTIN_FILE = "builtin.npz"
BUILTIN_FORMAT = "gptoss-jax-builtin"
BUILTIN_FORMAT_VERSION = 1
BUILTIN_DESCRIPTION = ("trained on a small synthetic task (two-digit addition and subtraction, unit conversions, "
                       "dates, weather through a tool call), see docs/finetuning.md")


def builtin_package_path() -> Path:
    return Path(str(resources.files("gptoss_jax.data").joinpath(BUILTIN_FILE)))


def read_builtin_package(path=None) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """(metadata, stored arrays by parameter path, task token ids) of a package file."""
    path = builtin_package_path() if path is None else Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: the built-in model's file is missing; reinstall gptoss-jax or rebuild it with "
                         f"python -m gptoss_jax.builtin --train OUT_DIR")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    if meta.get("format") != BUILTIN_FORMAT or meta.get("version") != BUILTIN_FORMAT_VERSION:
        raise ValueError(f"{path}: not a built-in model file of format {BUILTIN_FORMAT} version {BUILTIN_FORMAT_VERSION}")
    return meta, arrays, arrays.pop("__tokens__")


def _full_vocab(name: str, rows: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """A reduced [N + 1, d] embedding or unembedding expanded to the full vocabulary."""
    shared = rows[-1] if name == "unembedding" else np.zeros_like(rows[-1])
    full = np.broadcast_to(shared, (vocab_size, rows.shape[1])).copy()
    full[tokens] = rows[:-1]
    return full


def builtin_arrays(path=None) -> tuple[GptOssConfig, dict[str, np.ndarray]]:
    """The built-in model's config and parameters in the full vocabulary (FP4 and E8M0 as
    ml_dtypes arrays, dense parameters bf16)."""
    meta, arrays, tokens = read_builtin_package(path)
    out = {}
    for name, stored in arrays.items():
        kind = meta["kinds"][name]
        if kind == str(jnp.dtype(mxfp4.FP4)):
            value = mxfp4.blocks_to_fp4_numpy(stored)
        elif kind == str(jnp.dtype(mxfp4.E8M0)):
            value = stored.view(mxfp4.E8M0)
        else:
            value = stored.view(ml_dtypes.bfloat16)
            if name in ("embedding", "unembedding"):
                value = _full_vocab(name, value, tokens, meta["config"]["vocab_size"])
        out[name] = value
    return builtin_config(meta), out


def builtin_config(meta: dict | None = None) -> GptOssConfig:
    """The built-in model's config (read from its package file unless `meta` is given)."""
    meta = read_builtin_meta() if meta is None else meta
    return GptOssConfig.from_dict(meta["config"], name=meta["config"].get("name", "builtin"))


def read_builtin_meta(path=None) -> dict:
    return read_builtin_package(path)[0]


def load_builtin(*, mesh=None, dtype=jnp.bfloat16, kernels: Kernels = XLA, path=None) -> GptOss:
    """The built-in model, placed on the devices (or `mesh`) like any loaded checkpoint."""
    c, arrays = builtin_arrays(path)
    graphdef, leaves = abstract_model(c, dtype, mesh, kernels)
    values = {}
    relayout = ExpertRelayout(c, leaves, mesh, values)
    for p, var in _source_leaves(c, dtype, mesh):
        array = arrays[path_name(p)]
        sharding = leaf_sharding(var, mesh)
        if array.dtype in (mxfp4.FP4, mxfp4.E8M0):
            relayout.add(p, put_host_array(array, sharding))
        else:
            relayout.add(p, _put_dense(array, sharding, var.dtype))
    return _assemble(graphdef, leaves, values)


# ------------------------------------------------------------------------ random weights
def random_model(config: GptOssConfig, *, mesh=None, dtype=jnp.bfloat16, seed: int = 0,
                 expert_scale_shift: int = 0, kernels: Kernels = XLA) -> GptOss:
    """Random weights created directly on the devices, one parameter at a time."""
    graphdef, leaves = abstract_model(config, dtype, mesh, kernels)
    values = {}
    relayout = ExpertRelayout(config, leaves, mesh, values)
    for path, var in _source_leaves(config, dtype, mesh):
        make = _random_leaf_fn(config, path[-1], var.shape, var.dtype, expert_scale_shift, leaf_sharding(var, mesh))
        relayout.add(path, make(leaf_key(seed, path)))
    return _assemble(graphdef, leaves, values)


@functools.lru_cache(maxsize=None)
def _random_leaf_fn(config, leaf, shape, dtype, expert_scale_shift, sharding=None):
    return jax.jit(partial(random_leaf, config, leaf, shape, dtype, expert_scale_shift), out_shardings=sharding)


def path_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def leaf_key(seed: int, path: tuple) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path_name(path).encode()))


def random_leaf(config: GptOssConfig, leaf: str, shape, dtype, expert_scale_shift: int, key):
    """One parameter of a random model. Values are drawn in bf16, so bf16 and fp32 models of
    the same seed hold the same numbers. `expert_scale_shift` raises the mlp1 E8M0 scales by
    that many binary orders (to push expert pre-activations past the SwiGLU clamp)."""
    c = config
    if leaf.endswith("_fp4"):
        packed = jax.random.randint(key, (*shape[:-1], shape[-1] // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        return mxfp4.blocks_to_fp4(packed)
    if leaf.endswith("_scales"):
        # Mean |FP4 value| is about 2.7: aim mlp1 weights at size 1/sqrt(fan_in), and keep
        # mlp2 (which writes into the residual stream) sixteen times smaller.
        fan_in, shift = (c.hidden_size, expert_scale_shift) if leaf.startswith("mlp1") else (c.intermediate_size, -4)
        center = 127 + round(math.log2(1 / (2.7 * math.sqrt(fan_in)))) + shift
        exponents = center + jax.random.randint(key, shape, -1, 2, jnp.int32)
        return mxfp4.scales_to_e8m0(jnp.clip(exponents, 0, 254).astype(jnp.uint8))
    if leaf == "scale":
        values = jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5)
    else:
        # Layers write small updates into the residual stream, as in trained models, so
        # that bf16 and fp32 runs stay comparable through several layers.
        std = {
            "embedding": 1.0,
            "sinks": 1.0,
            "unembedding": 1 / math.sqrt(c.hidden_size),
            "wq": 1 / math.sqrt(c.hidden_size),
            "wk": 1 / math.sqrt(c.hidden_size),
            "wv": 1 / math.sqrt(c.hidden_size),
            "router_w": 4 / math.sqrt(c.hidden_size),  # a decisive router, like trained ones
            "wo": 0.25 / math.sqrt(c.num_attention_heads * c.head_dim),
            "bo": 0.1,
            "mlp2_bias": 0.1,
        }.get(leaf, 0.5)  # the other biases
        values = jax.random.normal(key, shape, jnp.float32) * std
    return values.astype(jnp.bfloat16).astype(dtype)
