"""Experiments (docs/performance.md entries 47-49; all measured slower or within noise and
reverted in the next commit): Hopper hints for Pallas Triton kernels that Pallas cannot
express, each a primitive that lowers itself.

- `prefetch_rows`: `cp.async.bulk.prefetch.L2` of byte ranges of a uint8 ref (thread t
  issues range t): ask for a program's whole weight tile at its start.
- `pipeline_loop(stages)`: inside a fori_loop body, sets `tt.num_stages` on the loop, so that
  Triton's pipeliner also makes loads that feed no dot asynchronous copies to shared memory.
- `max_registers(n)`: sets `ttg.maxnreg` on the module (registers per thread), for occupancy.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

_ASM = """
{{
.reg .pred p;
.reg .b32 t;
.reg .b64 a, o;
mov.u32 t, %tid.x;
setp.lt.u32 p, t, {rows};
mul.wide.u32 o, t, {row_stride};
add.s64 a, $1, o;
@p cp.async.bulk.prefetch.L2.global [a], {row_bytes};
mov.u32 $0, 0;
}}
"""


@functools.cache
def _primitive():
    from jax._src import core as jax_core
    from jax._src import effects
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering

    class L2Prefetch(jax_core.Effect):
        """Keeps the prefetch from being removed as dead code: it has no result."""

    effect = L2Prefetch()
    effects.control_flow_allowed_effects.add_type(L2Prefetch)
    prim = jax_core.Primitive("l2_prefetch")
    prim.multiple_results = True

    @prim.def_effectful_abstract_eval
    def _abstract_eval(ref, offset, *, rows, row_bytes, row_stride):
        del ref, offset, rows, row_bytes, row_stride
        return [], {effect}

    @lowering.register_lowering(prim)
    def _lower(ctx, ptr, offset, *, rows, row_bytes, row_stride):
        del ctx
        address = tt_dialect.addptr(ptr.type, ptr, offset)
        asm = _ASM.format(rows=rows, row_bytes=row_bytes, row_stride=row_stride)
        tt_dialect.elementwise_inline_asm([ir.IntegerType.get_signless(32)], asm, constraints="=r,l", pure=False,
                                          packed_element=1, args=[address])
        return []

    return prim


def prefetch_rows(ref, offset, *, rows: int = 1, row_bytes: int, row_stride: int = 0):
    """Prefetch `rows` ranges of `row_bytes` bytes, `row_stride` bytes apart, starting at
    byte `offset` (a traced int32 scalar) of the uint8 ref, into L2. See the module doc."""
    if ref.dtype != jnp.uint8:
        raise ValueError(f"prefetch_rows: the ref must hold uint8, got {ref.dtype}")
    if row_bytes % 16 or row_stride % 16 or row_bytes <= 0:
        raise ValueError(f"prefetch_rows: row_bytes ({row_bytes}) and row_stride ({row_stride}) must be "
                         "positive multiples of 16 bytes")
    if ref.size >= 2**31:
        raise ValueError(f"prefetch_rows: the ref holds {ref.size} bytes; int32 offsets reach 2^31")
    _primitive().bind(ref, jnp.asarray(offset, jnp.int32), rows=int(rows), row_bytes=int(row_bytes),
                      row_stride=int(row_stride))


@functools.cache
def _stages_primitive():
    from jax._src import core as jax_core
    from jax._src import effects
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    class LoopHint(jax_core.Effect):
        """Keeps the hint from being removed as dead code: it has no result."""

    effect = LoopHint()
    effects.control_flow_allowed_effects.add_type(LoopHint)
    prim = jax_core.Primitive("pipeline_loop_hint")
    prim.multiple_results = True

    @prim.def_effectful_abstract_eval
    def _abstract_eval(*, stages):
        del stages
        return [], {effect}

    @lowering.register_lowering(prim)
    def _lower(ctx, *, stages):
        del ctx
        loop = ir.InsertionPoint.current.block.owner
        if loop.name != "scf.for":
            raise ValueError(f"pipeline_loop: call it inside a fori_loop body, not in {loop.name}")
        loop.attributes["tt.num_stages"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), stages)
        return []

    return prim


def pipeline_loop(stages: int):
    """Inside a fori_loop body of a Pallas Triton kernel: mark the loop for Triton's software
    pipeliner with `stages` stages. With the mark, Triton also pipelines loads that feed no
    dot (asynchronous copies to shared memory, `stages - 1` steps ahead); without it, only
    loads that feed a dot are pipelined."""
    _stages_primitive().bind(stages=int(stages))


@functools.cache
def _registers_primitive():
    from jax._src import core as jax_core
    from jax._src import effects
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    class RegisterCap(jax_core.Effect):
        """Keeps the cap from being removed as dead code: it has no result."""

    effect = RegisterCap()
    effects.control_flow_allowed_effects.add_type(RegisterCap)
    prim = jax_core.Primitive("max_registers")
    prim.multiple_results = True

    @prim.def_effectful_abstract_eval
    def _abstract_eval(*, registers):
        del registers
        return [], {effect}

    @lowering.register_lowering(prim)
    def _lower(ctx, *, registers):
        del ctx
        op = ir.InsertionPoint.current.block.owner
        while op.name != "builtin.module":
            op = op.parent
        op.attributes["ttg.maxnreg"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), registers)
        return []

    return prim


def max_registers(registers: int):
    """Cap the kernel's registers per thread (Triton's `maxnreg`)."""
    _registers_primitive().bind(registers=int(registers))
