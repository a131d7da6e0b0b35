"""Fused MXFP4 MoE experts for TPU (Pallas, Mosaic TPU lowering).

`experts_tpu` has the contract of `MoE.experts_gathered` / `MoE.experts_grouped`: tokens
h [n, d], routed experts [n, k] -> [n, k, d], with the same roundings (docs/architecture.md 2.5): mlp1
accumulated in fp32, rounded, + bias, rounded, clamped SwiGLU; mlp2 accumulated in fp32,
rounded, + bias. Ids outside [0, E) give zeros.

TPUs v5e/v6e have no FP4 arithmetic (anchors section 4), so the packed bytes are DMA'd to
VMEM and dequantized there, never to HBM:
- The pairs are sorted by expert in XLA and cut into tiles of `block_m` pairs of one expert
  (`moe_gemm.tile_schedule`); each tile's inputs are gathered into a dense [block_m, K] slab.
- The tile experts are scalar-prefetched: the weight BlockSpecs' index maps pick the tile's
  expert, so only routed experts' bytes move. The grid runs tiles fastest, so consecutive
  tiles of one expert keep the same weight block and Pallas skips its DMA.
- In the kernel: nibbles by integer ops, the FP4 code -> value by its exponent/mantissa
  bits, the E8M0 block scale as the fp32 bit pattern s << 23 spread over its 16 bytes by an
  exact 0/1 matmul (no lane reshapes), dots with fp32 accumulation: low nibbles against the
  even input features, high nibbles against the odd ones (split in XLA).
- mlp1 rows interleave gate and up (docs/architecture.md 2.5): a program reads 2 * block_n interleaved rows
  and separates gate and up columns after the epilogue with exact 0/1 matmuls.
Scales of 0 (2^-127) decode as 0 and 255 (NaN) as inf: trained scales sit near 2^-7.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax import mxfp4
from gptoss_jax.kernels.common import F32, round_to, swiglu_pair, tile_schedule

HALF_BLOCK = mxfp4.BYTES_PER_BLOCK  # 16 bytes per 32-element block


def fp4_values(code):
    """int32 FP4 codes (s e1 e0 m) -> their fp32 values: e=0 is the subnormal 0.5 * m,
    otherwise 2^(e-1) * (1 + m/2), built as the fp32 bits of that number."""
    exponent, mantissa, sign = (code >> 1) & 3, code & 1, (code >> 3) & 1
    normal_bits = ((exponent + 126) << 23) | (mantissa << 22)
    magnitude = jnp.where(exponent == 0, mantissa.astype(F32) * 0.5,
                          jax.lax.bitcast_convert_type(normal_bits, F32))
    return jnp.where(sign == 1, -magnitude, magnitude)


def _dot_nt(a, b, precision):
    """a [m, k] x b [n, k] -> [m, n] in fp32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32, precision=precision)


def _dot_nn(a, b, precision):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32, precision=precision)


def _dequantized(w_u8, s_u8, dtype):
    """Packed bytes [R, K/2] + E8M0 scales [R, K/32] -> (low, high) nibble weights [R, K/2]
    in `dtype`, exact (an FP4 value times a power of two)."""
    byte = w_u8.astype(jnp.int32)
    scale = jax.lax.bitcast_convert_type(s_u8.astype(jnp.int32) << 23, F32).astype(jnp.bfloat16)  # exact
    blocks, half = s_u8.shape[1], w_u8.shape[1]
    # spread[b, j] = 1 where byte j belongs to block b; one nonzero per column: exact.
    spread = (jax.lax.broadcasted_iota(jnp.int32, (blocks, half), 1) >> 4  # // HALF_BLOCK
              == jax.lax.broadcasted_iota(jnp.int32, (blocks, half), 0)).astype(jnp.bfloat16)
    scale = _dot_nn(scale, spread, None)
    return tuple((fp4_values(code) * scale).astype(dtype) for code in (byte & 0xF, byte >> 4))


def _select_columns(u, parity: int, precision):
    """u [m, 2c] -> u[:, parity::2] [m, c] by an exact 0/1 matmul (no lane shuffles)."""
    rows, cols = u.shape[1], u.shape[1] // 2
    pick = (jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
            == 2 * jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + parity).astype(u.dtype)
    return _dot_nn(u, pick, precision)


def _kernel(tile_expert_ref, tile_rows_ref, x_ref, w_ref, s_ref, bias_ref, out_ref, *, swiglu_params,
            num_rows: int):
    """Program (column block c, tile t). x_ref [2, bm, K/2] (even, odd features), w_ref
    [R, K/2] packed bytes, s_ref [R, K/32], bias_ref [1, R], out_ref [bm, R or R/2].
    The last column block may run past the `num_rows` weight rows: those columns hold
    garbage that Pallas does not write back; with SwiGLU they are zeroed before mixing."""
    del tile_expert_ref  # used by the index maps
    column_block, tile = pl.program_id(0), pl.program_id(1)

    @pl.when(tile_rows_ref[tile] > 0)
    def _():
        dtype = out_ref.dtype
        precision = jax.lax.Precision.HIGHEST if x_ref.dtype == F32 else None
        low, high = _dequantized(w_ref[...], s_ref[...], x_ref.dtype)
        acc = _dot_nt(x_ref[0], low, precision) + _dot_nt(x_ref[1], high, precision)
        u = round_to(round_to(acc, dtype) + bias_ref[...].astype(F32), dtype)
        if swiglu_params is None:
            out_ref[...] = u.astype(dtype)
            return
        rows = u.shape[1]
        row = column_block * rows + jax.lax.broadcasted_iota(jnp.int32, u.shape, 1)
        u = jnp.where(row < num_rows, u, 0).astype(dtype)
        gate, up = _select_columns(u, 0, precision), _select_columns(u, 1, precision)
        out_ref[...] = swiglu_pair(gate, up, *swiglu_params, dtype)


VMEM_LIMIT_BYTES = 48 * 2**20  # v5e/v6e hold 128 MiB; their default scoped limit (16/32 MiB) is tight


@functools.partial(jax.jit, static_argnames=("swiglu_params", "block_n", "vmem_limit_bytes", "interpret"))
def tpu_grouped_gemm(x_planes, tile_expert, tile_rows, w_bytes, w_scales, bias, *, swiglu_params=None, block_n=256,
                     vmem_limit_bytes=VMEM_LIMIT_BYTES, interpret=False):
    """One projection over expert tiles.

    x_planes [T, 2, bm, K/2]: each tile's inputs, even features in plane 0, odd in plane 1.
    tile_expert, tile_rows [T] int32 (tiles with 0 rows are skipped). w_bytes uint8
    [E, O, K/32, 16], w_scales uint8 or E8M0 [E, O, K/32], bias [E, O]. Returns [T, bm, O]
    = round(x @ W^T) + bias, or with swiglu_params=(limit, alpha) [T, bm, O/2], the
    clamped SwiGLU of the interleaved gate/up outputs. block_n: output rows per program
    (with SwiGLU, activation columns: the program reads 2 * block_n weight rows)."""
    num_tiles, _, block_m, half_k = x_planes.shape
    num_experts, out_rows, num_blocks, _ = w_bytes.shape
    if 2 * half_k != num_blocks * mxfp4.BLOCK:
        raise ValueError(f"tpu_grouped_gemm: the input has {2 * half_k} features but the weights hold "
                         f"{num_blocks} blocks of 32; pass the matching projection")
    outputs = out_rows if swiglu_params is None else out_rows // 2
    block_n = min(block_n, outputs)
    rows = block_n if swiglu_params is None else 2 * block_n
    kernel = functools.partial(_kernel, swiglu_params=swiglu_params, num_rows=out_rows)

    def weights(c, t, tile_expert, tile_rows):
        return tile_expert[t], c, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(-(-outputs // block_n), num_tiles),
        in_specs=[
            pl.BlockSpec((None, 2, block_m, half_k), lambda c, t, e, r: (t, 0, 0, 0)),
            pl.BlockSpec((None, rows, half_k), weights),
            pl.BlockSpec((None, rows, num_blocks), weights),
            pl.BlockSpec((None, 1, rows), lambda c, t, e, r: (e[t], 0, c)),
        ],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda c, t, e, r: (t, 0, c)),
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_tiles, block_m, outputs), x_planes.dtype),
        # Column blocks may split over cores; tiles run in order so one expert's weights stay put.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret,
        name="mxfp4_experts_tpu" if swiglu_params is None else "mxfp4_experts_tpu_swiglu",
    )(tile_expert, tile_rows, x_planes, w_bytes.reshape(num_experts, out_rows, num_blocks * HALF_BLOCK),
      jax.lax.bitcast_convert_type(w_scales, jnp.uint8), bias.reshape(num_experts, 1, out_rows))


def parity_planes(x):
    """[T, bm, K] -> [T, 2, bm, K/2]: even features, odd features."""
    t, m, k = x.shape
    return jnp.moveaxis(x.reshape(t, m, k // 2, 2), 3, 1)


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """Pairs per tile: the mean pairs per expert, as a power of 2 in [16, 128] (bf16
    packs 16 rows per vreg)."""
    per_expert = max(num_pairs / num_experts, 1)
    return min(128, max(16, 1 << math.ceil(math.log2(per_expert))))


def experts_tpu(h, experts, mlp1_bytes, mlp1_scales, mlp1_bias, mlp2_bytes, mlp2_scales, mlp2_bias, *,
                limit: float, alpha: float, interpret: bool | None = None, block_m: int | None = None,
                block_n: int = 128, mlp2_block_n: int | None = None, vmem_limit_bytes: int = VMEM_LIMIT_BYTES):
    """Same as MoE.experts_grouped: h [n, d] (compute dtype), experts [n, k] -> [n, k, d].
    Expert weights as packed views (kernels.moe.packed_bytes; uint8 or E8M0 scales).
    block_m: pairs per tile (default `default_block_m`); block_n: activation columns per
    mlp1 program, mlp2_block_n (default 2 * block_n) output rows per mlp2 program;
    vmem_limit_bytes: Mosaic's scoped VMEM limit.
    On the CPU the kernels run in Pallas interpret mode."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    n, k = experts.shape
    d = h.shape[1]
    if n * k == 0:
        return jnp.zeros((n, k, d), h.dtype)
    num_experts = mlp1_bytes.shape[0]
    block_m = block_m or default_block_m(n * k, num_experts)
    schedule = tile_schedule(experts.reshape(-1), num_experts, block_m)
    # Tile slot (t, r) holds sorted pair tile_start[t] + r when r < tile_rows[t].
    slot_used = jnp.arange(block_m)[None, :] < schedule.tile_rows[:, None]
    pair = schedule.order[jnp.minimum(schedule.tile_start[:, None] + jnp.arange(block_m)[None, :], n * k - 1)]
    x = jnp.where(slot_used[..., None], h[pair // k], jnp.zeros((), h.dtype))
    # Empty tiles reuse the last real tile's expert: its weight blocks stay put (no DMA).
    last_real = jnp.maximum(jnp.sum(schedule.tile_rows > 0) - 1, 0)
    tile_expert = jnp.where(schedule.tile_rows > 0, schedule.tile_expert, schedule.tile_expert[last_real])
    common = dict(interpret=interpret, vmem_limit_bytes=vmem_limit_bytes)
    a = tpu_grouped_gemm(parity_planes(x), tile_expert, schedule.tile_rows, mlp1_bytes, mlp1_scales, mlp1_bias,
                         swiglu_params=(float(limit), float(alpha)), block_n=block_n, **common)
    y = tpu_grouped_gemm(parity_planes(a), tile_expert, schedule.tile_rows, mlp2_bytes, mlp2_scales, mlp2_bias,
                         block_n=mlp2_block_n or 2 * block_n, **common)
    destination = jnp.where(slot_used, pair, n * k).reshape(-1)  # unused slots: dropped
    out = jnp.zeros((n * k, d), y.dtype).at[destination].set(y.reshape(-1, d), mode="drop")
    return out.reshape(n, k, d)
