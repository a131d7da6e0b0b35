"""Parameter bytes per device, FP4 counted as half a byte.

`jax.Array.nbytes` counts one byte per float4_e2m1fn element (that is how XLA's CPU and GPU
buffers hold them); in a checkpoint, and in packed TPU/kernel layouts, two FP4 values share
a byte. These helpers count the packed size, so the numbers say what the model needs.
"""

from __future__ import annotations

import collections

import jax
import ml_dtypes
import numpy as np
from flax import nnx

FP4 = np.dtype(ml_dtypes.float4_e2m1fn)
EXPERT_LEAVES = ("mlp1_fp4", "mlp1_scales", "mlp1_bias", "mlp2_fp4", "mlp2_scales", "mlp2_bias")
TPU_EXPERTS = "tpu_experts"  # the MoE attribute holding experts in the TPU kernel's layout


def packed_bytes(dtype, size: int) -> float:
    if np.dtype(dtype) == FP4:
        return size / 2
    return size * np.dtype(dtype).itemsize


def is_expert(path) -> bool:
    """A parameter of the experts, as ExpertWeights or in the TPU kernel's layout."""
    return str(path[-1]) in EXPERT_LEAVES or TPU_EXPERTS in (str(p) for p in path)


def bytes_per_device(model, *, experts_only: bool = False) -> dict[jax.Device, float]:
    """Bytes of the model's parameters on each of this process's devices."""
    totals: dict[jax.Device, float] = collections.defaultdict(float)
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if experts_only and not is_expert(path):
            continue
        array = value[...]
        for shard in array.addressable_shards:
            totals[shard.device] += packed_bytes(array.dtype, shard.data.size)
    return dict(totals)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
