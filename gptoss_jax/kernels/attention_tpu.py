"""Sink-aware decode attention for TPU (Pallas, Mosaic TPU lowering): one new token per
sequence against its KV cache, reading only the cache slots that can hold a visible key.

`decode_attention_tpu` equals `Attention.attend` for a one-token step whose keys are the
cache followed by the new key (spec 2.3), with the reference's rounding points: scores
rounded to the compute dtype and scaled by head_dim^-0.5 in that dtype, the sink as an
extra logit in the softmax denominator, fp32 softmax, probabilities rounded to the compute
dtype before they weight the values. To round the probabilities as the reference does (the
exact value over the final maximum and sum, not a running rescale), the grid makes two
passes over the valid cache blocks: the first reads the keys and keeps the rounded scores
in VMEM, the second reads the values. Keys and values are each read once.

Valid blocks: full layers hold position p in slot p, so only the slots up to the query
position are read; the sliding window's 128-slot ring is one block. The grid's block axis
is as long as the batch's longest valid range (a dynamic grid bound); rows with fewer
valid blocks repeat their last block index, which moves no data.

Cache layout: the kernel reads keys and values as [batch, kv_heads, head_dim, slots]
(slots on lanes, no padding for head_dim 64). That is the transpose of the model's
[batch, slots, kv_heads, head_dim] LayerCache and the physical order XLA's TPU layout
gives such an array by default, so the transpose is a bitcast, not a copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax.kernels.moe_tpu import out_struct

F32 = jnp.float32
NO_POSITION = -1
LANES = 128


def _batched(a, b, contract_b: int, precision):
    """[k, m, c] x [k, c, n] (contract_b=1) or [k, n, c] (contract_b=2) -> fp32 [k, m, n]."""
    return jax.lax.dot_general(a, b, (((2,), (contract_b,)), ((0,), (0,))), preferred_element_type=F32,
                               precision=precision)


def _kernel(qpos_ref, valid_ref, steps_ref, q_ref, k_new_ref, v_new_ref, sinks_ref, kpos_ref, k_ref, v_ref,
            out_ref, scores_ref, peak_ref, new_ref, denom_ref, acc_ref, *, block: int, slots: int, window,
            scale: float, precision):
    """Program (sequence b, step j). Steps [0, n) read key block j, steps [n, 2n) value
    block j - n, n = steps_ref[0]. q_ref [kv, g, hd], k_new_ref/v_new_ref [kv, 1, hd],
    sinks_ref [kv, g], kpos_ref [batch, block], k_ref/v_ref [kv, hd, block].
    Scratch: scores_ref [kv * g, slots] (rounded scores), peak_ref, new_ref (the new
    key's score), denom_ref [kv, g, 1] fp32, acc_ref [kv, g, hd] fp32."""
    b, j = pl.program_id(0), pl.program_id(1)
    passes = steps_ref[0]
    qp, valid = qpos_ref[b], valid_ref[b]
    kv, groups, _ = q_ref.shape
    dtype = q_ref.dtype
    rounded = lambda x: x.astype(dtype).astype(F32)
    sink = sinks_ref[...].astype(F32)[..., None]  # [kv, g, 1]

    @pl.when(j == 0)
    def _():
        s_new = jnp.sum(q_ref[...].astype(F32) * k_new_ref[...].astype(F32), axis=2, keepdims=True)
        s_new = rounded(rounded(s_new) * scale)
        s_new = jnp.where(qp != NO_POSITION, s_new, -jnp.inf)  # a padding query sees nothing
        new_ref[...] = s_new
        peak_ref[...] = jnp.maximum(s_new, sink)

    @pl.when(j < valid)  # key pass
    def _():
        s = _batched(q_ref[...], k_ref[...], 1, precision)  # [kv, g, block]
        s = rounded(rounded(s) * scale)
        slot = j * block + jax.lax.broadcasted_iota(jnp.int32, (1, 1, block), 2)
        kp = kpos_ref[pl.ds(b, 1), :].reshape(1, 1, block)
        allowed = (kp != NO_POSITION) & (kp <= qp) & (slot < slots)
        if window is not None:
            allowed &= qp - kp < window
        s = jnp.where(allowed, s, -jnp.inf)
        peak_ref[...] = jnp.maximum(peak_ref[...], jnp.max(s, axis=2, keepdims=True))
        start = pl.multiple_of(j * block, LANES)
        scores_ref[:, pl.ds(start, block)] = s.reshape(kv * groups, block).astype(scores_ref.dtype)

    @pl.when(j == passes)  # the softmax denominator over every key, then the new key's term
    def _():
        peak = peak_ref[...]

        def add_block(i, total):
            start = pl.multiple_of(i * block, LANES)
            s = scores_ref[:, pl.ds(start, block)].astype(F32).reshape(kv, groups, block)
            return total + jnp.sum(jnp.exp(s - peak), axis=2, keepdims=True)

        weight_new = jnp.exp(new_ref[...] - peak)
        total = jax.lax.fori_loop(0, valid, add_block, jnp.zeros_like(peak))
        denom = total + weight_new + jnp.exp(sink - peak)
        denom_ref[...] = denom
        acc_ref[...] = rounded(weight_new / denom) * v_new_ref[...].astype(F32)

    @pl.when((j >= passes) & (j - passes < valid))  # value pass
    def _():
        start = pl.multiple_of((j - passes) * block, LANES)
        s = scores_ref[:, pl.ds(start, block)].astype(F32).reshape(kv, groups, block)
        probs = (jnp.exp(s - peak_ref[...]) / denom_ref[...]).astype(dtype)
        v = v_ref[...]
        if slots % block:  # the last block runs past the cache: keep its garbage out of 0 * v
            slot = (j - passes) * block + jax.lax.broadcasted_iota(jnp.int32, (1, 1, block), 2)
            v = jnp.where(slot < slots, v, jnp.zeros((), v.dtype))
        acc_ref[...] += _batched(probs, v, 2, precision)

    @pl.when(j == 2 * passes - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def default_block(slots: int) -> int:
    """Cache slots per grid step: 512, or the whole cache when it is shorter."""
    return min(slots, 512)


@functools.partial(jax.jit, static_argnames=("window", "block", "vmem_limit_bytes", "interpret"))
def decode_attention_tpu(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks, *,
                         window: int | None, interpret: bool | pltpu.InterpretParams, block: int | None = None,
                         vmem_limit_bytes: int | None = None):
    """q [b, 1, heads, hd] and k_new, v_new [b, 1, kv, hd] (RoPE applied), positions [b, 1]
    (NO_POSITION: padding), cache_* as model.LayerCache before this step's write, sinks
    [heads]. Returns [b, 1, heads, hd] in q's dtype, as Attention.attend on the cache
    followed by the new key. window: the sliding window (the cache is its ring) or None
    (full layer: slot p holds position p). block: cache slots per grid step, a multiple of
    128 or the whole cache (default `default_block`). vmem_limit_bytes: Mosaic's scoped
    VMEM limit (default: what the scores of the whole cache need plus 16 MiB). interpret:
    Pallas interpret mode (CPU tests; pltpu.InterpretParams: the TPU interpreter)."""
    batch, _, heads, hd = q.shape
    slots, kv = cache_k.shape[1], cache_k.shape[2]
    _check_shapes(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks)
    groups = heads // kv
    dtype = q.dtype
    block = block or default_block(slots)
    if block != slots and block % LANES:
        raise ValueError(f"decode_attention_tpu: block must be a multiple of {LANES} or all {slots} slots, "
                         f"got {block}")
    num_blocks = pl.cdiv(slots, block)
    qpos = positions[:, 0].astype(jnp.int32)
    # Slots [0, min(qp + 1, slots)) can hold a visible key (ring slots too, once full).
    valid = jnp.where(qpos >= 0, pl.cdiv(jnp.minimum(qpos + 1, slots), block), 0).astype(jnp.int32)
    passes = jnp.maximum(jnp.max(valid), 1).reshape(1)
    last = lambda b, valid: jnp.maximum(valid[b] - 1, 0)

    def key_block(b, j, qpos, valid, steps):
        return b, 0, 0, jnp.minimum(j, last(b, valid))

    def value_block(b, j, qpos, valid, steps):
        return b, 0, 0, jnp.clip(j - steps[0], 0, last(b, valid))

    def position_block(b, j, qpos, valid, steps):
        return 0, jnp.where(j < steps[0], jnp.minimum(j, last(b, valid)), jnp.clip(j - steps[0], 0, last(b, valid)))

    per_sequence = lambda b, j, *_: (b, 0, 0, 0)
    scores_dtype = dtype if jnp.dtype(dtype).itemsize == 2 else F32  # rounded scores are exact in dtype
    scratch_bytes = kv * groups * num_blocks * block * jnp.dtype(scores_dtype).itemsize
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, 2 * passes[0]),
        in_specs=[
            pl.BlockSpec((None, kv, groups, hd), per_sequence),
            pl.BlockSpec((None, kv, 1, hd), per_sequence),
            pl.BlockSpec((None, kv, 1, hd), per_sequence),
            pl.BlockSpec((kv, groups), lambda b, j, *_: (0, 0)),
            pl.BlockSpec((batch, block), position_block),
            pl.BlockSpec((None, kv, hd, block), key_block),
            pl.BlockSpec((None, kv, hd, block), value_block),
        ],
        out_specs=pl.BlockSpec((None, kv, groups, hd), per_sequence),
        scratch_shapes=[pltpu.VMEM((kv * groups, num_blocks * block), scores_dtype),
                        *(pltpu.VMEM((kv, groups, 1), F32) for _ in range(3)),
                        pltpu.VMEM((kv, groups, hd), F32)],
    )
    cache = [cache_positions.astype(jnp.int32), jnp.transpose(cache_k, (0, 2, 3, 1)),
             jnp.transpose(cache_v, (0, 2, 3, 1))]
    if not interpret:
        # Kept in HBM: otherwise XLA copies a cache that fits VMEM into it whole before the
        # call, though the kernel reads only the valid blocks.
        cache = [pltpu.with_memory_space_constraint(a, pltpu.HBM) for a in cache]
    operands = (q[:, 0].reshape(batch, kv, groups, hd), k_new[:, 0, :, None, :], v_new[:, 0, :, None, :],
                sinks.reshape(kv, groups), *cache)
    cost = attention_cost(batch, kv, groups, hd, slots, block, jnp.dtype(dtype).itemsize)
    kernel = functools.partial(_kernel, block=block, slots=slots, window=window,
                               scale=float(np.asarray(hd ** -0.5, dtype)),
                               precision=jax.lax.Precision.HIGHEST if dtype == F32 else None)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_struct((batch, kv, groups, hd), dtype, *operands),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit_bytes or scratch_bytes + 16 * 2**20),
        interpret=interpret,
        cost_estimate=cost,
        name="decode_attention_sinks_tpu",
    )(qpos, valid, passes, *operands)
    return out.reshape(batch, 1, heads, hd)


def attention_cost(batch: int, kv: int, groups: int, hd: int, slots: int, block: int, itemsize: int
                   ) -> pl.CostEstimate:
    """What one call moves and computes, from its block specs, when every cache slot is
    valid (the last step of a full cache: the most it can read): each sequence's key and
    value blocks (HBM rows hold whole 128-lane tiles) and, per block and pass, the (batch,
    block) position block; q, the new key and value, the sinks and the output. XLA's cost
    analysis counts the kernel by this estimate (docs/tpu.md)."""
    blocks = -(-slots // block)
    lanes = min(blocks * block, -(-slots // LANES) * LANES)
    cache = 2 * kv * hd * lanes * itemsize
    positions = 2 * blocks * batch * block * 4
    small = (2 * kv * groups + 2 * kv) * hd * itemsize + kv * groups * itemsize
    return pl.CostEstimate(flops=4 * batch * kv * groups * hd * slots, transcendentals=2 * batch * kv * groups * slots,
                           bytes_accessed=batch * (cache + positions + small))


def _check_shapes(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks):
    batch, t, heads, hd = q.shape
    slots, kv = cache_k.shape[1], cache_k.shape[2]
    where = "decode_attention_tpu"
    if t != 1:
        raise ValueError(f"{where}: takes one new token per sequence, got {t} (use Attention.attend for prefill)")
    if heads % kv:
        raise ValueError(f"{where}: {heads} query heads are not a multiple of {kv} kv heads")
    expected = {"k_new": (k_new, (batch, 1, kv, hd)), "v_new": (v_new, (batch, 1, kv, hd)),
                "positions": (positions, (batch, 1)), "cache_k": (cache_k, (batch, slots, kv, hd)),
                "cache_v": (cache_v, cache_k.shape), "cache_positions": (cache_positions, (batch, slots)),
                "sinks": (sinks, (heads,))}
    for name, (array, shape) in expected.items():
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
