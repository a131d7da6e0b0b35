"""Definitions the model and the Pallas kernels share: dtypes and markers, the experts'
arrays (ExpertWeights), the roundings that mirror the reference's bf16 ops, the FP4 decode
in registers, and the schedule that groups (token, expert) pairs by expert."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
NO_POSITION = -1  # marks padding tokens and empty cache slots
FP16_SHIFT = 14  # decode_nibbles' fp16 placement holds value * 2^-14


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def round_to(x, dtype):
    """x rounded to dtype, kept in fp32 (Triton has no bf16 arithmetic, so the kernels do
    each op in fp32 and round after it, as a bf16 op would)."""
    return x.astype(dtype).astype(F32)


def swiglu_pair(gate, up, limit: float, alpha: float, dtype):
    """Clamped SwiGLU (docs/architecture.md 2.5) with the roundings of model.MoE.swiglu: every op rounded to
    `dtype`, the sigmoid evaluated in fp32 and rounded once. Returns dtype."""
    gate = jnp.minimum(gate.astype(F32), limit)
    up = jnp.clip(up.astype(F32), -limit, limit)
    z = round_to(gate * alpha, dtype)
    sigmoid = round_to(1 / (1 + jnp.exp(-z)), dtype)
    glu = round_to(gate * sigmoid, dtype)
    return (glu * round_to(up + 1, dtype)).astype(dtype)


class ExpertWeights(NamedTuple):
    """The FP4 experts of one MoE layer as the model holds them (docs/architecture.md 2.5),
    or one device's share of them (leading axis: experts)."""

    mlp1_fp4: jax.Array  # [experts, 2 * hidden, embed / 32, 32] float4_e2m1fn
    mlp1_scales: jax.Array  # [experts, 2 * hidden, embed / 32] float8_e8m0fnu
    mlp1_bias: jax.Array  # [experts, 2 * hidden]
    mlp2_fp4: jax.Array  # [experts, embed, hidden / 32, 32]
    mlp2_scales: jax.Array  # [experts, embed, hidden / 32]
    mlp2_bias: jax.Array  # [experts, embed]


# ------------------------------------------------------------------ FP4 -> fp32 in registers
def _fp16_bits_to_f32(bits):
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(F32)


def decode_nibbles(byte):
    """int32 bytes -> (low-nibble values, high-nibble values), fp32, each value * 2^-14."""
    low = ((byte & 0x08) << 12) | ((byte & 0x07) << 9)
    high = ((byte & 0x80) << 8) | ((byte & 0x70) << 5)
    return _fp16_bits_to_f32(low), _fp16_bits_to_f32(high)


# Same as decode_nibbles, four bytes per instance in PTX (Pallas' inline asm takes one result
# set, so one asm per nibble). Each fp16 above has a zero low byte and the high byte
# s000e1e0m0 (s: the nibble's bit 3, e1e0m: bits 2..0), so the asm builds the four high
# bytes at once with shifts and masks and places them with two byte permutes (prmt; bytes
# 4-7 of the pool are the constant operand 0).
_PTX_LOW = """
{
.reg .b32 a, b;
shl.b32 a, $2, 1;
and.b32 a, a, 0x0E0E0E0E;
shl.b32 b, $2, 4;
and.b32 b, b, 0x80808080;
or.b32 a, a, b;
prmt.b32 $0, a, 0, 0x1404;
prmt.b32 $1, a, 0, 0x3424;
}
"""
_PTX_HIGH = """
{
.reg .b32 a, b;
shr.b32 a, $2, 3;
and.b32 a, a, 0x0E0E0E0E;
and.b32 b, $2, 0x80808080;
or.b32 a, a, b;
prmt.b32 $0, a, 0, 0x1404;
prmt.b32 $1, a, 0, 0x3424;
}
"""


def decode_nibbles_ptx(byte_u8):
    shape = jax.ShapeDtypeStruct(byte_u8.shape, jnp.float16)

    def run(asm):
        [out] = plgpu.elementwise_inline_asm(asm, args=[byte_u8], constraints="=r,=r,r", pack=4,
                                             result_shape_dtypes=[shape])
        return out.astype(F32)

    return run(_PTX_LOW), run(_PTX_HIGH)


def block_scale(scale_u8):
    """uint8 E8M0 exponents -> fp32 2^(scale - 127 + 14), exact for scales 0..240 (up to
    2^113); larger scales overflow to inf (trained MXFP4 scales sit near 2^-7)."""
    exponent = scale_u8.astype(jnp.int32) + FP16_SHIFT
    return jax.lax.bitcast_convert_type(exponent << 23, F32)


# ------------------------------------------------------------------ pairs grouped by expert
class TileSchedule(NamedTuple):
    """Pairs sorted by expert and cut into tiles that never straddle two experts."""

    order: jax.Array  # [P] sorted position -> original pair index (unknown ids last)
    known: jax.Array  # [P] bool, per original pair: expert id in [0, num_experts)
    tile_expert: jax.Array  # [T] int32 expert of each tile
    tile_start: jax.Array  # [T] int32 first sorted pair of each tile
    tile_rows: jax.Array  # [T] int32 pairs in each tile, 0 for the padding tiles


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static bound on the tile count: each expert wastes at most one partial tile."""
    return max(1, min(num_pairs, -(-num_pairs // block_m) + num_experts))


def tile_schedule(pair_expert, num_experts: int, block_m: int) -> TileSchedule:
    """pair_expert [P] int -> the sort order and a tile list of static length
    `max_tiles(P, num_experts, block_m)`. Ids outside [0, num_experts) (other devices'
    experts) sort last and are in no tile."""
    num_pairs = pair_expert.shape[0]
    known = (pair_expert >= 0) & (pair_expert < num_experts)
    key = jnp.where(known, pair_expert, num_experts).astype(jnp.int32)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sizes = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)[:num_experts]
    group_start = jnp.cumsum(sizes) - sizes
    tiles = (sizes + block_m - 1) // block_m
    tiles_end = jnp.cumsum(tiles)
    t = jnp.arange(max_tiles(num_pairs, num_experts, block_m), dtype=jnp.int32)
    # compare_all: one fused kernel. The default (a binary-search while loop) costs a GPU
    # batch-64 decode step ~0.8 ms: ~6 kernels, 2 copies and a host-read predicate per
    # iteration per layer (docs/performance-log.md entry 42).
    expert = jnp.searchsorted(tiles_end, t, side="right", method="compare_all").astype(jnp.int32)
    real = expert < num_experts
    expert = jnp.minimum(expert, num_experts - 1)
    start = group_start[expert] + (t - (tiles_end[expert] - tiles[expert])) * block_m
    rows = jnp.where(real, jnp.minimum(block_m, group_start[expert] + sizes[expert] - start), 0)
    return TileSchedule(order, known, expert, jnp.where(real, start, 0), rows.astype(jnp.int32))
