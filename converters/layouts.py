"""The two MXFP4 checkpoint layouts (docs/architecture.md 3.1, 3.2) mapped onto the model's parameters.

Each checkpoint tensor is described by a `TensorSpec`: its name, shape and dtype on disk and
the parameter leaves it holds, concatenated along axis 0 (only the original layout's fused
qkv holds more than one). A leaf's on-disk form is the leaf reshaped, except that FP4
values are packed two per byte and E8M0 scales are raw bytes. The same table drives
loading, validation, export and the random-checkpoint writer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.converters.safetensors_io import DTYPE_NAMES, CheckpointError, SafetensorsFile, read_json, write_safetensors
from gptoss_jax.mxfp4 import BLOCK, BYTES_PER_BLOCK, NAN_SCALE, blocks_to_fp4_numpy

HF = "hf"
ORIGINAL = "original"
LAYOUTS = (HF, ORIGINAL)
HF_INDEX = "model.safetensors.index.json"
HF_SHARD_BYTES = 4_800_000_000  # HF's shard limit for the gpt-oss uploads

DENSE, FP4_VALUES, E8M0_SCALES = "dense", "fp4", "scales"
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclasses.dataclass(frozen=True)
class Part:
    leaf: tuple  # path of the parameter in the model's state
    leaf_shape: tuple[int, ...]
    kind: str  # DENSE, FP4_VALUES or E8M0_SCALES

    @property
    def disk_shape(self) -> tuple[int, ...]:
        s = self.leaf_shape
        if self.kind == FP4_VALUES:
            return (*s[:-1], s[-1] // 2)
        return s


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    parts: tuple[Part, ...]


def _dense(name, leaf, leaf_shape, disk_shape):
    return TensorSpec(name, tuple(disk_shape), BF16, (Part(leaf, tuple(leaf_shape), DENSE),))


def _experts(prefix_blocks, prefix_scales, leaf_prefix, c: GptOssConfig, rows, inputs):
    groups = inputs // BLOCK
    e = c.num_experts
    return [
        TensorSpec(prefix_blocks, (e, rows, groups, BYTES_PER_BLOCK), np.dtype(np.uint8),
                   (Part((*leaf_prefix[:-1], leaf_prefix[-1] + "_fp4"), (e, rows, groups, BLOCK), FP4_VALUES),)),
        TensorSpec(prefix_scales, (e, rows, groups), np.dtype(np.uint8),
                   (Part((*leaf_prefix[:-1], leaf_prefix[-1] + "_scales"), (e, rows, groups), E8M0_SCALES),)),
    ]


def tensor_specs(config: GptOssConfig, layout: str) -> list[TensorSpec]:
    """Every tensor of a checkpoint in `layout`, in the order the writer stores them."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; use one of {LAYOUTS}")
    c = config
    d, h, kv, hd, e, i2 = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                           c.num_experts, 2 * c.intermediate_size)
    specs = []
    hf = layout == HF
    specs.append(_dense("model.embed_tokens.weight" if hf else "embedding.weight", ("embedding",),
                        (c.vocab_size, d), (c.vocab_size, d)))
    for n in range(c.num_hidden_layers):
        a, m = ("blocks", n, "attn"), ("blocks", n, "mlp")
        if hf:
            p = f"model.layers.{n}."
            specs += [
                _dense(p + "input_layernorm.weight", (*a, "norm", "scale"), (d,), (d,)),
                _dense(p + "self_attn.q_proj.weight", (*a, "wq"), (h, hd, d), (h * hd, d)),
                _dense(p + "self_attn.q_proj.bias", (*a, "bq"), (h, hd), (h * hd,)),
                _dense(p + "self_attn.k_proj.weight", (*a, "wk"), (kv, hd, d), (kv * hd, d)),
                _dense(p + "self_attn.k_proj.bias", (*a, "bk"), (kv, hd), (kv * hd,)),
                _dense(p + "self_attn.v_proj.weight", (*a, "wv"), (kv, hd, d), (kv * hd, d)),
                _dense(p + "self_attn.v_proj.bias", (*a, "bv"), (kv, hd), (kv * hd,)),
                _dense(p + "self_attn.o_proj.weight", (*a, "wo"), (d, h, hd), (d, h * hd)),
                _dense(p + "self_attn.o_proj.bias", (*a, "bo"), (d,), (d,)),
                _dense(p + "self_attn.sinks", (*a, "sinks"), (h,), (h,)),
                _dense(p + "post_attention_layernorm.weight", (*m, "norm", "scale"), (d,), (d,)),
                _dense(p + "mlp.router.weight", (*m, "router_w"), (e, d), (e, d)),
                _dense(p + "mlp.router.bias", (*m, "router_b"), (e,), (e,)),
                *_experts(p + "mlp.experts.gate_up_proj_blocks", p + "mlp.experts.gate_up_proj_scales",
                          (*m, "mlp1"), c, i2, d),
                _dense(p + "mlp.experts.gate_up_proj_bias", (*m, "mlp1_bias"), (e, i2), (e, i2)),
                *_experts(p + "mlp.experts.down_proj_blocks", p + "mlp.experts.down_proj_scales",
                          (*m, "mlp2"), c, d, c.intermediate_size),
                _dense(p + "mlp.experts.down_proj_bias", (*m, "mlp2_bias"), (e, d), (e, d)),
            ]
        else:
            p = f"block.{n}."
            qkv_rows = (h + 2 * kv) * hd
            specs += [
                _dense(p + "attn.norm.scale", (*a, "norm", "scale"), (d,), (d,)),
                TensorSpec(p + "attn.qkv.weight", (qkv_rows, d), BF16, (
                    Part((*a, "wq"), (h, hd, d), DENSE), Part((*a, "wk"), (kv, hd, d), DENSE),
                    Part((*a, "wv"), (kv, hd, d), DENSE))),
                TensorSpec(p + "attn.qkv.bias", (qkv_rows,), BF16, (
                    Part((*a, "bq"), (h, hd), DENSE), Part((*a, "bk"), (kv, hd), DENSE),
                    Part((*a, "bv"), (kv, hd), DENSE))),
                _dense(p + "attn.sinks", (*a, "sinks"), (h,), (h,)),
                _dense(p + "attn.out.weight", (*a, "wo"), (d, h, hd), (d, h * hd)),
                _dense(p + "attn.out.bias", (*a, "bo"), (d,), (d,)),
                _dense(p + "mlp.norm.scale", (*m, "norm", "scale"), (d,), (d,)),
                _dense(p + "mlp.gate.weight", (*m, "router_w"), (e, d), (e, d)),
                _dense(p + "mlp.gate.bias", (*m, "router_b"), (e,), (e,)),
                *_experts(p + "mlp.mlp1_weight.blocks", p + "mlp.mlp1_weight.scales", (*m, "mlp1"), c, i2, d),
                _dense(p + "mlp.mlp1_bias", (*m, "mlp1_bias"), (e, i2), (e, i2)),
                *_experts(p + "mlp.mlp2_weight.blocks", p + "mlp.mlp2_weight.scales", (*m, "mlp2"), c, d,
                          c.intermediate_size),
                _dense(p + "mlp.mlp2_bias", (*m, "mlp2_bias"), (e, d), (e, d)),
            ]
    specs.append(_dense("model.norm.weight" if hf else "norm.scale", ("norm", "scale"), (d,), (d,)))
    specs.append(_dense("lm_head.weight" if hf else "unembedding.weight", ("unembedding",),
                        (c.vocab_size, d), (c.vocab_size, d)))
    return specs


# ----------------------------------------------------------------------------- export
def leaf_to_disk(leaf: np.ndarray, part: Part) -> np.ndarray:
    """A parameter leaf (host numpy) in its on-disk form."""
    if part.kind == FP4_VALUES:
        codes = np.asarray(leaf).view(np.uint8) & 0x0F
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    if part.kind == E8M0_SCALES:
        return np.asarray(leaf).view(np.uint8)
    return np.asarray(leaf).astype(BF16)


def _disk_rows(part: Part, spec: TensorSpec) -> int:
    return int(np.prod(part.disk_shape)) // int(np.prod(spec.shape[1:]))


def part_byte_ranges(spec: TensorSpec, itemsize: int) -> list[tuple[Part, int, int]]:
    """(part, first byte, end byte) of each part within the tensor's data."""
    out, start = [], 0
    for part in spec.parts:
        nbytes = int(np.prod(part.disk_shape, dtype=np.int64)) * itemsize
        out.append((part, start, start + nbytes))
        start += nbytes
    return out


def tensor_from_parts(spec: TensorSpec, disk_form) -> np.ndarray:
    """Builds one checkpoint tensor from its parts; `disk_form(part)` returns the part's
    on-disk form in leaf order (FP4 packed, scales as bytes or E8M0, dense in its dtype)."""
    pieces = []
    for part in spec.parts:
        piece = np.asarray(disk_form(part))
        if part.kind == E8M0_SCALES:
            piece = piece.view(np.uint8)
        pieces.append(piece.reshape(_disk_rows(part, spec), *spec.shape[1:]))
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


def tensor_from_leaves(spec: TensorSpec, get_leaf) -> np.ndarray:
    """Builds one checkpoint tensor from the leaves it holds; `get_leaf(path)` returns numpy."""
    return tensor_from_parts(spec, lambda part: leaf_to_disk(get_leaf(part.leaf), part))


def write_checkpoint(path, config: GptOssConfig, layout: str, produce, *, max_shard_bytes: int = HF_SHARD_BYTES,
                     dtypes: dict[str, np.dtype] | None = None, hf_config: dict | None = None) -> Path:
    """Writes a checkpoint in `layout` one tensor at a time: `produce(spec)` returns each
    tensor in its on-disk form. HF layout: `config.json` (`hf_config`, default
    `config.to_hf_dict()`), `model-0000k-of-0000n.safetensors` shards of at most
    `max_shard_bytes` and the index, in `path`. Original layout: `config.json`,
    `model.safetensors` and `dtypes.json` in `path/original`. `dtypes` overrides the dtype of
    dense tensors (default BF16). Returns the folder holding the files."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    root = Path(path) / ("original" if layout == ORIGINAL else "")
    root.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(config, layout)
    dtypes = dtypes or {}
    by_name = {s.name: s for s in specs}

    def dtype_of(spec):
        return np.dtype(dtypes.get(spec.name, spec.dtype))

    shards = _group_into_shards(specs, dtype_of, max_shard_bytes) if layout == HF else [specs]
    weight_map = {}
    for k, shard in enumerate(shards):
        file_name = (f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if layout == HF
                     else "model.safetensors")
        write_safetensors(root / file_name, [(s.name, s.shape, dtype_of(s)) for s in shard],
                          lambda name: produce(by_name[name]))
        weight_map.update({s.name: file_name for s in shard})

    if layout == HF:
        total = sum(int(np.prod(s.shape)) * dtype_of(s).itemsize for s in specs)
        (root / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
        (root / "config.json").write_text(json.dumps(hf_config or config.to_hf_dict(), indent=2))
    else:
        (root / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2))
        names = {FP4_VALUES: "FP4", E8M0_SCALES: "UE8"}
        dtype_names = {s.name: names.get(s.parts[0].kind, DTYPE_NAMES[dtype_of(s)]) for s in specs}
        (root / "dtypes.json").write_text(json.dumps(dtype_names, indent=2))
    return root


def _group_into_shards(specs, dtype_of, max_bytes):
    shards, current, size = [], [], 0
    for s in specs:
        nbytes = int(np.prod(s.shape)) * dtype_of(s).itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += nbytes
    return shards + [current] if current else shards


# ----------------------------------------------------------------------------- import
def tensor_to_leaves(spec: TensorSpec, array: np.ndarray) -> list[tuple[Part, np.ndarray]]:
    """Splits a checkpoint tensor into its leaves' on-disk forms reshaped to leaf order.
    FP4 parts stay packed bytes [..., 16] (unpack with `mxfp4.blocks_to_fp4`); scales are
    viewed as E8M0; dense parts keep their stored dtype."""
    out, row = [], 0
    for part in spec.parts:
        rows = _disk_rows(part, spec)
        piece = array[row:row + rows]
        row += rows
        if part.kind == E8M0_SCALES:
            piece = piece.view(ml_dtypes.float8_e8m0fnu)
        elif part.kind == DENSE:
            piece = piece.reshape(part.leaf_shape)
        out.append((part, piece))
    return out


def unpack_leaf_numpy(part: Part, disk_piece: np.ndarray) -> np.ndarray:
    """A leaf in model form on the host (FP4 unpacked to one ml_dtypes element per value)."""
    if part.kind == FP4_VALUES:
        return blocks_to_fp4_numpy(np.asarray(disk_piece))
    return np.asarray(disk_piece)


class Checkpoint:
    """A checkpoint directory in either MXFP4 layout, validated against its config on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.layout, self.root = detect_layout(self.path)
        self.config = read_config(self.root / "config.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.file_of: dict[str, str] = {}
        for file_name, tensor_names in self._shards().items():
            f = SafetensorsFile(self.root / file_name)
            self.files[file_name] = f
            for name in (tensor_names if tensor_names is not None else f.names()):
                if name not in f.entries:
                    raise CheckpointError(f"{f.path}: the index lists tensor '{name}' but the file lacks it")
                self.file_of[name] = file_name
        self.specs = tensor_specs(self.config, self.layout)
        self._validate()

    def _shards(self) -> dict[str, list[str] | None]:
        if self.layout == HF and (self.root / HF_INDEX).exists():
            index_path = self.root / HF_INDEX
            index = read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: not a valid safetensors index (no 'weight_map' object)")
            shards: dict[str, list[str]] = {}
            for name, file_name in weight_map.items():
                shards.setdefault(file_name, []).append(name)
            for file_name in shards:
                if not (self.root / file_name).is_file():
                    raise CheckpointError(f"{index_path}: names shard '{file_name}', which does not exist")
            return shards
        return {"model.safetensors": None}

    def _validate(self):
        expected = {s.name: s for s in self.specs}
        for name in self.file_of:
            if name not in expected:
                raise CheckpointError(f"{self.where(name)}: unexpected tensor '{name}' for a {self.layout}-layout "
                                      f"gpt-oss checkpoint")
        for spec in self.specs:
            if spec.name not in self.file_of:
                raise CheckpointError(f"{self.root}: missing tensor '{spec.name}'")
            f = self.files[self.file_of[spec.name]]
            shape, dtype = f.shape(spec.name), f.dtype_name(spec.name)
            if shape != spec.shape:
                raise CheckpointError(f"{f.path}: tensor '{spec.name}' has shape {list(shape)} but the config "
                                      f"implies {list(spec.shape)}")
            packed = spec.parts[0].kind != DENSE
            if (packed and dtype != "U8") or (not packed and dtype not in FLOAT_DTYPES):
                want = "U8 (packed MXFP4)" if packed else "BF16"
                raise CheckpointError(f"{f.path}: tensor '{spec.name}' has dtype {dtype}, expected {want}")

    def where(self, name: str) -> Path:
        return self.files[self.file_of[name]].path

    def read(self, spec: TensorSpec) -> np.ndarray:
        """The tensor as stored (memory-mapped); E8M0 scales are checked for NaN (255)."""
        array = self.files[self.file_of[spec.name]].get(spec.name)
        if spec.parts[0].kind == E8M0_SCALES and np.any(array == NAN_SCALE):
            where = np.argwhere(array == NAN_SCALE)[0].tolist()
            raise CheckpointError(f"{self.where(spec.name)}: tensor '{spec.name}' has E8M0 scale 255 (NaN) at "
                                  f"index {where}; the checkpoint is corrupt")
        return array


def read_config(path: Path) -> GptOssConfig:
    """The model config in a `config.json` (any of the three kinds), named after its path."""
    try:
        return GptOssConfig.from_dict(read_json(path), name=str(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def detect_layout(path: Path) -> tuple[str, Path]:
    """(layout, folder holding its config.json and safetensors files)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the folder holding config.json and the "
                              f"safetensors files")
    if (path / HF_INDEX).exists() or ((path / "model.safetensors").exists() and not (path / "dtypes.json").exists()
                                      and (path / "config.json").exists()):
        return HF, path
    for root in (path / "original", path):
        if (root / "model.safetensors").exists() and (root / "config.json").exists():
            return ORIGINAL, root
    raise CheckpointError(f"{path}: not a gpt-oss checkpoint (expected {HF_INDEX} or model.safetensors with "
                          f"config.json, or original/model.safetensors with config.json)")
