"""Putting arrays and models onto a mesh, and reading them back, also across processes."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax.sharding.rules import named_sharding


def put_host_array(array, sharding) -> jax.Array:
    """A host array (numpy or a memory map) onto `sharding`, reading only the slices this
    process's devices hold: with several processes each loads only its own shards."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return jax.device_put(np.asarray(array), sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.asarray(array[index]))


def put(array, axes: tuple[str | None, ...], mesh: Mesh) -> jax.Array:
    """A host array laid out on the mesh by the logical `axes` of its dimensions."""
    array = np.asarray(array)
    return put_host_array(array, named_sharding(axes, array.shape, mesh))


@functools.lru_cache(maxsize=None)
def _replicator(mesh: Mesh):
    return jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))


def fetch(x: jax.Array, mesh: Mesh | None) -> np.ndarray:
    """The whole value of a (possibly sharded, possibly multi-process) array on the host."""
    if mesh is not None and not x.is_fully_replicated:
        x = _replicator(mesh)(x)
    return np.asarray(x)
