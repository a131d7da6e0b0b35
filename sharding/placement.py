"""Putting arrays and models onto a mesh, and reading them back, also across processes."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax.sharding.rules import named_sharding


def put_host_array(array, sharding) -> jax.Array:
    """A host array (numpy or a memory map) onto `sharding`, reading only the slices this
    process's devices hold: with several processes each loads only its own shards."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return jax.device_put(np.asarray(array), sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.asarray(array[index]))


def param_placement(var, sharding):
    """Where a model parameter is stored: `sharding`, and for a table read a row at a time
    (metadata `row_lookup`: the token embedding) on TPUs also a row-major layout. XLA:TPU's
    default layout for gpt-oss's [201088, 2880] puts the vocabulary on the lanes (201088 is a
    multiple of 128, 2880 is not), and a lookup of more than one row then first copies the
    whole table into row-major order: 1.1 GiB of temporaries in every prefill and training
    step. Elsewhere, and for other parameters, the default layout is kept."""
    if not var.get_metadata().get("row_lookup") or next(iter(sharding.device_set)).platform != "tpu":
        return sharding
    return Format(Layout(major_to_minor=tuple(range(len(var.shape)))), sharding)


def place_params(leaves, values: dict) -> None:
    """Re-places the `values` (by path) of the parameter `leaves` whose placement asks for a
    layout of its own (param_placement); the others are left as they are."""
    for path, var in leaves:
        value = values.get(path)
        if isinstance(value, jax.Array):
            target = param_placement(var, value.sharding)
            if isinstance(target, Format) and value.format.layout.major_to_minor != target.layout.major_to_minor:
                values[path] = jax.device_put(value, target)


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
