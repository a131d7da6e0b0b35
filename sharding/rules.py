"""The one table mapping the model's logical axes to mesh axes.

Mesh axes: "data" (batch), "expert" (expert parallelism), "model" (tensor parallelism).
Layers only name logical axes (the `axes` metadata of each parameter); this module decides
where they live. A dimension that the mesh axis does not divide is replicated instead (for
example 8 KV heads on a 16-way model axis).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, EXPERT, MODEL = "data", "expert", "model"

LOGICAL_TO_MESH: dict[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "embed": None,
    "norm": None,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "experts": EXPERT,
    "expert_mlp": MODEL,  # mlp1 output rows (gate/up pairs stay together: chunks are even)
    "expert_mlp_blocks": MODEL,  # mlp2 input blocks
    "embed_blocks": None,
    "block": None,
}


def partition_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = LOGICAL_TO_MESH[name]
        if mesh_axis is None or mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh | None):
    """Where a parameter with these logical axes lives; no mesh means the default device."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))
