"""The one table mapping the model's logical axes to mesh axes, and placement on a mesh.

Mesh axes: "data" (batch), "expert" (expert parallelism), "model" (tensor parallelism).
Layers only name logical axes (the `axes` metadata of each parameter, `CACHE_AXES` of the
KV cache); this module decides where they live. A dimension that its mesh axis does not
divide is replicated instead (for example 2 KV heads on a 4-way model axis);
`gptoss_jax.sharding.mesh.check_mesh_fits_model` rejects meshes that would replicate
something that must be split (experts, query heads, expert hidden units).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, EXPERT, MODEL = "data", "expert", "model"

LOGICAL_TO_MESH: dict[str, str | None] = {
    "batch": DATA,
    "seq": None,
    "vocab": MODEL,
    "embed": None,
    "norm": None,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "experts": EXPERT,
    "expert_mlp": MODEL,  # mlp1 output rows (gate/up pairs stay together: chunks are even)
    "expert_mlp_blocks": MODEL,  # mlp2 input blocks (the same hidden units as the mlp1 rows)
    "embed_blocks": None,
    "block": None,
}


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> PartitionSpec:
    """`mesh` is a Mesh or AbstractMesh (only its axis sizes are read)."""
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = None if name is None else LOGICAL_TO_MESH[name]
        # A size-1 mesh axis is left out (and named_sharding drops trailing Nones): the same
        # layout, in the form jit outputs carry, so state fed back into a jitted step (the
        # decode loop) hits the compiled code instead of compiling again.
        if mesh_axis is None or mesh.shape.get(mesh_axis, 1) == 1 or size % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh | None):
    """Where a parameter with these logical axes lives; no mesh means the default device."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    spec = list(partition_spec(axes, shape, mesh))
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(mesh, PartitionSpec(*spec))
