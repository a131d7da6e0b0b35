"""Running a kernel on each device's shards of a mesh (jax.shard_map).

XLA cannot split a Pallas kernel (a custom call) over devices: given global arrays it
gathers them and runs the whole kernel on every device. `per_device` instead hands each
device its own shards, split by the same rules table as the parameters (attention heads
over the model axis, experts over the expert axis, the batch over the data axis), so each
device runs the kernel on its heads, experts or sequences. Arrays a rule does not split
(the KV heads on a model axis larger than their count, say) arrive whole.

The kernels' outputs carry no note of the mesh axes they vary along, which shard_map's
check_vma requires (and Pallas' interpreter cannot evaluate index maps under it), so these
shard_maps run with check_vma off; each caller states its outputs' layout.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import Mesh

from gptoss_jax.sharding.rules import MODEL, partition_spec

Axes = tuple  # logical axis names of one array's dimensions (gptoss_jax.sharding.rules)


def per_device(mesh: Mesh, fn: Callable, args: Sequence, in_axes: Sequence[Axes], outputs: Sequence[tuple]):
    """fn(*shards) on every device, where args are global arrays split by their logical
    `in_axes`. `outputs`: one (logical axes, global shape) per output of fn, which says how
    the devices' results make the global outputs (dimensions the rules do not split are
    the same on every device, or summed by fn with a collective). Returns the global
    outputs (a tuple, or the array when fn returns one)."""
    in_specs = tuple(partition_spec(axes, a.shape, mesh) for axes, a in zip(in_axes, args, strict=True))
    out_specs = tuple(partition_spec(axes, shape, mesh) for axes, shape in outputs)
    single = len(outputs) == 1

    def body(*shards):
        out = fn(*shards)
        return (out,) if single else tuple(out)

    out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
    return out[0] if single else out


def splits(mesh: Mesh | None, axes: Axes, shape) -> bool:
    """Whether the rules split an array of this shape over any axis of `mesh`."""
    return mesh is not None and any(a is not None for a in partition_spec(axes, shape, mesh))


def heads_split_evenly(mesh: Mesh | None, heads: int, kv_heads: int) -> bool:
    """Whether each device of the model axis holds whole groups of query heads with their
    own KV heads, as the attention kernels need: no model axis, or one that divides the KV
    heads (and so the query heads). A larger model axis replicates the KV heads while it
    splits the query heads."""
    size = 1 if mesh is None else mesh.shape.get(MODEL, 1)
    return size == 1 or (heads % size == 0 and kv_heads % size == 0)
