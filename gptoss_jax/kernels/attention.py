"""Sink-aware decode attention (Pallas Triton): one new token per sequence against its KV
cache, reading only the cache slots that can hold a visible key, on tensor cores.

`decode_attention` mirrors `Attention.attend` for a one-token step whose keys are the
cache followed by the new key (docs/architecture.md 2.3): scores rounded to the compute dtype, times
head_dim^-0.5 in fp32 and rounded again, the sink as an extra logit in the softmax denominator,
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

from gptoss_jax.kernels.common import F32, NO_POSITION, next_power_of_2

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
    return max(1, min(next_power_of_2(want), _pow2_floor(most)))


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _round_scores(s, scale, dtype):
    """fp32 dot products -> the reference's scores: round, scale in fp32, round."""
    return (s.astype(dtype).astype(F32) * scale).astype(dtype).astype(F32)


def _rope_halves(x1, x2, cos, sin, dtype):
    """Half-split RoPE as model.apply_rope, each product and sum rounded to the compute dtype."""
    r = lambda t: t.astype(dtype).astype(F32)
    x1, x2 = x1.astype(F32), x2.astype(F32)
    return r(r(x1 * cos) - r(x2 * sin)), r(r(x2 * cos) + r(x1 * sin))


def _partial_kernel(qpos_ref, q_ref, k_ref, v_ref, kpos_ref, k_new_ref, v_new_ref, sinks_ref, cos_ref, sin_ref,
                    *out_refs, block: int, splits: int, slots: int, groups: int, rows: int, window: int | None,
                    scale: float, dtype, precision, rope: bool, write_cache: bool):
    b, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    qp = qpos_ref[b]
    real = jnp.arange(rows) < groups  # the padded query rows beyond `groups` are dropped
    heads = pl.ds(head * groups, rows)
    half = q_ref.shape[-1] // 2
    # q and the keys as their two RoPE halves (each product is the sum of two dots).
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    q1 = plgpu.load(q_ref.at[b, heads, lo], mask=real[:, None], other=0)  # [rows, hd/2]
    q2 = plgpu.load(q_ref.at[b, heads, hi], mask=real[:, None], other=0)
    k1_new = plgpu.load(k_new_ref.at[b, head, lo])
    k2_new = plgpu.load(k_new_ref.at[b, head, hi])
    if rope:  # docs/architecture.md 2.4, as model.apply_rope
        cos = plgpu.load(cos_ref.at[b, :]).astype(F32)
        sin = plgpu.load(sin_ref.at[b, :]).astype(F32)
        q1, q2 = (t.astype(dtype) for t in _rope_halves(q1, q2, cos[None, :], sin[None, :], dtype))
        k1_new, k2_new = (t.astype(dtype) for t in _rope_halves(k1_new, k2_new, cos, sin, dtype))

    # Split 0 starts from the sink and the new key (docs/architecture.md 2.3); the others from nothing.
    v_new = plgpu.load(v_new_ref.at[b, head, :])
    sink = plgpu.load(sinks_ref.at[heads], mask=real, other=0).astype(F32)
    s_new = jnp.sum(q1.astype(F32) * k1_new.astype(F32)[None, :] + q2.astype(F32) * k2_new.astype(F32)[None, :], axis=1)
    s_new = _round_scores(s_new, scale, dtype)
    s_new = jnp.where(qp != NO_POSITION, s_new, -jnp.inf)  # a padding query sees nothing
    m0 = jnp.maximum(s_new, sink)
    p_new = jnp.exp(s_new - m0)
    first_split = split == 0
    m = jnp.where(first_split, m0, -jnp.inf)
    l = jnp.where(first_split, p_new + jnp.exp(sink - m0), 0.0)
    acc = jnp.where(first_split, p_new.astype(dtype).astype(F32)[:, None] * v_new.astype(F32)[None, :], 0.0)

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
        cached = pl.ds(start, block)
        k1 = plgpu.load(k_ref.at[b, cached, head, lo], mask=inside[:, None], other=0)
        k2 = plgpu.load(k_ref.at[b, cached, head, hi], mask=inside[:, None], other=0)
        v = plgpu.load(v_ref.at[b, cached, head, :], mask=inside[:, None], other=0)
        kp = plgpu.load(kpos_ref.at[b, cached], mask=inside, other=NO_POSITION)
        # Strictly below the query: a cached key at the query's own position is the one this
        # step replaces (and, writing the cache, another program may just have stored it).
        allowed = inside & (kp < qp) & (kp != NO_POSITION)
        if window is not None:
            allowed &= qp - kp < window
        s = plgpu.dot(q1, k1, trans_b=True, precision=precision) + plgpu.dot(q2, k2, trans_b=True, precision=precision)
        s = _round_scores(s, scale, dtype)  # [rows, block]
        s = jnp.where(allowed[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - safe[:, None])
        alpha = jnp.exp(m - safe)
        pv = plgpu.dot(p.astype(dtype), v, precision=precision)  # [rows, hd] fp32
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    m, l, acc = jax.lax.fori_loop(0, steps, body, (m, l, acc))

    if write_cache:  # this step's key, value and position, into the slot write_cache picks
        *out_refs, k_out, v_out, kpos_out = out_refs
        if window is not None:  # the ring; one new token is always among the newest `slots`
            slot, write = qp % slots, qp != NO_POSITION
        else:
            slot, write = qp, (qp != NO_POSITION) & (qp < slots)
        slot = jnp.clip(slot, 0, slots - 1)
        write &= split == 0
        mask = jnp.broadcast_to(write, (half,))
        plgpu.store(k_out.at[b, slot, head, lo], k1_new.astype(k_out.dtype), mask=mask)
        plgpu.store(k_out.at[b, slot, head, hi], k2_new.astype(k_out.dtype), mask=mask)
        plgpu.store(v_out.at[b, slot, head, :], v_new, mask=jnp.broadcast_to(write, v_new.shape))

        @pl.when(write & (head == 0))
        def _():
            kpos_out[b, slot] = qp

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


@functools.partial(jax.jit, static_argnames=("window", "write_cache", "splits", "block", "num_warps", "num_stages",
                                             "interpret"))
def decode_attention(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks, rope=None, *,
                     window: int | None, write_cache: bool = False, splits: int | None = None, block: int = 64,
                     num_warps: int = 4, num_stages: int = 3, interpret: bool = False):
    """q [b, 1, heads, hd], k_new/v_new [b, 1, kv, hd], positions [b, 1], cache_* as in
    model.LayerCache (before this step's write), sinks [heads].
    Returns [b, 1, heads, hd] in q's dtype, as Attention.attend on cache + new key.

    rope: None (q and k_new come with RoPE applied) or (cos, sin) [b, 1, hd/2] from
    model.rope_tables, applied to q and k_new here as model.apply_rope does.
    write_cache: also write this step's (RoPE'd) key, value and position into the cache as
    Attention.write_cache does, in place (the cache buffers are the kernel's outputs), and
    return (out, (cache_k, cache_v, cache_positions)).

    window: the sliding window (cache is then its ring) or None (full layer).
    splits: slot ranges per (sequence, kv head), a power of 2 (None: `default_splits`).
    block: cache slots per loop step, a power of 2 >= 16."""
    dtype = q.dtype
    batch, t, heads, hd = q.shape
    slots, kv = cache_k.shape[1], cache_k.shape[2]
    _check_shapes(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks, rope, block, splits,
                  interpret)
    groups = heads // kv
    rows = max(MIN_DOT, next_power_of_2(groups))
    if splits is None:
        splits = default_splits(batch, kv, slots, block, window)
    scale = float(np.float32(hd ** -0.5))  # the reference multiplies by the Python float, in fp32
    precision = jax.lax.Precision.HIGHEST if dtype == F32 else jax.lax.Precision.DEFAULT
    qpos = positions[:, 0].astype(jnp.int32)
    if rope is None:
        cos = sin = jnp.zeros((batch, hd // 2), dtype)  # not read
    else:
        cos, sin = (t.reshape(batch, hd // 2).astype(dtype) for t in rope)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, heads, hd), dtype)]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, splits, heads), F32), jax.ShapeDtypeStruct((batch, splits, heads), F32),
                     jax.ShapeDtypeStruct((batch, splits, heads, hd), F32)]
    cache_positions = cache_positions.astype(jnp.int32)
    aliases = {}
    if write_cache:  # inputs 2, 3, 4 (the cache) are updated in place as the last outputs
        aliases = {2: len(out_shape), 3: len(out_shape) + 1, 4: len(out_shape) + 2}
        out_shape += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (cache_k, cache_v, cache_positions)]
    kernel = functools.partial(_partial_kernel, block=block, splits=splits, slots=slots, groups=groups, rows=rows,
                               window=window, scale=scale, dtype=dtype, precision=precision, rope=rope is not None,
                               write_cache=write_cache)
    parts = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(batch, kv, splits), in_specs=[anywhere] * 10,
        out_specs=[anywhere] * len(out_shape), input_output_aliases=aliases, compiler_params=params,
        interpret=interpret, name="decode_attention_sinks",
    )(qpos, q[:, 0], cache_k, cache_v, cache_positions, k_new[:, 0], v_new[:, 0], sinks, cos, sin)
    new_cache = None
    if write_cache:
        *parts, new_k, new_v, new_positions = parts
        new_cache = (new_k, new_v, new_positions)
    if splits == 1:
        [out] = parts
    else:
        out = pl.pallas_call(
            _combine_kernel, out_shape=jax.ShapeDtypeStruct((batch, heads, hd), dtype), grid=(batch, heads),
            in_specs=[anywhere] * 3, out_specs=anywhere,
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
            name="decode_attention_combine",
        )(*parts)
    return out[:, None] if new_cache is None else (out[:, None], new_cache)


def _check_shapes(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks, rope, block, splits,
                 interpret):
    batch, t, heads, hd = q.shape
    slots, kv = cache_k.shape[1], cache_k.shape[2]
    where = "decode_attention"
    if t != 1:
        raise ValueError(f"{where}: takes one new token per sequence, got {t} (use Attention.attend for prefill)")
    if heads % kv:
        raise ValueError(f"{where}: {heads} query heads are not a multiple of {kv} kv heads")
    if hd < MIN_DOT or hd & (hd - 1):
        raise ValueError(f"{where}: head_dim must be a power of 2 >= {MIN_DOT}, got {hd}")
    if hd < 2 * MIN_DOT and not interpret:  # the products run per RoPE half on tensor cores
        raise ValueError(f"{where}: on a GPU head_dim must be >= {2 * MIN_DOT}, got {hd}")
    if block < MIN_DOT or block & (block - 1):
        raise ValueError(f"{where}: block must be a power of 2 >= {MIN_DOT}, got {block}")
    if splits is not None and (splits < 1 or splits & (splits - 1)):
        raise ValueError(f"{where}: splits must be a power of 2, got {splits}")
    expected = {"k_new": (k_new, (batch, 1, kv, hd)), "v_new": (v_new, (batch, 1, kv, hd)),
                "positions": (positions, (batch, 1)), "cache_v": (cache_v, cache_k.shape),
                "cache_k": (cache_k, (batch, slots, kv, hd)), "cache_positions": (cache_positions, (batch, slots)),
                "sinks": (sinks, (heads,))}
    if rope is not None:
        expected.update(cos=(rope[0], (batch, 1, hd // 2)), sin=(rope[1], (batch, 1, hd // 2)))
    for name, (array, shape) in expected.items():
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
