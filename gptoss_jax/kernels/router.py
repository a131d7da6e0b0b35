"""Fused MoE routing for decode steps (Pallas Triton): RMSNorm + router logits, then top-k +
softmax, in two kernels.

For one token XLA spends about seven small kernels per MoE layer on this (the norm's sum of
squares, the norm and the router dot, the normed activation, three for a sort-based top-k,
the softmax; docs/performance-log.md entry 20). Here:

- `norm_router_logits`: program (token, group) recomputes the token's RMSNorm (2880 values,
  from L1/L2) and produces `experts_per_program` router logits, round(h @ Wg^T + bg); the
  first program of each token also writes the normed h for the expert GEMVs. Spreading the
  router rows over programs keeps each program's reads small (one program reading all of
  Wg would be latency-bound on one SM).
- `top_k_softmax`: one program per token: the k largest logits (ties: the lower expert id
  first, as lax.top_k) and the softmax over them in fp32, rounded once.

Numerics as MoE.norm / MoE.route (docs/architecture.md 2.2 and 2.5, step 2-3). The fp32 sums run in another
order than XLA's, so h and the logits can differ from the reference by one bf16 ulp in rare
elements; a near-tie between two logits can then route differently, as two correct bf16
implementations can.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_jax.kernels.common import F32, next_power_of_2


def _norm_logits_kernel(x_ref, scale_ref, w_ref, b_ref, h_ref, logits_ref, *, features: int, width: int,
                        experts_per_program: int, num_experts: int, eps: float):
    token, group = pl.program_id(0), pl.program_id(1)
    cols = jnp.arange(width)
    inside = cols < features
    x = plgpu.load(x_ref.at[token, pl.ds(0, width)], mask=inside, other=0).astype(F32)
    gain = plgpu.load(scale_ref.at[pl.ds(0, width)], mask=inside, other=0).astype(F32)
    inv_rms = jax.lax.rsqrt(jnp.sum(x * x) / features + eps)
    h = (x * inv_rms * gain).astype(h_ref.dtype)  # docs/architecture.md 2.2: fp32, gain in fp32, one rounding

    @pl.when(group == 0)
    def _():
        plgpu.store(h_ref.at[token, pl.ds(0, width)], h, mask=inside)

    rows = group * experts_per_program + jnp.arange(experts_per_program)
    row_ok = rows < num_experts
    w = plgpu.load(w_ref.at[pl.ds(group * experts_per_program, experts_per_program), pl.ds(0, width)],
                   mask=row_ok[:, None] & inside[None, :], other=0)
    dot = jnp.sum(w.astype(F32) * h.astype(F32)[None, :], axis=1)
    bias = plgpu.load(b_ref.at[pl.ds(group * experts_per_program, experts_per_program)], mask=row_ok, other=0)
    logits = (dot + bias.astype(F32)).astype(logits_ref.dtype)  # docs/architecture.md 2.5 step 2: bf16 logits
    plgpu.store(logits_ref.at[token, pl.ds(group * experts_per_program, experts_per_program)], logits, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("eps", "experts_per_program", "num_warps", "interpret"))
def norm_router_logits(x, norm_scale, router_w, router_b, *, eps: float, experts_per_program: int = 1,
                       num_warps: int = 4, interpret: bool = False):
    """x [n, D] (the residual stream), norm_scale [D], router_w [E, D], router_b [E] ->
    (h [n, D] = RMSNorm(x), logits [n, E] = round(h @ router_w^T + router_b)), in x's dtype."""
    n, features = x.shape
    num_experts = router_w.shape[0]
    if router_w.shape[1] != features or norm_scale.shape != (features,) or router_b.shape != (num_experts,):
        raise ValueError(f"norm_router_logits: x [{n}, {features}] needs norm_scale [{features}], router_w "
                         f"[E, {features}] and router_b [E]; got {norm_scale.shape}, {router_w.shape}, "
                         f"{router_b.shape}")
    experts_per_program = min(experts_per_program, next_power_of_2(num_experts))
    if experts_per_program & (experts_per_program - 1):
        raise ValueError(f"norm_router_logits: experts_per_program={experts_per_program} must be a power of 2")
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_norm_logits_kernel, features=features, width=next_power_of_2(features),
                               experts_per_program=experts_per_program, num_experts=num_experts, eps=float(eps))
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n, features), x.dtype), jax.ShapeDtypeStruct((n, num_experts), x.dtype)],
        grid=(n, -(-num_experts // experts_per_program)),
        in_specs=[anywhere] * 4,
        out_specs=[anywhere] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="norm_router_logits",
    )(x, norm_scale, router_w, router_b)


def _top_k_kernel(logits_ref, experts_ref, weights_ref, *, num_experts: int, width: int, k: int, slots: int):
    token = pl.program_id(0)
    ids = jnp.arange(width)
    logits = plgpu.load(logits_ref.at[token, pl.ds(0, width)], mask=ids < num_experts, other=-jnp.inf).astype(F32)
    logits = jnp.where(ids < num_experts, logits, -jnp.inf)
    slot = jnp.arange(slots)  # k rounded up to a power of 2; the extra slots stay -inf
    chosen = jnp.zeros((slots,), jnp.int32)
    values = jnp.full((slots,), -jnp.inf, F32)
    for j in range(k):  # the largest remaining logit; among equal ones the lowest id
        best = jnp.max(logits)
        pick = jnp.min(jnp.where(logits == best, ids, width))
        chosen = jnp.where(slot == j, pick, chosen)
        values = jnp.where(slot == j, best, values)
        logits = jnp.where(ids == pick, -jnp.inf, logits)
    e = jnp.exp(values - jnp.max(values))  # docs/architecture.md 2.5 step 3: softmax over the k logits in fp32
    experts_ref[...] = chosen
    weights_ref[...] = (e / jnp.sum(e)).astype(weights_ref.dtype)


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def top_k_softmax(logits, *, k: int, interpret: bool = False):
    """logits [n, E] -> (experts [n, k] int32, descending by logit, weights [n, k] =
    softmax of those k logits in fp32, in logits' dtype)."""
    n, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k_softmax: k={k} must be in [1, {num_experts}] (the number of experts)")
    slots = next_power_of_2(k)
    block = pl.BlockSpec((None, slots), lambda t: (t, 0))
    experts, weights = pl.pallas_call(
        functools.partial(_top_k_kernel, num_experts=num_experts, width=next_power_of_2(num_experts), k=k, slots=slots),
        out_shape=[jax.ShapeDtypeStruct((n, slots), jnp.int32), jax.ShapeDtypeStruct((n, slots), logits.dtype)],
        grid=(n,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[block, block],
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="router_top_k_softmax",
    )(logits)
    return experts[:, :k], weights[:, :k]


def norm_route(x, norm_scale, router_w, router_b, *, eps: float, k: int, interpret: bool = False,
               **tuning):
    """MoE.norm + MoE.route for a few tokens: x [n, D] -> (h [n, D], experts [n, k],
    weights [n, k])."""
    h, logits = norm_router_logits(x, norm_scale, router_w, router_b, eps=eps, interpret=interpret, **tuning)
    experts, weights = top_k_softmax(logits, k=k, interpret=interpret)
    return h, experts, weights
