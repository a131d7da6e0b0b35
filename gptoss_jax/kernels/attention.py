"""Sink-aware decode attention (Pallas): one new token per sequence against its KV cache,
reading only the cache slots that can hold a visible key.

`decode_attention` mirrors `Attention.attend` for a one-token step whose keys are the
cache followed by the new key (spec 2.3): scores rounded to the compute dtype and scaled
by head_dim^-0.5 in that dtype, the sink as an extra logit in the softmax denominator,
fp32 softmax. The kernel splits the cache slots into `splits` ranges (flash-decoding);
each program returns its running max, denominator and weighted values for one (sequence,
kv head, range), and a small combine adds the sink and the new key.

Full layers hold position p in slot p, so only slots below the query position are read;
sliding layers hold a ring of `window` slots, all read, masked by position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

F32 = jnp.float32
NO_POSITION = -1


def _scores(q, k, scale, dtype):
    """q [G, D], k [S, D] fp32 -> [G, S] rounded as the reference: dot, round, scale, round."""
    s = jnp.sum(q[:, None, :] * k[None, :, :], axis=2)
    return (s.astype(dtype).astype(F32) * scale).astype(dtype).astype(F32)


def _partial_kernel(qpos_ref, q_ref, k_ref, v_ref, kpos_ref, m_ref, l_ref, acc_ref, *, block: int,
                    chunk: int, slots: int, groups: int, window: int | None, scale: float, dtype):
    from jax.experimental.pallas import triton as plgpu

    b, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    qp = qpos_ref[b]
    q = q_ref[b, pl.ds(head * groups, groups), :].astype(F32)  # [G, D]
    valid = slots if window is not None else jnp.clip(qp, 0, slots)  # slots that can be visible
    first = split * chunk
    end = jnp.minimum(first + chunk, valid)
    steps = jnp.maximum(end - first + block - 1, 0) // block

    def body(i, carry):
        m, l, acc = carry
        start = first + i * block
        index = start + jnp.arange(block)
        inside = index < end
        k = plgpu.load(k_ref.at[b, pl.ds(start, block), head, :], mask=inside[:, None], other=0).astype(F32)
        v = plgpu.load(v_ref.at[b, pl.ds(start, block), head, :], mask=inside[:, None], other=0).astype(F32)
        kp = plgpu.load(kpos_ref.at[b, pl.ds(start, block)], mask=inside, other=NO_POSITION)
        allowed = inside & (kp <= qp) & (kp != NO_POSITION)
        if window is not None:
            allowed &= qp - kp < window
        s = jnp.where(allowed[None, :], _scores(q, k, scale, dtype), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - safe[:, None])
        alpha = jnp.exp(m - safe)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + jnp.sum(p[:, :, None] * v[None], axis=1)

    init = (jnp.full((groups,), -jnp.inf, F32), jnp.zeros((groups,), F32), jnp.zeros(acc_ref.shape, F32))
    m, l, acc = jax.lax.fori_loop(0, steps, body, init)
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("window", "splits", "block", "interpret", "num_warps"))
def decode_attention(q, k_new, v_new, positions, cache_k, cache_v, cache_positions, sinks, *,
                     window: int | None, splits: int = 16, block: int = 64, num_warps: int = 4,
                     interpret: bool | None = None):
    """q [b, 1, heads, hd] (after RoPE), k_new/v_new [b, 1, kv, hd], positions [b, 1],
    cache_* as in model.LayerCache (before this step's write), sinks [heads].
    Returns [b, 1, heads, hd] in q's dtype, as Attention.attend on cache + new key."""
    from jax.experimental.pallas import triton as plgpu

    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    dtype = q.dtype
    batch, t, heads, hd = q.shape
    if t != 1:
        raise ValueError(f"decode_attention takes one new token per sequence, got {t}")
    slots, kv = cache_k.shape[1], cache_k.shape[2]
    groups = heads // kv
    block = min(block, max(16, 1 << (slots - 1).bit_length()))
    splits = max(1, min(splits, -(-slots // block)))
    chunk = -(-(-(-slots // splits)) // block) * block  # slots per split, a multiple of block
    scale = float(np.asarray(hd ** -0.5, dtype))  # the scale as the compute dtype holds it
    qpos = positions[:, 0].astype(jnp.int32)
    kernel = functools.partial(_partial_kernel, block=block, chunk=chunk, slots=slots, groups=groups,
                               window=window, scale=scale, dtype=dtype)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    m, l, acc = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((batch, kv, splits, groups), F32),
                   jax.ShapeDtypeStruct((batch, kv, splits, groups), F32),
                   jax.ShapeDtypeStruct((batch, kv, splits, groups, hd), F32)),
        grid=(batch, kv, splits),
        in_specs=[anywhere] * 5,
        out_specs=(pl.BlockSpec((None, None, None, groups), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, groups), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, groups, hd), lambda b, h, s: (b, h, s, 0, 0))),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="decode_attention_sinks",
    )(qpos, q[:, 0], cache_k, cache_v, cache_positions.astype(jnp.int32))

    # Combine the splits with the sink logit and the new key (visible unless padding).
    qg = q[:, 0].reshape(batch, kv, groups, hd).astype(F32)
    s_new = jnp.einsum("bkgd,bkd->bkg", qg, k_new[:, 0].astype(F32), precision=jax.lax.Precision.HIGHEST)
    s_new = (s_new.astype(dtype).astype(F32) * scale).astype(dtype).astype(F32)
    s_new = jnp.where((qpos != NO_POSITION)[:, None, None], s_new, -jnp.inf)
    sink = sinks.astype(F32).reshape(1, kv, groups)
    peak = jnp.maximum(jnp.maximum(jnp.max(m, axis=2), sink), s_new)  # [b, kv, g]
    weight = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - peak[:, :, None]))  # [b, kv, splits, g]
    w_new = jnp.exp(s_new - peak)
    denominator = jnp.sum(l * weight, axis=2) + jnp.exp(sink - peak) + w_new
    numerator = jnp.sum(acc * weight[..., None], axis=2) + w_new[..., None] * v_new[:, 0, :, None, :].astype(F32)
    out = numerator / denominator[..., None]
    return out.reshape(batch, 1, heads, hd).astype(dtype)
