"""Fused MXFP4 expert kernels (Pallas): read only the routed experts' packed FP4 bytes and
E8M0 scales, dequantize in registers, accumulate in fp32.

`experts_mix_decode` mirrors `MoE.expert_mix` for few tokens (tokens h [n, d], routed experts
[n, k], their weights): two grouped GEMVs (`expert_gemv`), mlp1 with the bias and the clamped
SwiGLU (docs/architecture.md 2.5), then mlp2 with the bias, the weighted sum over the k experts and the
residual add.

Layout the kernels read: FP4 values as their checkpoint bytes, uint8 [E, O, blocks, 16]
(element 2j of a block in the low nibble of byte j, 2j+1 in the high nibble), and the
scales as uint8 [E, O, blocks]. `packed_bytes` makes that view from the model's
`float4_e2m1fn` [E, O, blocks, 32] arrays (a bitcast).

Dequantization without a lookup table. An FP4 code `s e1 e0 m` placed in an fp16 as
`s` at bit 15 and `e1 e0 m` at bits 11..9 is exactly the FP4 value times 2^-14 (the FP4
subnormal 0.5 becomes an fp16 subnormal), so the block scale 2^(scale-127) is applied as
2^(scale-113) to the per-block fp32 partial sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_jax import mxfp4
from gptoss_jax.kernels.common import (
    F32,
    block_scale,
    decode_nibbles,
    decode_nibbles_ptx,
    next_power_of_2,
    round_to,
    swiglu_pair,
)


def packed_bytes(fp4):
    """float4_e2m1fn [..., blocks, 32] -> uint8 [..., blocks, 16] (the checkpoint bytes)."""
    return mxfp4.fp4_to_blocks(fp4)


def _fma(a, b, c):
    """a * b + c rounded once (PTX fma.rn.f32): XLA's Triton pipeline does not contract
    a multiply and an add on its own. Exact wherever a * b is exact in fp32."""
    shape = jnp.broadcast_shapes(a.shape, b.shape, c.shape)
    args = [jnp.broadcast_to(t.astype(F32), shape) for t in (a, b, c)]
    [out] = plgpu.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=r,r,r,r", pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(shape, F32)])
    return out


# --------------------------------------------------------------------- grouped GEMV (Triton)
def _gemv_kernel(expert_ref, weight_ref, x_ref, w_ref, s_ref, bias_ref, residual_ref, out_ref, *, rows: int,
                 blocks_per_step: int, num_blocks: int, pairs_per_x: int, pairs_per_program: int, use_ptx: bool,
                 swiglu_params, add_residual: bool):
    """One program: `rows` outputs of `pairs_per_program` (token, expert) pairs, looping over
    the contraction in steps of `blocks_per_step` 32-element blocks. Per pair, the output is
    round(round(x @ W^T) + bias) (the reference's roundings: dot in fp32, round, add the bias
    in the compute dtype); with `swiglu_params` the program reads the interleaved gate and
    up rows of its `rows` outputs and applies the clamped SwiGLU. With several pairs per
    program (a token's k experts) it writes their sum weighted by weight_ref in fp32, or with
    add_residual the residual row plus that sum rounded to the residual's dtype. Pairs
    whose expert id is outside [0, E) (another device's expert) read no weights; they add
    nothing to a sum, and their own rows (one pair per program) hold only a bias."""
    program, row_block = pl.program_id(0), pl.program_id(1)
    pairs = [program * pairs_per_program + j for j in range(pairs_per_program)]
    experts = [expert_ref[p] for p in pairs]
    num_experts = w_ref.shape[0]
    live = [(e >= 0) & (e < num_experts) for e in experts]
    experts = [jnp.clip(e, 0, num_experts - 1) for e in experts]
    # The refs come as [.., O/2, 2, ..] (w, scales, bias) and [X, D/2, 2] (x) views, so that
    # every-other-row and every-other-feature slices are plain indexing.
    # Each entry: (slice of the O/2 axis, slice of the pair axis) covering `rows` outputs.
    if swiglu_params is None:  # output o is (o // 2, o % 2): both halves of rows/2 pairs
        row_slices = [(pl.ds(row_block * rows // 2, rows // 2), pl.ds(0, 2))]
    else:  # gate j at row 2j, up j at row 2j + 1 (docs/architecture.md 2.5)
        row_slices = [(pl.ds(row_block * rows, rows), pl.ds(0, 1)), (pl.ds(row_block * rows, rows), pl.ds(1, 1))]
    # One accumulator per (pair, row slice); streams[i] = (pair index j, row slice).
    streams = [(j, sl) for j in range(pairs_per_program) for sl in row_slices]
    steps = -(-num_blocks // blocks_per_step)
    half = blocks_per_step * 16

    def load(i):
        """The step's x halves per pair and, per stream, its packed bytes and scales (masked
        past the last block and for dead pairs: those load nothing)."""
        start = i * blocks_per_step
        in_range = start + jnp.arange(blocks_per_step) < num_blocks
        x_mask = jnp.broadcast_to(in_range[:, None, None], (blocks_per_step, 16, 1)).reshape(half, 1)
        xs = []
        for j in range(pairs_per_program):
            x_row = pairs[j] // pairs_per_x
            xs += [plgpu.load(x_ref.at[x_row, pl.ds(start * 16, half), pl.ds(parity, 1)], mask=x_mask, other=0)
                   for parity in (0, 1)]
        weights = []
        for j, (pair_slice, half_slice) in streams:
            ok = in_range & live[j]
            w_mask = jnp.broadcast_to(ok[None, None, :, None], (pair_slice.size, half_slice.size, blocks_per_step, 16))
            s_mask = jnp.broadcast_to(ok[None, None, :], (pair_slice.size, half_slice.size, blocks_per_step))
            blocks = pl.ds(start, blocks_per_step)
            w = plgpu.load(w_ref.at[experts[j], pair_slice, half_slice, blocks, :], mask=w_mask, other=0)
            s_ = plgpu.load(s_ref.at[experts[j], pair_slice, half_slice, blocks], mask=s_mask, other=0)
            weights += [w.reshape(rows, blocks_per_step, 16), s_.reshape(rows, blocks_per_step)]
        return tuple(xs), tuple(weights)

    def accumulate(accs, loaded):
        xs, weights = loaded
        new = []
        for n, (acc, (j, _)) in enumerate(zip(accs, streams)):
            xe = xs[2 * j].astype(F32).reshape(blocks_per_step, 16)[None]
            xo = xs[2 * j + 1].astype(F32).reshape(blocks_per_step, 16)[None]
            w, s_ = weights[2 * n], weights[2 * n + 1]
            scale = block_scale(s_)
            low, high = decode_nibbles_ptx(w) if use_ptx else decode_nibbles(w.astype(jnp.int32))
            pair_sums = _fma(high, xo, low * xe) if use_ptx else low * xe + high * xo
            new.append(acc + jnp.sum(jnp.sum(pair_sums, axis=2) * scale, axis=1))
        return tuple(new)

    zeros = tuple(jnp.zeros((rows,), F32) for _ in streams)
    accs = jax.lax.fori_loop(0, steps, lambda i, accs: accumulate(accs, load(i)), zeros)
    dt = x_ref.dtype
    outs = [round_to(round_to(a, dt) + bias_ref[experts[j], pair_slice, half_slice].reshape(rows).astype(F32), dt)
            for a, (j, (pair_slice, half_slice)) in zip(accs, streams)]
    if swiglu_params is not None:
        outs = [swiglu_pair(outs[2 * j], outs[2 * j + 1], *swiglu_params, dt).astype(F32)
                for j in range(pairs_per_program)]
    if pairs_per_program == 1:
        out_ref[...] = outs[0].astype(out_ref.dtype)
    else:  # the weighted sum over the token's experts, in fp32 in slot order
        total = jnp.zeros((rows,), F32)
        for j, y in enumerate(outs):
            total = total + jnp.where(live[j], weight_ref[pairs[j]].astype(F32) * y, 0.0)
        if add_residual:  # as x + MoE(x) in the compute dtype: round the sum, add, round
            residual = plgpu.load(residual_ref.at[program, pl.ds(row_block * rows, rows)]).astype(F32)
            total = round_to(total, out_ref.dtype) + residual
        out_ref[...] = total.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("pairs_per_x", "pairs_per_program", "swiglu_params", "rows",
                                             "blocks_per_step", "num_warps", "num_stages", "use_ptx",
                                             "interpret"))
def expert_gemv(x, pair_expert, w_bytes, w_scales, bias, pair_weight=None, residual=None, *, pairs_per_x=1,
                pairs_per_program=1,
                swiglu_params=None, rows=8, blocks_per_step=32, num_warps=4, num_stages=1, use_ptx=True,
                interpret=False):
    """Grouped GEMV over (token, expert) pairs, reading only pair_expert's packed FP4 rows.

    x [X, D] in the compute dtype; pair p uses row p // pairs_per_x of x and expert
    pair_expert[p]. w_bytes uint8 [E, O, D/32, 16], w_scales uint8 or E8M0 [E, O, D/32],
    bias [E, O]. Returns [P, O] = round(x @ W^T) + bias, or with swiglu_params=(limit, alpha)
    [P, O/2] = SwiGLU of the interleaved gate/up outputs.
    With pairs_per_program=k and pair_weight [P]: returns fp32 [P/k, O'], the sum over each
    group of k consecutive pairs of pair_weight * (the pair's output); expert ids outside
    [0, E) add nothing. With residual [P/k, O'] as well: residual + that sum rounded to
    residual's dtype, in residual's dtype."""
    d = x.shape[1]
    num_pairs = pair_expert.shape[0]
    _, out_rows, num_blocks, _ = w_bytes.shape
    if d != num_blocks * mxfp4.BLOCK:
        raise ValueError(f"expert_gemv: x has {d} features but the weights hold {num_blocks} blocks of 32")
    if num_pairs % pairs_per_program or (pairs_per_program > 1) != (pair_weight is not None):
        raise ValueError(f"expert_gemv: {num_pairs} pairs in groups of {pairs_per_program} need "
                         f"{'pair_weight' if pairs_per_program > 1 else 'no pair_weight'}")
    outputs = out_rows if swiglu_params is None else out_rows // 2
    programs = num_pairs // pairs_per_program
    if residual is not None and (pairs_per_program == 1 or residual.shape != (programs, outputs)):
        raise ValueError(f"expert_gemv: a residual needs pairs_per_program > 1 and shape {(programs, outputs)}, "
                         f"got pairs_per_program={pairs_per_program}, shape {residual.shape}")
    rows = max(2, min(rows, next_power_of_2(outputs)))
    if outputs % rows:
        raise ValueError(f"expert_gemv: {outputs} outputs are not a multiple of the row tile {rows}")
    blocks_per_step = min(blocks_per_step, next_power_of_2(num_blocks))
    kernel = functools.partial(_gemv_kernel, rows=rows, blocks_per_step=blocks_per_step, num_blocks=num_blocks,
                               pairs_per_x=pairs_per_x, pairs_per_program=pairs_per_program,
                               use_ptx=use_ptx and not interpret, swiglu_params=swiglu_params,
                               add_residual=residual is not None)
    if pair_weight is None:
        pair_weight = jnp.zeros((num_pairs,), x.dtype)
    out_dtype = x.dtype if pairs_per_program == 1 else F32 if residual is None else residual.dtype
    if residual is None:
        residual = jnp.zeros((1, 1), x.dtype)  # not read
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((programs, outputs), out_dtype),
        grid=(programs, outputs // rows),
        in_specs=[anywhere] * 7,
        out_specs=pl.BlockSpec((None, rows), lambda p, r: (p, r)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="mxfp4_expert_gemv" if swiglu_params is None else "mxfp4_expert_gemv_swiglu",
    )(pair_expert.astype(jnp.int32), pair_weight, x.reshape(x.shape[0], d // 2, 2),
      w_bytes.reshape(-1, out_rows // 2, 2, num_blocks, 16),
      jax.lax.bitcast_convert_type(w_scales, jnp.uint8).reshape(-1, out_rows // 2, 2, num_blocks),
      bias.reshape(-1, out_rows // 2, 2), residual)


def experts_mix_decode(h, experts, mlp1_bytes, mlp1_scales, mlp1_bias, mlp2_bytes, mlp2_scales, mlp2_bias,
                       *, weights, limit: float, alpha: float, residual=None, interpret: bool = False):
    """Same as MoE.expert_mix for few tokens: h [n, d], experts [n, k] (ids outside [0, E):
    another device's experts, which add nothing), weights [n, k] -> fp32 [n, d], the
    weighted sum of the token's expert outputs; with residual [n, d], residual + that sum in
    the residual's dtype (the MoE block's residual connection). The second kernel sums a
    token's k experts itself, so no [n, k, d] intermediate is written."""
    k = experts.shape[1]
    pair_expert = experts.reshape(-1)  # ids outside [0, E) read nothing and add nothing
    a = expert_gemv(h, pair_expert, mlp1_bytes, mlp1_scales, mlp1_bias, pairs_per_x=k,
                    swiglu_params=(float(limit), float(alpha)), interpret=interpret)
    return expert_gemv(a, pair_expert, mlp2_bytes, mlp2_scales, mlp2_bias, weights.reshape(-1), residual,
                       pairs_per_program=k, interpret=interpret)
