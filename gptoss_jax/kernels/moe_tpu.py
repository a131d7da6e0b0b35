"""MXFP4 MoE experts for TPU (Pallas, Mosaic TPU lowering).

TPUs v5e/v6e have no FP4 arithmetic, so the packed bytes are DMA'd to VMEM and decoded
there, never written to HBM. The experts are stored once, at load, in the layout the
kernel reads (`TpuExperts`, made by `tpu_experts`), so no call converts or copies them:

- Output columns on lanes, contraction (input features) on sublanes: a weight tile is the
  [K/2, N] right-hand side of the dot, and a block's E8M0 scale row is broadcast over its
  16 byte rows (sublanes), which costs no lane shuffles.
- Byte j of a 32-element block holds input feature 2j in its low nibble and 2j+1 in its
  high nibble, as in the checkpoint: the low nibbles are contracted with the even input
  features and the high nibbles with the odd ones (the input is split into these two
  planes in XLA), so the decoded weights are never interleaved.
- mlp1's interleaved gate/up rows (spec 2.5) are split into two planes, gate and up, so a
  program's gate and up columns are the same lanes of two tiles.

`experts_tpu` has the contract of `MoE.experts_gathered` / `MoE.experts_grouped`: tokens
h [n, d], routed experts [n, k] -> [n, k, d], with the same roundings (spec 2.5): mlp1
accumulated in fp32, rounded, + bias, rounded, clamped SwiGLU; mlp2 accumulated in fp32,
rounded, + bias. Ids outside [0, E) (another device's experts) give zeros. The pairs are
sorted by expert in XLA and cut into tiles of `block_m` pairs of one expert
(`common.tile_schedule`); the tile experts are scalar-prefetched and pick the weight
blocks, so only routed experts' bytes move (a decode step of one token reads its k
experts), and consecutive tiles of one expert (prefill) keep the weight block in VMEM.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax import mxfp4
from gptoss_jax.kernels.common import F32, ExpertWeights, round_to, swiglu_pair, tile_schedule

HALF_BLOCK = mxfp4.BYTES_PER_BLOCK  # 16 bytes per 32-element block
CHUNK_BLOCKS = 8  # blocks decoded per inner step: one int32 sublane tile of scale rows
MAX_SCALE = 252  # E8M0 scales above this (block scales > 2^125) overflow the decode


LANES = 128
SCALE_ROWS = 8  # scale arrays hold a multiple of 8 block rows (per hidden shard): see TpuExperts


class TpuExperts(NamedTuple):
    """The FP4 experts of one MoE layer (or one device's share) as the TPU kernels read
    them; `tpu_experts` makes them from the model's arrays. E experts, D = embed, I = hidden.
    Byte row j holds input feature 2j in its low nibble and 2j+1 in its high nibble; scale
    row b is the E8M0 exponent of byte rows 16b..16b+15.

    The scale arrays are padded with zero rows to a multiple of SCALE_ROWS block rows, per
    hidden shard for mlp2: with unpadded 90 or 45 rows, XLA's default TPU layout of the
    array is not row-major (it moves the expert axis into the tile to avoid padding), and
    every kernel call would copy the scales into the row-major layout Mosaic reads."""

    mlp1_bytes: jax.Array  # uint8 [E, 2, D/2, I]: plane 0 gate, plane 1 up
    mlp1_scales: jax.Array  # uint8 [E, 2, D/32 padded, I]
    mlp1_bias: jax.Array  # [E, 2, I]
    mlp2_bytes: jax.Array  # uint8 [E, I/2, D]
    mlp2_scales: jax.Array  # uint8 [E, shards * (I/32/shards padded), D]
    mlp2_bias: jax.Array  # [E, D]


# Logical axes (gptoss_jax.sharding.rules): experts over the expert axis, hidden units over
# the model axis, as the model's ExpertWeights are split, so the shards hold the same experts
# and hidden units.
TPU_EXPERT_AXES = TpuExperts(
    mlp1_bytes=("experts", None, "embed", "expert_mlp"),
    mlp1_scales=("experts", None, "embed_blocks", "expert_mlp"),
    mlp1_bias=("experts", None, "expert_mlp"),
    mlp2_bytes=("experts", "expert_mlp_blocks", "embed"),
    mlp2_scales=("experts", "expert_mlp_blocks", "embed"),
    mlp2_bias=("experts", "embed"),
)


def _columns_on_lanes(fp4, scales, shards: int):
    """float4_e2m1fn [E, O, K/32, 32] + E8M0 [E, O, K/32] -> uint8 bytes [E, K/2, O] and
    uint8 scales [E, shards * padded(K/32 / shards), O]."""
    e, o, blocks, _ = fp4.shape
    packed = mxfp4.fp4_to_blocks(fp4).reshape(e, o, blocks * HALF_BLOCK)
    per_shard = blocks // shards
    pad = -per_shard % SCALE_ROWS
    scales = mxfp4.e8m0_to_scales(scales).reshape(e, o, shards, per_shard)
    scales = jnp.pad(scales, ((0, 0), (0, 0), (0, 0), (0, pad))).reshape(e, o, shards * (per_shard + pad))
    return jnp.swapaxes(packed, 1, 2), jnp.swapaxes(scales, 1, 2)


def _gate_up_planes(a):
    """[E, R, 2I] with interleaved gate/up columns (spec 2.5) -> [E, 2, R, I]."""
    return jnp.moveaxis(a.reshape(*a.shape[:-1], a.shape[-1] // 2, 2), -1, 1)


def tpu_experts(w, hidden_shards: int = 1) -> TpuExperts:
    """The model's ExpertWeights (FP4 [E, rows, blocks, 32] + E8M0 scales + biases) ->
    TpuExperts: a one-time re-layout at load (transposes, bitcasts and zero padding, no
    re-quantization). hidden_shards: the mesh's model-axis size when the hidden units are
    split over it (each shard's mlp2 scale rows are padded separately). Raises ValueError
    for scales above MAX_SCALE when the scales are concrete."""
    hidden_blocks = w.mlp2_scales.shape[-1]
    if hidden_blocks % hidden_shards:
        raise ValueError(f"tpu_experts: {hidden_blocks} hidden blocks do not split into {hidden_shards} shards")
    check_scales(w.mlp1_scales, w.mlp2_scales)
    b1, s1 = _columns_on_lanes(w.mlp1_fp4, w.mlp1_scales, 1)  # [E, D/2, 2I], [E, rows, 2I]
    b2, s2 = _columns_on_lanes(w.mlp2_fp4, w.mlp2_scales, hidden_shards)
    bias1 = _gate_up_planes(w.mlp1_bias[:, None, :])[:, :, 0]
    return TpuExperts(_gate_up_planes(b1), _gate_up_planes(s1), bias1, b2, s2, w.mlp2_bias)


def expert_weights_of(t: TpuExperts, hidden_shards: int = 1) -> ExpertWeights:
    """The exact inverse of `tpu_experts`: the model's ExpertWeights (FP4 values, E8M0
    scales, biases) from TpuExperts made with `hidden_shards`.
    A re-layout (transposes, bitcasts, the padding dropped), no arithmetic: the XLA
    reference runs on a model that stores its experts for the TPU kernel through it."""
    e, _, half_d, i = t.mlp1_bytes.shape
    embed_blocks = half_d // HALF_BLOCK
    hidden_blocks = t.mlp2_bytes.shape[1] // HALF_BLOCK

    def interleaved(a):  # [E, 2, R, I] -> [E, R, 2I], gate/up columns alternating (spec 2.5)
        return jnp.moveaxis(a, 1, -1).reshape(*a.shape[:1], *a.shape[2:-1], 2 * a.shape[-1])

    def fp4_rows(packed):  # uint8 [E, K/2, O] -> float4_e2m1fn [E, O, K/32, 32]
        rows = jnp.swapaxes(packed, 1, 2)
        return mxfp4.blocks_to_fp4(rows.reshape(*rows.shape[:2], -1, HALF_BLOCK))

    mlp1_scales = jnp.swapaxes(interleaved(t.mlp1_scales)[:, :embed_blocks], 1, 2)
    per_shard = hidden_blocks // hidden_shards
    mlp2_scales = t.mlp2_scales.reshape(e, hidden_shards, -1, t.mlp2_scales.shape[-1])[:, :, :per_shard]
    mlp2_scales = jnp.swapaxes(mlp2_scales.reshape(e, hidden_blocks, -1), 1, 2)
    return ExpertWeights(fp4_rows(interleaved(t.mlp1_bytes)), mxfp4.scales_to_e8m0(mlp1_scales),
                         interleaved(t.mlp1_bias[:, :, None, :])[:, 0], fp4_rows(t.mlp2_bytes),
                         mxfp4.scales_to_e8m0(mlp2_scales), t.mlp2_bias)


def check_scales(*scales):
    """Raises ValueError when a (concrete) E8M0 scale is above MAX_SCALE; traced scales
    pass (the loader checks the concrete ones before it converts under jit)."""
    try:
        top = max(int(jnp.max(mxfp4.e8m0_to_scales(s))) for s in scales)
    except jax.errors.ConcretizationTypeError:  # under a trace: the caller checks at load
        return
    if top > MAX_SCALE:
        raise ValueError(f"tpu_experts: an expert scale is 2^{top - 127}; the TPU kernels decode scales up to "
                         f"2^{MAX_SCALE - 127} (E8M0 {MAX_SCALE}); use the XLA expert path for these weights")


def fp4_times_scale(nibble, exponent):
    """int32 FP4 codes (s e1 e0 m) and exponent = (E8M0 scale - 1) << 23 -> fp32 code value
    times 2^(scale - 127), built as its fp32 bits: e >= 1 is 2^(e-1) (1 + m/2), placed as
    (e << 23 | m << 22) plus the scale's exponent; the code 0.5 is 2^(scale - 128).
    Exact for scales 1..MAX_SCALE; results below 2^-126 (scales 0 and 1) come out as zeros
    or fp32 subnormals, which the TPU flushes to zero."""
    magnitude = nibble & 7
    bits = jnp.where(magnitude >= 2, (magnitude << 22) + exponent,
                     jnp.where(magnitude == 1, jnp.maximum(exponent, 0), 0))
    return jax.lax.bitcast_convert_type(bits | ((nibble & 8) << 28), F32)


def scale_exponent(scales_u8):
    """uint8 E8M0 scales -> the int32 `exponent` term of fp4_times_scale."""
    return (scales_u8.astype(jnp.int32) - 1) << 23


def _dot(a, b, precision):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32, precision=precision)


def _projection_kernel(tile_expert_ref, tile_rows_ref, x_ref, w_ref, s_ref, *refs, swiglu_params):
    """Program (column block, tile). x_ref [2, bm, K/2] (even, odd input features), w_ref
    [P, K/2, bn] bytes, s_ref [P, >= K/32, bn] scales; with SwiGLU (P = 2: gate, up) refs
    are bias_ref [2, bn], out_ref [bm, bn], exponent_ref, else (P = 1) out_ref,
    exponent_ref. exponent_ref: int32 scratch like s_ref. Columns of a partial last block
    hold garbage that Pallas does not write back."""
    del tile_expert_ref  # read by the index maps
    *bias_refs, out_ref, exponent_ref = refs
    tile = pl.program_id(1)

    @pl.when(tile_rows_ref[tile] > 0)
    def _():
        planes, half_k, cols = w_ref.shape
        num_blocks = half_k // HALF_BLOCK
        dtype = x_ref.dtype
        precision = jax.lax.Precision.HIGHEST if dtype == F32 else None
        exponent_ref[...] = scale_exponent(s_ref[...])

        def step(first_block, blocks, accs):
            first_row = first_block * HALF_BLOCK
            if not isinstance(first_row, int):
                first_row = pl.multiple_of(first_row, CHUNK_BLOCKS * HALF_BLOCK)
            rows = pl.ds(first_row, blocks * HALF_BLOCK)
            x_even, x_odd = x_ref[0, :, rows], x_ref[1, :, rows]
            out = []
            for p, acc in enumerate(accs):
                byte = w_ref[p, rows, :].astype(jnp.int32)
                exponent = exponent_ref[p, pl.ds(first_block, blocks), :]
                exponent = jnp.broadcast_to(exponent[:, None, :], (blocks, HALF_BLOCK, cols)).reshape(byte.shape)
                low = fp4_times_scale(byte & 0xF, exponent).astype(dtype)
                high = fp4_times_scale(byte >> 4, exponent).astype(dtype)
                out.append(acc + _dot(x_even, low, precision) + _dot(x_odd, high, precision))
            return out

        def chunk(i, accs):
            return step(pl.multiple_of(i * CHUNK_BLOCKS, CHUNK_BLOCKS), CHUNK_BLOCKS, accs)

        full_steps, tail = divmod(num_blocks, CHUNK_BLOCKS)
        accs = [jnp.zeros(out_ref.shape, F32) for _ in range(planes)]
        if full_steps:
            accs = jax.lax.fori_loop(0, full_steps, chunk, accs)
        if tail:
            accs = step(full_steps * CHUNK_BLOCKS, tail, accs)
        if swiglu_params is None:
            out_ref[...] = accs[0].astype(out_ref.dtype)
        else:
            [bias_ref] = bias_refs
            gate, up = (round_to(round_to(acc, dtype) + bias_ref[p:p + 1, :].astype(F32), dtype)
                        for p, acc in enumerate(accs))
            out_ref[...] = swiglu_pair(gate, up, *swiglu_params, dtype).astype(out_ref.dtype)


def _varying(*arrays):
    """The mesh axes along which any of `arrays` varies inside jax.shard_map (empty
    outside): a kernel output built from them varies along the same axes, and shard_map's
    check_vma requires pallas_call's out_shape to say so."""
    varying = frozenset()
    for a in arrays:
        mat = getattr(jax.typeof(a), "mat", None)
        if mat is not None:
            varying |= mat.varying
    return jax.sharding.ManualAxisType(varying=varying)


def out_struct(shape, dtype, *inputs):
    """jax.ShapeDtypeStruct for a kernel output computed from `inputs` (also under
    jax.shard_map with check_vma)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=_varying(*inputs))


@functools.partial(jax.jit, static_argnames=("swiglu_params", "block_n", "vmem_limit_bytes", "interpret"))
def expert_projection(x_planes, tile_expert, tile_rows, w_bytes, w_scales, tile_bias=None, *, swiglu_params=None,
                      block_n: int = 512, vmem_limit_bytes: int | None = None,
                      interpret: bool | pltpu.InterpretParams = False):
    """One expert projection over tiles of pairs.

    x_planes [T, 2, bm, K/2]: each tile's inputs, even features in plane 0, odd in plane 1.
    tile_expert, tile_rows [T] int32 (tiles with 0 rows compute nothing; give them the
    previous tile's expert so no weights move for them). w_bytes uint8 [E, P, K/2, N] and
    w_scales uint8 [E, P, >= K/32, N] in TpuExperts' layout with a plane axis.
    With swiglu_params=(limit, alpha): P = 2 (gate, up planes), tile_bias [T, 2, N] (each
    tile's expert's bias), returns the clamped SwiGLU of round(round(x @ W) + bias) per
    plane; otherwise P = 1 and returns round(x @ W) (the caller adds the bias). Returns
    [T, bm, N] in x's dtype. block_n: output columns per program (a multiple of 128, or
    >= N for one block)."""
    num_tiles, _, block_m, half_k = x_planes.shape
    _, planes, rows, outputs = w_bytes.shape
    scale_rows = w_scales.shape[2]
    if rows != half_k or scale_rows * HALF_BLOCK < half_k:
        raise ValueError(f"expert_projection: the input has {2 * half_k} features but the weights hold {2 * rows} "
                         f"({scale_rows} scale rows of 32); pass the matching projection")
    if planes != (1 if swiglu_params is None else 2) or (tile_bias is None) != (swiglu_params is None):
        raise ValueError(f"expert_projection: SwiGLU takes 2 weight planes (gate, up) and tile_bias, a plain "
                         f"projection 1 plane and no bias; got {planes} planes, bias {tile_bias is not None}")
    block_n = min(outputs, block_n)
    if block_n < outputs and block_n % 128:
        raise ValueError(f"expert_projection: block_n must be a multiple of 128 or cover all {outputs} columns, "
                         f"got {block_n}")

    def weights(c, t, tile_expert, tile_rows):
        return tile_expert[t], 0, 0, c

    in_specs = [
        pl.BlockSpec((None, 2, block_m, half_k), lambda c, t, e, r: (t, 0, 0, 0)),
        pl.BlockSpec((None, planes, half_k, block_n), weights),
        pl.BlockSpec((None, planes, scale_rows, block_n), weights),
    ]
    operands = [x_planes, w_bytes, w_scales]
    if not interpret:
        # Kept in HBM: otherwise XLA may prefetch a whole layer's weights that fit VMEM (all
        # experts' mlp2 scales) before the call, though the kernel reads only routed experts.
        operands[1:] = (pltpu.with_memory_space_constraint(a, pltpu.HBM) for a in operands[1:])
    if tile_bias is not None:
        in_specs.append(pl.BlockSpec((None, planes, block_n), lambda c, t, e, r: (t, 0, c)))
        operands.append(tile_bias)
    cost = projection_cost(num_tiles, block_m, half_k, w_bytes.shape[0], planes, scale_rows, outputs, block_n,
                           jnp.dtype(x_planes.dtype).itemsize, swiglu_params is not None)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(pl.cdiv(outputs, block_n), num_tiles),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda c, t, e, r: (t, 0, c)),
        scratch_shapes=[pltpu.VMEM((planes, scale_rows, block_n), jnp.int32)],
    )
    return pl.pallas_call(
        functools.partial(_projection_kernel, swiglu_params=swiglu_params),
        grid_spec=grid_spec,
        out_shape=out_struct((num_tiles, block_m, outputs), x_planes.dtype, *operands),
        # Column blocks may split over cores; tiles run in order so one expert's weights stay put.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret,
        cost_estimate=cost,
        name="mxfp4_experts_tpu_swiglu" if swiglu_params is not None else "mxfp4_experts_tpu",
    )(tile_expert, tile_rows, *operands)


def projection_cost(num_tiles: int, block_m: int, half_k: int, num_experts: int, planes: int, scale_rows: int,
                    outputs: int, block_n: int, itemsize: int, swiglu: bool) -> pl.CostEstimate:
    """What one expert_projection call moves and computes, from its block specs, when its
    tiles go to as many different experts as they can (the most it can read): each routed
    expert's packed bytes and scales once (HBM rows hold whole 128-lane tiles), each tile's
    inputs once per column block, its bias block (SwiGLU), its output. XLA's cost analysis
    counts a kernel by this estimate, so a compiled program's "bytes accessed" adds up
    the XLA ops and the kernels (docs/tpu.md)."""
    column_blocks = -(-outputs // block_n)
    lanes = -(-outputs // LANES) * LANES
    weights = min(num_tiles, num_experts) * planes * (half_k + scale_rows) * lanes
    inputs = column_blocks * num_tiles * 2 * block_m * half_k * itemsize
    bias = column_blocks * num_tiles * planes * block_n * itemsize if swiglu else 0
    out = num_tiles * block_m * outputs * itemsize
    return pl.CostEstimate(flops=2 * num_tiles * block_m * 2 * half_k * outputs * planes,
                           transcendentals=num_tiles * block_m * outputs if swiglu else 0,
                           bytes_accessed=weights + inputs + bias + out)


def parity_planes(x):
    """[T, bm, K] -> [T, 2, bm, K/2]: even features, odd features."""
    t, m, k = x.shape
    return jnp.moveaxis(x.reshape(t, m, k // 2, 2), 3, 1)


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """Pairs per tile: the mean pairs per expert, as a power of 2 in [16, 128] (bf16
    packs 16 rows per vreg)."""
    per_expert = max(num_pairs / num_experts, 1)
    return min(128, max(16, 1 << math.ceil(math.log2(per_expert))))


def experts_tpu(h, experts, w: TpuExperts, *, limit: float, alpha: float, interpret: bool | pltpu.InterpretParams,
                block_m: int | None = None, block_n: int = 512, mlp2_block_n: int = 1024,
                vmem_limit_bytes: int | None = None):
    """Same as MoE.experts_grouped: h [n, d] (compute dtype), experts [n, k] -> [n, k, d];
    ids outside [0, E) give zero rows. w: the layer's experts as `tpu_experts` made them.
    block_m: pairs per tile (default `default_block_m`); block_n, mlp2_block_n: output
    columns per mlp1 / mlp2 program; vmem_limit_bytes: Mosaic's scoped VMEM limit (None:
    its default). interpret: run the kernels in Pallas interpret mode (CPU tests; a
    pltpu.InterpretParams selects the TPU interpreter, which simulates DMAs and VMEM)."""
    n, k = experts.shape
    d = h.shape[1]
    if n * k == 0:
        return jnp.zeros((n, k, d), h.dtype)
    num_experts = w.mlp1_bytes.shape[0]
    block_m = block_m or default_block_m(n * k, num_experts)
    schedule = tile_schedule(experts.reshape(-1), num_experts, block_m)
    # Tile slot (t, r) holds sorted pair tile_start[t] + r when r < tile_rows[t].
    slot_used = jnp.arange(block_m)[None, :] < schedule.tile_rows[:, None]
    pair = schedule.order[jnp.minimum(schedule.tile_start[:, None] + jnp.arange(block_m)[None, :], n * k - 1)]
    x = jnp.where(slot_used[..., None], h[pair // k], jnp.zeros((), h.dtype))
    # Empty tiles reuse the last real tile's expert: its weight blocks stay put (no DMA).
    last_real = jnp.maximum(jnp.sum(schedule.tile_rows > 0) - 1, 0)
    tile_expert = jnp.where(schedule.tile_rows > 0, schedule.tile_expert, schedule.tile_expert[last_real])
    common = {"interpret": interpret, "vmem_limit_bytes": vmem_limit_bytes}
    a = expert_projection(parity_planes(x), tile_expert, schedule.tile_rows, w.mlp1_bytes, w.mlp1_scales,
                          w.mlp1_bias[tile_expert], swiglu_params=(float(limit), float(alpha)), block_n=block_n,
                          **common)
    y = expert_projection(parity_planes(a), tile_expert, schedule.tile_rows, w.mlp2_bytes[:, None],
                          w.mlp2_scales[:, None], block_n=mlp2_block_n, **common)
    y = y + w.mlp2_bias[tile_expert][:, None, :]  # rounds once, as the reference's bias add
    destination = jnp.where(slot_used, pair, n * k).reshape(-1)  # unused slots: dropped
    out = jnp.zeros((n * k, d), y.dtype).at[destination].set(y.reshape(-1, d), mode="drop")
    return out.reshape(n, k, d)
