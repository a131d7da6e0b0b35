"""Sink-aware decode attention (Pallas Triton): one new token per sequence against its KV
cache, reading only the cache slots that can hold a visible key, on tensor cores.

`decode_attention` mirrors `Attention.attend` for a one-token step whose keys are the
cache followed by the new key (spec 2.3): scores rounded to the compute dtype and scaled
by head_dim^-0.5 in that dtype, the sink as an extra logit in the softmax denominator,
fp32 softmax, probabilities rounded to the compute dtype before they weight the values.

Each program takes one (sequence, kv head, split): the kv head's `groups` query heads,
padded to 16 rows so that both products run as `dot`s (tensor cores), against blocks of
`block` cache slots, with an online softmax. The splits share the visible slots evenly
(flash-decoding); split 0 also takes the sink and the new key, so a second small kernel
only rescales and sums the splits. With one split the first kernel writes the output.

Full layers hold position p in slot p, so only slots below the query position are read
(the loop length depends on each sequence's position); sliding layers hold a ring of
`window` slots, all read, masked by position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
NO_POSITION = -1
MIN_DOT = 16  # Triton's smallest dot operand dimension
TARGET_PROGRAMS = 256  # about two programs per SM on an H100 (132 SMs)
MAX_SPLITS = 64


def default_splits(batch: int, kv_heads: int, slots: int, block: int, window: int | None) -> int:
    """Splits per (sequence, kv head): enough programs to fill the GPU for full layers,
    one for sliding layers (a 128-slot ring is a few blocks) and for large batches."""
    if window is not None:
        return 1
    want = -(-TARGET_PROGRAMS // (batch * kv_heads))
    most = min(MAX_SPLITS, -(-slots // block))
    return max(1, min(_pow2_ceil(want), _pow2_floor(most)))


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _round_scores(s, scale, dtype):
    """fp32 dot products -> the reference's scores: round, scale in the compute dtype, round."""
    return (s.astype(dtype).astype(F32) * scale).astype(dtype).astype(F32)


def _partial_kernel(qpos_ref, q_ref, k_ref, v_ref, kpos_ref, k_new_ref, v_new_ref, sinks_ref, *out_refs,
                    block: int, splits: int, slots: int, groups: int, rows: int, window: int | None,
                    scale: float, dtype, precision):
    b, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    qp = qpos_ref[b]
    real = jnp.arange(rows) < groups  # the padded query rows beyond `groups` are dropped
    heads = pl.ds(head * groups, rows)
    q = plgpu.load(q_ref.at[b, heads, :], mask=real[:, None], other=0)  # [rows, hd]

    # Split 0 starts from the sink and the new key (spec 2.3); the others from nothing.
    k_new = plgpu.load(k_new_ref.at[b, head, :]).astype(F32)
    v_new = plgpu.load(v_new_ref.at[b, head, :]).astype(F32)
    sink = plgpu.load(sinks_ref.at[heads], mask=real, other=0).astype(F32)
    s_new = _round_scores(jnp.sum(q.astype(F32) * k_new[None, :], axis=1), scale, dtype)
    s_new = jnp.where(qp != NO_POSITION, s_new, -jnp.inf)  # a padding query sees nothing
    m0 = jnp.maximum(s_new, sink)
    p_new = jnp.exp(s_new - m0)
    first_split = split == 0
    m = jnp.where(first_split, m0, -jnp.inf)
    l = jnp.where(first_split, p_new + jnp.exp(sink - m0), 0.0)
    acc = jnp.where(first_split, p_new.astype(dtype).astype(F32)[:, None] * v_new[None, :], 0.0)

    # This split's share of the slots that can be visible, in whole blocks.
    visible = slots if window is not None else jnp.clip(qp, 0, slots)
    per_split = (visible + splits - 1) // splits
    chunk = (per_split + block - 1) // block * block
    first = split * chunk
    end = jnp.minimum(first + chunk, visible)
    steps = jnp.maximum(end - first + block - 1, 0) // block

    def body(i, carry):
        m, l, acc = carry
        start = first + i * block
        inside = start + jnp.arange(block) < end
        k = plgpu.load(k_ref.at[b, pl.ds(start, block), head, :], mask=inside[:, None], other=0)
        v = plgpu.load(v_ref.at[b, pl.ds(start, block), head, :], mask=inside[:, None], other=0)
        kp = plgpu.load(kpos_ref.at[b, pl.ds(start, block)], mask=inside, other=NO_POSITION)
        allowed = inside & (kp <= qp) & (kp != NO_POSITION)
        if window is not None:
            allowed &= qp - kp < window
        s = _round_scores(plgpu.dot(q, k, trans_b=True, precision=precision), scale, dtype)  # [rows, block]
        s = jnp.where(allowed[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - safe[:, None])
        alpha = jnp.exp(m - safe)
        pv = plgpu.dot(p.astype(dtype), v, precision=precision)  # [rows, hd] fp32
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    m, l, acc = jax.lax.fori_loop(0, steps, body, (m, l, acc))

    if splits == 1:  # l > 0: split 0 holds the sink
        [out_ref] = out_refs
        plgpu.store(out_ref.at[b, heads, :], (acc / l[:, None]).astype(out_ref.dtype), mask=real[:, None])
    else:
        m_ref, l_ref, acc_ref = out_refs
        plgpu.store(m_ref.at[b, split, heads], m, mask=real)
        plgpu.store(l_ref.at[b, split, heads], l, mask=real)
        plgpu.store(acc_ref.at[b, split, heads, :], acc, mask=real[:, None])


def _combine_kernel(m_ref, l_ref, acc_ref, out_ref):
    """One query head of one sequence: rescales each split's sums to the common maximum, adds, divides."""
    b, head = pl.program_id(0), pl.program_id(1)
    m = plgpu.load(m_ref.at[b, :, head])  # [splits]
    l = plgpu.load(l_ref.at[b, :, head])
    acc = plgpu.load(acc_ref.at[b, :, head, :])  # [splits, hd]
    weight = jnp.exp(m - jnp.max(m))  # the maximum is finite: split 0 holds the sink
    out = jnp.sum(acc * weight[:, None], axis=0) / jnp.sum(l * weight)
    plgpu.store(out_ref.at[b, head, :], out.astype(out_ref.dtype))


@functools.partial(jax.jit, static_argnames=("window", "splits", "block", "num_warps", "num_stages", "interpret"))
def decode_attention(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks, *,
                     window: int | None, splits: int | None = None, block: int = 64, num_warps: int = 4,
                     num_stages: int = 2, interpret: bool | None = None):
    """q [b, 1, heads, hd] (after RoPE), k_new/v_new [b, 1, kv, hd], positions [b, 1],
    cache_* as in model.LayerCache (before this step's write), sinks [heads].
    Returns [b, 1, heads, hd] in q's dtype, as Attention.attend on cache + new key.

    window: the sliding window (cache is then its ring) or None (full layer).
    splits: slot ranges per (sequence, kv head), a power of 2 (None: `default_splits`).
    block: cache slots per loop step, a power of 2 >= 16."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    dtype = q.dtype
    batch, t, heads, hd = q.shape
    slots, kv = cache_k.shape[1], cache_k.shape[2]
    _check_shapes(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks, block, splits)
    groups = heads // kv
    rows = max(MIN_DOT, _pow2_ceil(groups))
    if splits is None:
        splits = default_splits(batch, kv, slots, block, window)
    scale = float(np.asarray(hd ** -0.5, dtype))  # the scale as the compute dtype holds it
    precision = jax.lax.Precision.HIGHEST if dtype == F32 else jax.lax.Precision.DEFAULT
    qpos = positions[:, 0].astype(jnp.int32)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, heads, hd), dtype)]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, splits, heads), F32), jax.ShapeDtypeStruct((batch, splits, heads), F32),
                     jax.ShapeDtypeStruct((batch, splits, heads, hd), F32)]
    kernel = functools.partial(_partial_kernel, block=block, splits=splits, slots=slots, groups=groups, rows=rows,
                               window=window, scale=scale, dtype=dtype, precision=precision)
    parts = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(batch, kv, splits), in_specs=[anywhere] * 8,
        out_specs=[anywhere] * len(out_shape), compiler_params=params, interpret=interpret,
        name="decode_attention_sinks",
    )(qpos, q[:, 0], cache_k, cache_v, cache_positions.astype(jnp.int32), k_new[:, 0], v_new[:, 0], sinks)
    if splits == 1:
        [out] = parts
    else:
        out = pl.pallas_call(
            _combine_kernel, out_shape=jax.ShapeDtypeStruct((batch, heads, hd), dtype), grid=(batch, heads),
            in_specs=[anywhere] * 3, out_specs=anywhere,
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
            name="decode_attention_combine",
        )(*parts)
    return out[:, None]


def _check_shapes(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks, block, splits):
    batch, t, heads, hd = q.shape
    slots, kv = cache_k.shape[1], cache_k.shape[2]
    where = "decode_attention"
    if t != 1:
        raise ValueError(f"{where}: takes one new token per sequence, got {t} (use Attention.attend for prefill)")
    if heads % kv:
        raise ValueError(f"{where}: {heads} query heads are not a multiple of {kv} kv heads")
    if hd < MIN_DOT or hd & (hd - 1):
        raise ValueError(f"{where}: head_dim must be a power of 2 >= {MIN_DOT}, got {hd}")
    if block < MIN_DOT or block & (block - 1):
        raise ValueError(f"{where}: block must be a power of 2 >= {MIN_DOT}, got {block}")
    if splits is not None and (splits < 1 or splits & (splits - 1)):
        raise ValueError(f"{where}: splits must be a power of 2, got {splits}")
    expected = {"k_new": (k_new, (batch, 1, kv, hd)), "v_new": (v_new, (batch, 1, kv, hd)),
                "positions": (positions, (batch, 1)), "cache_v": (cache_v, cache_k.shape),
                "cache_k": (cache_k, (batch, slots, kv, hd)), "cache_positions": (cache_positions, (batch, slots)),
                "sinks": (sinks, (heads,))}
    for name, (array, shape) in expected.items():
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
