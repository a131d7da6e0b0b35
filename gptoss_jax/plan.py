"""What a model needs on each device of a mesh, from shapes alone (no devices needed)."""

from __future__ import annotations

import math

from jax.sharding import AbstractMesh

from gptoss_jax.loader import parse_dtype
from gptoss_jax.model import abstract_model
from gptoss_jax.sharding.memory import is_expert, packed_bytes
from gptoss_jax.sharding.mesh import MESH_AXES, MeshSpec, parse_mesh_spec
from gptoss_jax.sharding.rules import partition_spec


def planned_bytes_per_device(config, spec: MeshSpec | str, dtype="bfloat16") -> dict[str, float]:
    """Parameter bytes for `config` on a mesh: {"total", "experts", "other"} per device and
    "model" for the whole model (FP4 counted as half a byte)."""
    spec = parse_mesh_spec(spec) if isinstance(spec, str) else spec
    mesh = AbstractMesh(spec.shape, MESH_AXES)
    _, leaves = abstract_model(config, parse_dtype(dtype))
    out = {"total": 0.0, "experts": 0.0, "other": 0.0, "model": 0.0}
    for path, var in leaves:
        pspec = partition_spec(var.get_metadata()["axes"], var.shape, mesh)
        split = math.prod(mesh.shape[a] for a in pspec if a is not None)
        size = math.prod(var.shape)
        local = packed_bytes(var.dtype, size // split)
        out["total"] += local
        out["experts" if is_expert(path) else "other"] += local
        out["model"] += packed_bytes(var.dtype, size)
    return out
