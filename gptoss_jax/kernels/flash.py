"""Flash-style prefill attention (Pallas Triton) with learned sinks, the sliding window and GQA.

`prefill_attention` mirrors `Attention.attend` (docs/architecture.md 2.3) for many query tokens at
once: scores rounded to the compute dtype, times head_dim^-0.5 in fp32 and rounded again; the sink
as an extra logit in the softmax denominator only; fp32 softmax; the probabilities rounded to the
compute dtype before the tensor-core PV product. The softmax is computed online over key blocks, so
the [queries, keys] score matrix never exists in memory. One difference from the reference: the
rounded probabilities are relative to the running maximum and normalised at the end, not normalised
first, so bf16 results differ from the reference by bf16 rounding noise (fp32 results agree to fp32
rounding).

Layout. The G = heads / kv_heads query heads of one kv head, times a run of query tokens,
are the `block_m` rows (row r = token r // G, group r % G) of one program, so every K/V
tile is loaded once for all its query heads. Programs: (batch, kv head, row block).

Block skipping. Positions are arbitrary per sequence (ragged batches, padding, ring
caches), so the key blocks a row block needs come from positions: XLA computes, per row
block, the list of key blocks that hold at least one key with k_lo <= q_hi (causal) and
k_hi > q_lo - window (sliding), over valid positions only. The kernel loops over that
list only: a sliding layer does O(queries x window) work however long the keys are, and
empty cache slots cost nothing. Blocks that every row of the block sees whole come
first and skip the mask; the others apply the exact mask computed from the positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_jax.kernels.common import F32, NO_POSITION, next_power_of_2

_FAR = np.iinfo(np.int32).max  # "no valid position" for block minima


def _flash_kernel(counts_ref, order_ref, q_ref, qpos_ref, sink_ref, k_ref, v_ref, kpos_ref, o_ref, *,
                  row_blocks: int, block_k: int, window: int | None, scale: float, dtype, precision):
    b, head = pl.program_id(0), pl.program_id(1)
    rows = row_blocks - 1 - pl.program_id(2)  # the row block: the last ones (most keys) run first
    q = q_ref[...]  # [M, D] compute dtype
    qp = qpos_ref[...]  # [M]

    def body(j, carry, masked: bool):
        m, l, acc = carry
        start = order_ref[b, rows, j] * block_k
        k = k_ref[b, pl.ds(start, block_k), head, :]  # [K, D]
        v = v_ref[b, pl.ds(start, block_k), head, :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision)  # fp32 accumulation
        # docs/architecture.md 2.3: the score rounded, scaled in fp32, rounded again.
        s = (s.astype(dtype).astype(F32) * scale).astype(dtype).astype(F32)
        if masked:
            kp = kpos_ref[b, pl.ds(start, block_k)]  # [K]
            allowed = (kp[None, :] <= qp[:, None]) & (kp[None, :] != NO_POSITION)
            if window is not None:
                allowed &= qp[:, None] - kp[None, :] < window
            s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: m starts at the sink
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        pv = plgpu.dot(p.astype(dtype), v, precision=precision)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    # The sink is the first logit: running max = sink, denominator = exp(sink - sink) = 1.
    m = sink_ref[...]
    carry = (m, jnp.ones_like(m), jnp.zeros(o_ref.shape, F32))
    # The schedule lists the key blocks every row sees whole first (no mask needed), then
    # the blocks that need the position mask.
    unmasked, needed = counts_ref[b, rows, 0], counts_ref[b, rows, 1]
    carry = jax.lax.fori_loop(0, unmasked, functools.partial(body, masked=False), carry)
    _, l, acc = jax.lax.fori_loop(unmasked, needed, functools.partial(body, masked=True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def _block_bounds(positions, block):
    """positions [b, n * block] -> per block [b, n]: the lowest and highest valid position
    ((_FAR, NO_POSITION) without any), and whether every position in it is valid."""
    p = positions.reshape(positions.shape[0], -1, block)
    valid = p != NO_POSITION
    return (jnp.min(jnp.where(valid, p, _FAR), axis=2), jnp.max(jnp.where(valid, p, NO_POSITION), axis=2),
            jnp.all(valid, axis=2))


def key_block_schedule(row_positions, key_positions, *, block_m: int, block_k: int, window: int | None):
    """Per row block, which key blocks to read, in this order: those every row sees whole
    (no mask), then those holding at least one key some row may see, then the rest, each
    group in increasing block order. Returns (order [b, row blocks, key blocks],
    counts [b, row blocks, 2]: the unmasked blocks and all needed blocks)."""
    q_lo, q_hi, q_full = _block_bounds(row_positions, block_m)
    k_lo, k_hi, k_full = _block_bounds(key_positions, block_k)
    q_lo, q_hi, q_full = q_lo[:, :, None], q_hi[:, :, None], q_full[:, :, None]
    k_lo, k_hi, k_full = k_lo[:, None, :], k_hi[:, None, :], k_full[:, None, :]
    needed = k_lo <= q_hi  # false for empty blocks (k_lo = _FAR, q_hi = -1)
    whole = q_full & k_full & (k_hi <= q_lo)
    if window is not None:
        needed &= k_hi > q_lo - window
        whole &= q_hi - k_lo < window
    rank = jnp.where(whole, 0, jnp.where(needed, 1, 2))
    order = jnp.argsort(rank, axis=2, stable=True).astype(jnp.int32)
    counts = jnp.stack([jnp.sum(whole, axis=2, dtype=jnp.int32), jnp.sum(needed, axis=2, dtype=jnp.int32)], axis=2)
    return order, counts


def _check(q, k, v, q_positions, k_positions, sinks, window, block_m, block_k):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"prefill_attention: q must be [batch, tokens, heads, head_dim] and k, v "
                         f"[batch, keys, kv_heads, head_dim] alike; got q {q.shape}, k {k.shape}, v {v.shape}")
    b, t, heads, hd = q.shape
    if k.shape[0] != b or k.shape[3] != hd or heads % k.shape[2]:
        raise ValueError(f"prefill_attention: k {k.shape} does not fit q {q.shape} (same batch and head_dim; "
                         f"kv_heads must divide heads)")
    if q_positions.shape != (b, t) or k_positions.shape != k.shape[:2] or sinks.shape != (heads,):
        raise ValueError(f"prefill_attention: q_positions must be {(b, t)}, k_positions {k.shape[:2]} and sinks "
                         f"{(heads,)}; got {q_positions.shape}, {k_positions.shape}, {sinks.shape}")
    for name, size in (("block_m", block_m), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"prefill_attention: {name} must be a power of 2 >= 16 (Triton tiles), got {size}")
    if window is not None and window < 1:
        raise ValueError(f"prefill_attention: window must be None (full layer) or >= 1, got {window}")


@functools.partial(jax.jit, static_argnames=("window", "block_m", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def prefill_attention(q, k, v, q_positions, k_positions, sinks, *, window: int | None, block_m: int = 128,
                      block_k: int = 64, num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """q [b, t, heads, hd] (after RoPE); k, v [b, s, kv_heads, hd]; q_positions [b, t] and
    k_positions [b, s] (NO_POSITION: padding / empty slot); sinks [heads]; window: the
    sliding window, None for a full layer. Returns [b, t, heads, hd] in q's dtype, as
    Attention.attend. Tuning: block_m query rows (tokens x query heads of a kv head) and
    block_k keys per step, both powers of 2 >= 16; num_warps, num_stages for Triton."""
    _check(q, k, v, q_positions, k_positions, sinks, window, block_m, block_k)
    dtype = q.dtype
    b, t, heads, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    groups = heads // kv
    rows = t * groups
    row_blocks, key_blocks = -(-rows // block_m), -(-s // block_k)
    pad_rows, pad_keys = row_blocks * block_m - rows, key_blocks * block_k - s
    pad_hd = max(16, next_power_of_2(hd)) - hd

    # Rows of one kv head: [b, kv, t * groups, hd]; padding rows and keys carry NO_POSITION,
    # padding head_dim columns are zeros (they change no dot product).
    q_rows = q.reshape(b, t, kv, groups, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv, rows, hd)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, pad_rows), (0, pad_hd)))
    row_positions = jnp.pad(jnp.repeat(q_positions.astype(jnp.int32), groups, axis=1), ((0, 0), (0, pad_rows)),
                            constant_values=NO_POSITION)
    row_sinks = jnp.tile(sinks.astype(F32).reshape(kv, groups), (1, -(-(rows + pad_rows) // groups)))
    row_sinks = row_sinks[:, : rows + pad_rows]
    k, v = (jnp.pad(x, ((0, 0), (0, pad_keys), (0, 0), (0, pad_hd))) for x in (k, v))
    key_positions = jnp.pad(k_positions.astype(jnp.int32), ((0, 0), (0, pad_keys)), constant_values=NO_POSITION)
    order, counts = key_block_schedule(row_positions, key_positions, block_m=block_m, block_k=block_k, window=window)

    scale = float(np.float32(hd ** -0.5))  # the reference multiplies by the Python float, in fp32
    precision = jax.lax.Precision.HIGHEST if dtype == F32 else jax.lax.Precision.DEFAULT
    kernel = functools.partial(_flash_kernel, row_blocks=row_blocks, block_k=block_k, window=window, scale=scale,
                               dtype=dtype, precision=precision)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    last = row_blocks - 1  # programs take the row blocks from the last: causal work shrinks towards the end
    rows_spec = pl.BlockSpec((None, None, block_m, hd + pad_hd), lambda b, h, r: (b, h, last - r, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, dtype),
        grid=(b, kv, row_blocks),
        in_specs=[anywhere, anywhere, rows_spec,
                  pl.BlockSpec((None, block_m), lambda b, h, r: (b, last - r)),
                  pl.BlockSpec((None, block_m), lambda b, h, r: (h, last - r)),
                  anywhere, anywhere, anywhere],
        out_specs=rows_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prefill_attention_sinks",
    )(counts, order, q_rows, row_positions, row_sinks, k, v, key_positions)
    out = out[:, :, :rows, :hd].reshape(b, kv, t, groups, hd).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, heads, hd)
