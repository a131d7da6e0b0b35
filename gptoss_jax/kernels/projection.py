"""Fused RMSNorm + q/k/v projection, and output projection + residual add, for one-token
decode steps (Pallas Triton).

One kernel replaces, per attention layer, the RMSNorm kernel and XLA's q/k/v GEMM, which
for a single token runs at about half the memory bandwidth (docs/performance-log.md entry 9). Each
program recomputes the norm of the token (2880 values, cached in L1/L2) and produces
`rows` outputs of q, k or v: round(h @ W^T + bias) as Attention.project (docs/architecture.md
2.2 for the norm: fp32, gain in fp32, one rounding; docs/architecture.md 2.7 for the projection).
The norm's fp32 sum runs in another order than XLA's, so h can differ from the reference
by one bf16 ulp in rare elements: the result matches within bf16 tolerance, not bit for bit.

`output_residual` replaces XLA's output-projection GEMM and the residual add after it:
x + round(attn @ Wo^T + bo), rounded as Attention.output and the block's bf16 add.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_jax.kernels.common import F32, next_power_of_2


def _gemv_steps(load_step, rows: int, bk: int, steps: int):
    """sum_k w[r, k] * x[k] in fp32 over `steps` steps of `bk` features; load_step(i) -> (w
    [rows, bk] in its dtype, x [bk] fp32)."""
    def step(i, acc):
        w, x = load_step(i)
        return acc + jnp.sum(w.astype(F32) * x[None, :], axis=1)

    return jax.lax.fori_loop(0, steps, step, jnp.zeros((rows,), F32))


def _kernel(x_ref, scale_ref, wq_ref, bq_ref, wk_ref, bk_ref, wv_ref, bv_ref, q_ref, k_ref, v_ref, *,
            rows: int, bk: int, features: int, eps: float, programs: tuple[int, int, int]):
    pid = pl.program_id(0)
    steps = -(-features // bk)
    # The norm from one load of the whole token (one memory round trip, not one per step).
    width = next_power_of_2(features)
    whole = plgpu.load(x_ref.at[pl.ds(0, width)], mask=jnp.arange(width) < features, other=0).astype(F32)
    inv_rms = jax.lax.rsqrt(jnp.sum(whole * whole) / features + eps)

    def project(w_ref, b_ref, out_ref, block):
        def load_step(i):
            inside = i * bk + jnp.arange(bk) < features
            x = plgpu.load(x_ref.at[pl.ds(i * bk, bk)], mask=inside, other=0).astype(F32)
            gain = plgpu.load(scale_ref.at[pl.ds(i * bk, bk)], mask=inside, other=0).astype(F32)
            h = (x * inv_rms * gain).astype(out_ref.dtype).astype(F32)
            w = plgpu.load(w_ref.at[pl.ds(block * rows, rows), pl.ds(i * bk, bk)], mask=inside[None, :], other=0)
            return w, h

        acc = _gemv_steps(load_step, rows, bk, steps)
        bias = b_ref[pl.ds(block * rows, rows)].astype(F32)
        out = (acc + bias).astype(out_ref.dtype)  # one rounding, after the bias (docs/architecture.md 2.7)
        plgpu.store(out_ref.at[pl.ds(block * rows, rows)], out)

    first = 0
    for count, (w_ref, b_ref, out_ref) in zip(programs, ((wq_ref, bq_ref, q_ref), (wk_ref, bk_ref, k_ref),
                                                         (wv_ref, bv_ref, v_ref))):
        @pl.when((pid >= first) & (pid < first + count))
        def _(w_ref=w_ref, b_ref=b_ref, out_ref=out_ref, first=first):
            project(w_ref, b_ref, out_ref, pid - first)
        first += count


@functools.partial(jax.jit, static_argnames=("eps", "rows", "bk", "num_warps", "num_stages", "interpret"))
def norm_qkv(x, norm_scale, wq, bq, wk, bk_, wv, bv, *, eps: float, rows: int = 8, bk: int = 512,
             num_warps: int = 8, num_stages: int = 1, interpret: bool = False):
    """One token: x [D] (the residual stream, compute dtype), norm_scale [D], w* [heads,
    head_dim, D], b* [heads, head_dim] -> q, k, v [heads, head_dim] (compute dtype)."""
    features = x.shape[-1]
    weights = [w.reshape(-1, features) for w in (wq, wk, wv)]
    for w in weights:
        if w.shape[0] % rows:
            raise ValueError(f"norm_qkv: {w.shape[0]} projection outputs are not a multiple of the row tile {rows}")
    programs = tuple(w.shape[0] // rows for w in weights)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    q, k, v = pl.pallas_call(
        functools.partial(_kernel, rows=rows, bk=bk, features=features, eps=float(eps), programs=programs),
        out_shape=[jax.ShapeDtypeStruct((w.shape[0],), x.dtype) for w in weights],
        grid=(sum(programs),),
        in_specs=[anywhere] * 8,
        out_specs=[anywhere] * 3,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="norm_qkv_gemv",
    )(x, norm_scale, weights[0], bq.reshape(-1), weights[1], bk_.reshape(-1), weights[2], bv.reshape(-1))
    return q.reshape(wq.shape[:2]), k.reshape(wk.shape[:2]), v.reshape(wv.shape[:2])


def _output_kernel(a_ref, w_ref, b_ref, x_ref, out_ref, *, rows: int, bk: int, features: int):
    outputs = pl.ds(pl.program_id(0) * rows, rows)

    def load_step(i):
        inside = i * bk + jnp.arange(bk) < features
        a = plgpu.load(a_ref.at[pl.ds(i * bk, bk)], mask=inside, other=0).astype(F32)
        w = plgpu.load(w_ref.at[outputs, pl.ds(i * bk, bk)], mask=inside[None, :], other=0)
        return w, a

    acc = _gemv_steps(load_step, rows, bk, -(-features // bk))
    dt = out_ref.dtype
    projected = (acc + b_ref[outputs].astype(F32)).astype(dt).astype(F32)  # one rounding, after the bias
    out_ref[outputs] = (x_ref[outputs].astype(F32) + projected).astype(dt)  # the residual add, rounded


@functools.partial(jax.jit, static_argnames=("rows", "bk", "num_warps", "num_stages", "interpret"))
def output_residual(attn, wo, bo, x, *, rows: int = 8, bk: int = 1024, num_warps: int = 8, num_stages: int = 1,
                    interpret: bool = False):
    """One token: attn [heads, head_dim] (the attention output), wo [D, heads, head_dim],
    bo [D], x [D] (the residual stream) -> x + round(attn @ wo^T + bo), in x's dtype: the
    output projection (docs/architecture.md 2.7) and the block's residual add in one kernel."""
    outputs = wo.shape[0]
    features = attn.size
    if wo.shape[1:] != attn.shape or bo.shape != (outputs,) or x.shape != (outputs,):
        raise ValueError(f"output_residual: attn {attn.shape} needs wo [D, {', '.join(map(str, attn.shape))}], "
                         f"bo [D] and x [D]; got wo {wo.shape}, bo {bo.shape}, x {x.shape}")
    if outputs % rows:
        raise ValueError(f"output_residual: {outputs} outputs are not a multiple of the row tile {rows}")
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_output_kernel, rows=rows, bk=bk, features=features),
        out_shape=jax.ShapeDtypeStruct((outputs,), x.dtype),
        grid=(outputs // rows,),
        in_specs=[anywhere] * 4,
        out_specs=anywhere,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="output_residual_gemv",
    )(attn.reshape(features), wo.reshape(outputs, features), bo, x)


# ------------------------------------------------------------------ a few tokens (2-64)
def _tokens_kernel(*refs, count: int, programs: tuple[int, ...], tokens: int, m: int, bn: int, bk: int,
                   features: int, precision, add_residual: bool):
    """Program p: `bn` outputs of one of the `count` weights (programs[i] programs each),
    for all tokens, on tensor cores: acc [m, bn] += h [m, bk] @ w[bn, bk]^T over the
    features; then round(acc + bias), and with a residual round(residual + that)."""
    h_ref, *refs = refs
    weights, biases, outs = refs[:count], refs[count:2 * count], refs[-count:]
    residual_ref = refs[2 * count] if add_residual else None
    pid = pl.program_id(0)
    real = jnp.arange(m) < tokens  # rows past the tokens (padding to the 16-row dot) read and write nothing
    steps = -(-features // bk)

    def project(w_ref, b_ref, out_ref, block):
        cols = pl.ds(block * bn, bn)

        def step(i, acc):
            inside = i * bk + jnp.arange(bk) < features
            h = plgpu.load(h_ref.at[pl.ds(0, m), pl.ds(i * bk, bk)], mask=real[:, None] & inside[None, :], other=0)
            w = plgpu.load(w_ref.at[cols, pl.ds(i * bk, bk)], mask=inside[None, :], other=0)
            return acc + plgpu.dot(h, w, trans_b=True, precision=precision)

        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((m, bn), F32))
        dt = out_ref.dtype
        out = (acc + plgpu.load(b_ref.at[cols]).astype(F32)[None, :]).astype(dt)  # one rounding (docs/architecture.md 2.7)
        if residual_ref is not None:  # the block's residual add, rounded
            res = plgpu.load(residual_ref.at[pl.ds(0, m), cols], mask=real[:, None], other=0)
            out = (res.astype(F32) + out.astype(F32)).astype(dt)
        plgpu.store(out_ref.at[pl.ds(0, m), cols], out, mask=real[:, None])

    first = 0
    for w_ref, b_ref, out_ref, n in zip(weights, biases, outs, programs):
        @pl.when((pid >= first) & (pid < first + n))
        def _(w_ref=w_ref, b_ref=b_ref, out_ref=out_ref, first=first):
            project(w_ref, b_ref, out_ref, pid - first)
        first += n


MIN_TILE = 16  # Triton's smallest dot operand dimension


def tokens_linear_fits(*output_sizes: int) -> bool:
    """Whether tokens_linear takes weights with these output counts (a multiple of 16)."""
    return all(n % MIN_TILE == 0 for n in output_sizes)


@functools.partial(jax.jit, static_argnames=("bn", "bk", "num_warps", "num_stages", "interpret"))
def tokens_linear(h, weights, biases, residual=None, *, bn: int = 32, bk: int = 128, num_warps: int = 4,
                  num_stages: int = 4, interpret: bool = False):
    """A few tokens through one or more linear layers in one kernel: h [n, K] (compute
    dtype), weights: tuple of [N_i, K], biases: tuple of [N_i] -> tuple of [n, N_i] =
    round(h @ W_i^T + b_i), as Attention.project; with residual [n, N] (one weight only):
    round(residual + that), as Attention.output plus the block's residual add. For 2-64
    tokens (the batched decode steps), where XLA's split-K GEMM and its separate bias,
    conversion and add kernels read the weights at about half the memory bandwidth.
    bn: outputs per program, lowered to a power of 2 (>= 16) that divides every N_i."""
    n, features = h.shape
    weights, biases = tuple(weights), tuple(biases)
    where = "tokens_linear"
    for w, b in zip(weights, biases, strict=True):
        if w.ndim != 2 or w.shape[1] != features or b.shape != (w.shape[0],):
            raise ValueError(f"{where}: h [{n}, {features}] needs weights [N, {features}] and biases [N]; "
                             f"got {w.shape} and {b.shape}")
    if not tokens_linear_fits(*(w.shape[0] for w in weights)):
        raise ValueError(f"{where}: output counts {[w.shape[0] for w in weights]} must be multiples of {MIN_TILE}")
    while any(w.shape[0] % bn for w in weights) or bn & (bn - 1):
        bn -= 1
    bn = max(bn, MIN_TILE)
    if residual is not None and (len(weights) != 1 or residual.shape != (n, weights[0].shape[0])):
        raise ValueError(f"{where}: a residual needs one weight and shape {(n, weights[0].shape[0])}, "
                         f"got {len(weights)} weights and shape {residual.shape}")
    m = max(MIN_TILE, next_power_of_2(n))  # rows past n are masked
    programs = tuple(w.shape[0] // bn for w in weights)
    precision = jax.lax.Precision.HIGHEST if h.dtype == F32 else jax.lax.Precision.DEFAULT
    kernel = functools.partial(_tokens_kernel, count=len(weights), programs=programs, tokens=n, m=m, bn=bn, bk=bk,
                               features=features, precision=precision, add_residual=residual is not None)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    args = (h, *weights, *biases) + (() if residual is None else (residual,))
    return tuple(pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n, w.shape[0]), h.dtype) for w in weights],
        grid=(sum(programs),),
        in_specs=[anywhere] * len(args),
        out_specs=[anywhere] * len(weights),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="tokens_linear",
    )(*args))
