"""Grouped MXFP4 GEMM (Pallas, Triton) for the MoE experts when many (token, expert) pairs
run at once: decode batches and prefill.

`experts_grouped_kernel` has the contract of `MoE.experts_grouped`: tokens h [n, d],
routed experts [n, k] -> [n, k, d], with the same roundings (docs/architecture.md 2.5): mlp1 accumulated
in fp32, rounded, + bias, clamped SwiGLU; mlp2 accumulated in fp32, rounded, + bias.

The pairs are sorted by expert in XLA and cut into tiles of at most `block_m` pairs of one
expert (`tile_schedule`). A program computes one tile x `block_n` outputs: it streams the
expert's packed FP4 bytes and E8M0 scales, builds the exact bf16 (or fp32) weights in
registers (an FP4 value times a power of two is exact in bf16) and accumulates with
tensor-core dots in fp32. Each expert's weights are read once per tile, not once per pair
as in the grouped GEMV (kernels/moe.py).

Nibble interleave: byte j of a 32-element block holds input feature 2j in its low nibble
and 2j+1 in its high nibble. Instead of interleaving the decoded nibbles, the kernel takes
its input split into parity planes, x [2, pairs, d/2] (even features, odd features), and
contracts low nibbles with plane 0 and high nibbles with plane 1: two dots per step.
mlp1 writes its activation in the same parity planes (program column blocks alternate
between even and odd activation columns), so mlp2 reads it directly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_jax import mxfp4
from gptoss_jax.kernels.common import (
    F32,
    TileSchedule,
    block_scale,
    decode_nibbles,
    decode_nibbles_ptx,
    round_to,
    swiglu_pair,
    tile_schedule,
)

HALF_BLOCK = mxfp4.BYTES_PER_BLOCK  # 16 bytes = 16 even + 16 odd features of a block


# ---------------------------------------------------------------------------- the kernel
def _dequantized(w_u8, s_u8, dtype, use_ptx: bool):
    """Packed bytes [BN, bk, 16] + E8M0 scales [BN, bk] -> (low, high) nibble weights, each
    [BN, bk * 16] in `dtype`, exact: (FP4 * 2^-14) * 2^(s - 127 + 14) in fp32, then cast."""
    rows, blocks, _ = w_u8.shape
    low, high = decode_nibbles_ptx(w_u8) if use_ptx else decode_nibbles(w_u8.astype(jnp.int32))
    scale = block_scale(s_u8)[:, :, None]
    return tuple((v * scale).astype(dtype).reshape(rows, blocks * HALF_BLOCK) for v in (low, high))


# FP4 -> bf16 times the block scale, 4 bytes per asm instance, for the low (even) or high
# (odd) nibbles: the nibble's bits placed as a bf16 (value * 2^-126; the 0.5 code is a bf16
# subnormal, which bf16 arithmetic keeps) and multiplied by the scale as the bf16 2^(s-1):
# exact for scales 0..128 (docs/performance-log.md entry 41). $2: 4 bytes; $3, $4: 4 scales.
def _bf16_ptx(code_shift: int, sign_shift: int) -> str:
    """The asm for one nibble of 4 bytes: bytes 0-1 then 2-3 spread to the two halves of a
    register (prmt), the 3 magnitude bits and the sign shifted into place, times the scale."""
    halves = [f"""prmt.b32 u, $2, 0, {spread};
shl.b32 a, u, {code_shift};
and.b32 a, a, 0x01C001C0;
shl.b32 b, u, {sign_shift};
and.b32 b, b, 0x80008000;
or.b32 a, a, b;
mul.rn.bf16x2 ${out}, a, ${out + 3};""" for out, spread in ((0, "0x4140"), (1, "0x4342"))]
    return "{\n.reg .b32 u, a, b;\n" + "\n".join(halves) + "\n}"


_PTX_BF16_LOW, _PTX_BF16_HIGH = _bf16_ptx(6, 12), _bf16_ptx(2, 8)


def _dequantized_bf16(w_u8, s_u8):
    """Packed bytes [BN, bk, 16] + scales [BN, bk] -> (low, high) nibble weights as bf16
    [BN, bk * 16], decoded where Triton places the MMA operand (after its layout change)."""
    rows, blocks, _ = w_u8.shape
    scale = jax.lax.bitcast_convert_type((s_u8.astype(jnp.uint16) + 126) << 7, jnp.bfloat16)
    scale = jnp.broadcast_to(scale[:, :, None], w_u8.shape)
    shape = jax.ShapeDtypeStruct(w_u8.shape, jnp.bfloat16)
    outs = []
    for asm in (_PTX_BF16_LOW, _PTX_BF16_HIGH):
        [out] = plgpu.elementwise_inline_asm(asm, args=[w_u8, scale],
                                             constraints="=r,=r,r,r,r", pack=4, result_shape_dtypes=[shape])
        outs.append(out.reshape(rows, blocks * HALF_BLOCK))
    return tuple(outs)


def _gemm_kernel(expert_ref, start_ref, rows_ref, x_ref, w_ref, s_ref, bias_ref, out_ref, *, block_m: int,
                 block_n: int, blocks_per_step: int, num_blocks: int, col_blocks: int, use_ptx: bool,
                 swap_ab: bool, swiglu_params, bf16_decode: bool = False):
    """Program (n, t): tile t (<= block_m pairs of one expert) x block_n output columns.

    x_ref [2, P, K/2] parity planes of the input; w_ref [E, R, G, K/32, 16] packed bytes,
    s_ref [E, R, G, K/32] scales, bias_ref [E, R, G]; out_ref [planes, P, R].
    Without swiglu_params: G = 1, one plane, out = round(x @ W^T) + bias.
    With swiglu_params: mlp1 rows viewed as [I/2, 4]: for activation column c = 2m + p the
    gate row is (m, 2p) and the up row (m, 2p + 1); plane p of the output holds the
    activation columns of parity p (the next kernel's input planes).
    swap_ab: accumulate out^T = W x^T, so the dequantized weights (in registers) are the
    left operand and the tile's pairs the N side of the MMA: tensor-core shapes need
    M >= 64 but allow a small N, which suits tiles of few pairs."""
    n, tile = pl.program_id(0), pl.program_id(1)
    tile_rows = rows_ref[tile]

    @pl.when(tile_rows > 0)
    def _():
        expert, row0 = expert_ref[tile], start_ref[tile]
        plane, col0 = n // col_blocks, (n % col_blocks) * block_n
        groups = (jnp.int32(0),) if swiglu_params is None else (2 * plane, 2 * plane + 1)
        num_rows = w_ref.shape[1]
        row_ok = jnp.arange(block_m) < tile_rows
        col_ok = col0 + jnp.arange(block_n) < num_rows
        rows, cols = pl.ds(row0, block_m), pl.ds(col0, block_n)
        width = blocks_per_step * HALF_BLOCK
        dtype = x_ref.dtype
        precision = jax.lax.Precision.HIGHEST if dtype == F32 else None

        def load(i):
            """Step i's input planes and, per row group, packed bytes and scales (masked past
            the last block, past the tile's pairs and past the last output column)."""
            block0 = i * blocks_per_step
            block_ok = block0 + jnp.arange(blocks_per_step) < num_blocks
            feature_ok = jnp.broadcast_to(block_ok[:, None], (blocks_per_step, HALF_BLOCK)).reshape(width)
            x_mask = row_ok[:, None] & feature_ok[None, :]
            features = pl.ds(block0 * HALF_BLOCK, width)
            loaded = [plgpu.load(x_ref.at[jnp.int32(parity), rows, features], mask=x_mask, other=0)
                      for parity in (0, 1)]
            blocks = pl.ds(block0, blocks_per_step)
            s_mask = col_ok[:, None] & block_ok[None, :]
            w_mask = jnp.broadcast_to(s_mask[:, :, None], (block_n, blocks_per_step, HALF_BLOCK))
            for group in groups:
                loaded += [plgpu.load(w_ref.at[expert, cols, group, blocks, :], mask=w_mask, other=0),
                           plgpu.load(s_ref.at[expert, cols, group, blocks], mask=s_mask, other=0)]
            return tuple(loaded)

        def accumulate(accs, loaded):
            x_even, x_odd = loaded[:2]
            new = []
            for n, acc in enumerate(accs):
                if bf16_decode:
                    w_low, w_high = _dequantized_bf16(loaded[2 + 2 * n], loaded[3 + 2 * n])
                else:
                    w_low, w_high = _dequantized(loaded[2 + 2 * n], loaded[3 + 2 * n], dtype, use_ptx)
                if swap_ab:
                    acc = acc + plgpu.dot(w_low, x_even, trans_b=True, precision=precision)
                    new.append(acc + plgpu.dot(w_high, x_odd, trans_b=True, precision=precision))
                else:
                    acc = acc + plgpu.dot(x_even, w_low, trans_b=True, precision=precision)
                    new.append(acc + plgpu.dot(x_odd, w_high, trans_b=True, precision=precision))
            return tuple(new)

        steps = -(-num_blocks // blocks_per_step)
        acc_shape = (block_n, block_m) if swap_ab else (block_m, block_n)
        zeros = tuple(jnp.zeros(acc_shape, F32) for _ in groups)
        accs = jax.lax.fori_loop(0, steps, lambda i, accs: accumulate(accs, load(i)), zeros)
        if swap_ab:
            accs = tuple(acc.T for acc in accs)
        out_dtype = out_ref.dtype
        outs = []
        for acc, group in zip(accs, groups):
            bias = plgpu.load(bias_ref.at[expert, cols, group], mask=col_ok, other=0).astype(F32)
            outs.append(round_to(round_to(acc, out_dtype) + bias[None, :], out_dtype))
        if swiglu_params is None:
            out = outs[0].astype(out_dtype)
        else:
            out = swiglu_pair(outs[0], outs[1], *swiglu_params, out_dtype)
        plgpu.store(out_ref.at[plane, rows, cols], out, mask=row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("swiglu_params", "block_m", "block_n", "blocks_per_step",
                                             "num_warps", "num_stages", "use_ptx", "swap_ab", "bf16_decode",
                                             "interpret"))
def grouped_gemm(x_planes, schedule: TileSchedule, w_bytes, w_scales, bias, *, swiglu_params=None, block_m=64,
                 block_n=64, blocks_per_step=2, num_warps=4, num_stages=3, use_ptx=True, swap_ab=False,
                 bf16_decode=False, interpret=False):
    """One projection over expert-sorted pairs.

    x_planes [2, P, K/2]: the pairs' inputs (sorted as `schedule.order`), even features in
    plane 0, odd in plane 1. w_bytes uint8 [E, O, K/32, 16], w_scales uint8 or E8M0
    [E, O, K/32], bias [E, O]. Returns [1, P, O] = round(x @ W^T) + bias, or with
    swiglu_params=(limit, alpha) [2, P, O/4]: SwiGLU of the interleaved gate/up outputs,
    as parity planes (plane p holds activation columns 2m + p). Rows of pairs in no tile
    are left unwritten.
    bf16_decode: decode FP4 straight to bf16 after Triton's layout change (~5% faster at
    256 pairs); exact only when every scale is <= 128 (`mxfp4.BF16_DECODE_MAX_SCALE`), which the
    caller checks. Used for bf16 inputs on a GPU; otherwise ignored."""
    _, num_pairs, half_k = x_planes.shape
    num_experts, out_rows, num_blocks, _ = w_bytes.shape
    if 2 * half_k != num_blocks * mxfp4.BLOCK:
        raise ValueError(f"grouped_gemm: the input has {2 * half_k} features but the weights hold "
                         f"{num_blocks} blocks of 32; pass the matching projection")
    groups = 1 if swiglu_params is None else 4
    if out_rows % groups:
        raise ValueError(f"grouped_gemm: mlp1 with SwiGLU needs a multiple of 4 rows (even intermediate size), "
                         f"got {out_rows}")
    rows, planes = out_rows // groups, 1 if swiglu_params is None else 2
    for name, value in (("block_m", block_m), ("block_n", block_n), ("blocks_per_step", blocks_per_step)):
        if value < 1 or value & (value - 1) or (name != "blocks_per_step" and value < 16):
            raise ValueError(f"grouped_gemm: {name}={value} must be a power of 2 (>= 16 for block_m/block_n)")
    col_blocks = -(-rows // block_n)
    kernel = functools.partial(_gemm_kernel, block_m=block_m, block_n=block_n, blocks_per_step=blocks_per_step,
                               num_blocks=num_blocks, col_blocks=col_blocks, use_ptx=use_ptx and not interpret,
                               swap_ab=swap_ab, swiglu_params=swiglu_params,
                               bf16_decode=bf16_decode and use_ptx and not interpret and x_planes.dtype == jnp.bfloat16)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    num_tiles = schedule.tile_rows.shape[0]
    name = "mxfp4_grouped_gemm" if swiglu_params is None else "mxfp4_grouped_gemm_swiglu"
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((planes, num_pairs, rows), x_planes.dtype),
        # Output columns vary fastest: the programs running together share one tile's
        # inputs and sweep its expert's weights, which then stay in L2 for the next tile.
        grid=(planes * col_blocks, num_tiles),
        in_specs=[anywhere] * 7,
        out_specs=anywhere,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(schedule.tile_expert, schedule.tile_start, schedule.tile_rows, x_planes,
      w_bytes.reshape(num_experts, rows, groups, num_blocks, HALF_BLOCK),
      jax.lax.bitcast_convert_type(w_scales, jnp.uint8).reshape(num_experts, rows, groups, num_blocks),
      bias.reshape(num_experts, rows, groups))


def parity_planes(x):
    """[P, K] -> [2, P, K/2]: even features, odd features."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // 2, 2), 2, 0)


# ------------------------------------------------------------------------- the MoE experts
# Default tilings: the fastest of benchmarks/kernel_check.py --gemm on an H100 (20b shapes,
# 2026-11-23; docs/performance-log.md entry 13): few pairs per expert (decode batches, timed at 256
# pairs) and many (prefill, timed at 32768). block_m follows the mean pairs per expert.
DECODE_TUNING = dict(block_n=32, blocks_per_step=4, num_warps=4, num_stages=4, swap_ab=False)
PREFILL_TUNING = dict(block_n=64, blocks_per_step=2, num_warps=4, num_stages=3, swap_ab=True)
PREFILL_MIN_PAIRS_PER_EXPERT = 64


def default_tuning(num_pairs: int, num_experts: int) -> dict:
    per_expert = num_pairs / num_experts
    block_m = min(128, max(16, 1 << max(0, math.ceil(math.log2(max(per_expert, 1))))))
    base = PREFILL_TUNING if per_expert >= PREFILL_MIN_PAIRS_PER_EXPERT else DECODE_TUNING
    return dict(base, block_m=block_m)


def experts_grouped_kernel(h, experts, mlp1_bytes, mlp1_scales, mlp1_bias, mlp2_bytes, mlp2_scales, mlp2_bias,
                           *, limit: float, alpha: float, interpret: bool = False, **tuning):
    """Same as MoE.experts_grouped: h [n, d] (compute dtype), experts [n, k] -> [n, k, d].
    Expert weights as packed views (kernels.moe.packed_bytes, uint8 or E8M0 scales).
    Pairs whose id is outside [0, E) give zeros. `tuning` (block_m, block_n,
    blocks_per_step, num_warps, num_stages, use_ptx, swap_ab, bf16_decode; unset ones from
    `default_tuning`) applies to both kernels."""
    n, k = experts.shape
    d = h.shape[1]
    if n * k == 0:
        return jnp.zeros((n, k, d), h.dtype)
    num_experts = mlp1_bytes.shape[0]
    tuning = {**default_tuning(n * k, num_experts), **tuning}
    schedule = tile_schedule(experts.reshape(-1), num_experts, tuning["block_m"])
    x = parity_planes(h[schedule.order // k])
    common = dict(interpret=interpret, **tuning)
    a = grouped_gemm(x, schedule, mlp1_bytes, mlp1_scales, mlp1_bias, swiglu_params=(float(limit), float(alpha)),
                     **common)
    y = grouped_gemm(a, schedule, mlp2_bytes, mlp2_scales, mlp2_bias, **common)[0]
    sorted_position = jnp.zeros_like(schedule.order).at[schedule.order].set(jnp.arange(n * k, dtype=jnp.int32))
    y = jnp.where(schedule.known[:, None], y[sorted_position], jnp.zeros((), y.dtype))
    return y.reshape(n, k, d)
