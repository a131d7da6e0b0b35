"""Sharding over jax.sharding meshes (installed as gptoss_jax.sharding): the rules table
(rules.py), mesh specs and start-up (mesh.py), placement (placement.py), the expert-parallel
MoE (moe.py) and per-device bytes (memory.py). docs/sharding.md describes the whole."""

from gptoss_jax.sharding.memory import bytes_per_device
from gptoss_jax.sharding.mesh import MeshError, MeshSpec, check_mesh_fits_model, make_mesh, parse_mesh_spec

__all__ = ["MeshError", "MeshSpec", "bytes_per_device", "check_mesh_fits_model", "make_mesh", "parse_mesh_spec"]
