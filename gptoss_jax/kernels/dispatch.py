"""Which implementation runs each part of the model.

`Kernels` is one frozen value naming the kernels that may run. It is chosen once, from the
user's choice, the platform of the devices the program is compiled for (never the host's
backend: a CPU host compiling for a TPU gets the TPU kernels) and whether the model spans
several devices. The model holds it and passes it down; the rules below (pure functions of
`Kernels` and shapes) decide per call, and the `run_*` functions call the chosen kernel or
the model's XLA reference, which stays the oracle of every kernel test.

Adding a kernel: write its module in gptoss_jax/kernels/, add one field to `Kernels` (and
its name to `COMPILES_FOR` / `FASTER_THAN_XLA`), and one rule plus its call here.
docs/kernels.md walks through an example.
"""

from __future__ import annotations

import dataclasses

import jax

from gptoss_jax.kernels import attention, flash, moe, moe_gemm, moe_tpu, projection, router

CHOICES = ("auto", "pallas", "xla")

# Projections of 2-64 tokens (batched decode steps, short prompts) run in one tensor-core
# kernel: q/k/v at every such count, the output projection + residual add from 17 tokens,
# where it measured faster than XLA's GEMM and add (docs/performance-log.md entry 45).
PROJECTION_MAX_TOKENS = 64
OUTPUT_PROJECTION_MIN_TOKENS = 17
# Fewer (token, expert) pairs than GEMM_MIN_PAIRS run the grouped GEMV (each pair reads its
# expert's weights), more the grouped GEMM (one read per tile of pairs); with only the GEMV
# on, it takes up to GEMV_MAX_PAIRS pairs.
GEMM_MIN_PAIRS = 64
GEMV_MAX_PAIRS = 512
# The fused norm + router kernels run for up to this many tokens: each (token, router row)
# program reads its row from L2, which at 64 tokens still beats XLA's norm, padded router
# GEMM and sort-based top-k (docs/performance-log.md entry 44); prompts take XLA's GEMM.
ROUTER_MAX_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels that may run; each field names a module of gptoss_jax/kernels."""

    moe_gemv: bool = False  # moe.py: MXFP4 grouped GEMV + weighted sum of few (token, expert) pairs
    moe_gemm: bool = False  # moe_gemm.py: MXFP4 grouped GEMM of many pairs
    moe_tpu: bool = False  # moe_tpu.py: the MXFP4 expert kernel for TPU (Mosaic)
    decode_attention: bool = False  # attention.py: one-token attention with sinks, RoPE and the cache write
    prefill_attention: bool = False  # flash.py: flash attention with sinks over prompts
    projection: bool = False  # projection.py: RMSNorm + q/k/v and output projection + residual
    router: bool = False  # router.py: RMSNorm + router + top-k + softmax of few tokens
    interpret: bool = False  # run the Pallas kernels in interpret mode (CPU targets: tests)

    @classmethod
    def xla(cls) -> Kernels:
        """The XLA reference path everywhere."""
        return cls()

    @classmethod
    def choose(cls, choice: str, platform: str, several_devices: bool = False) -> Kernels:
        """`choice` "auto": the kernels that measured faster than XLA on `platform` (none on a
        CPU); "pallas": every kernel that compiles for `platform` (on a CPU the GPU kernels,
        in interpret mode); "xla": none. On several devices only the expert kernels run (they
        run per device inside the MoE's shard_map); the others are not partitioned yet."""
        if choice not in CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(CHOICES)}, got {choice!r}")
        table = FASTER_THAN_XLA if choice == "auto" else COMPILES_FOR if choice == "pallas" else {}
        names = table.get(platform, ())
        if several_devices:
            names = tuple(n for n in names if n in PER_DEVICE_KERNELS)
        return cls(**{n: True for n in names}, interpret=bool(names) and platform not in ("gpu", "tpu"))

    @classmethod
    def auto(cls, choice: str = "auto", *, mesh=None, devices=None) -> Kernels:
        """`choose` for the devices a program will run on: those of `mesh`, else `devices`,
        else JAX's default device (where a model without a mesh is placed)."""
        if mesh is not None:
            devices = list(mesh.devices.flat)
        devices = list(jax.devices()[:1] if devices is None else devices)
        return cls.choose(choice, target_platform(devices), several_devices=len(devices) > 1)

    def names(self) -> tuple[str, ...]:
        """The kernels that are on."""
        return tuple(f.name for f in dataclasses.fields(self) if f.name != "interpret" and getattr(self, f.name))


XLA = Kernels.xla()

# The kernels that compile for each platform (a CPU runs the GPU kernels in interpret mode),
# and those that measured faster than XLA there (docs/performance.md). On a TPU the expert
# kernel is not yet measured, so "auto" keeps the XLA path there.
GPU_KERNELS = ("moe_gemv", "moe_gemm", "decode_attention", "prefill_attention", "projection", "router")
COMPILES_FOR = {"gpu": GPU_KERNELS, "cpu": GPU_KERNELS, "tpu": ("moe_tpu",)}
FASTER_THAN_XLA = {"gpu": GPU_KERNELS}
PER_DEVICE_KERNELS = ("moe_gemv", "moe_gemm", "moe_tpu")


def target_platform(devices) -> str:
    """"gpu", "tpu" or "cpu": the platform of the devices (all of one kind)."""
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise ValueError(f"devices of several platforms ({', '.join(sorted(platforms))}); use devices of one kind")
    platform = platforms.pop()
    return "gpu" if platform in ("cuda", "rocm") else platform


# ------------------------------------------------------------------------------- rules
# `adapted`: the op carries a fine-tuning adapter (gptoss_jax.train), which only the XLA path
# applies; `segmented`: attention limited to segments of packed documents, likewise.
def qkv_rule(kernels: Kernels, tokens: int, output_sizes: tuple[int, ...], adapted: bool = False) -> str:
    """RMSNorm + q/k/v of `tokens` tokens (batch x sequence): "norm_qkv" (one token, one
    kernel), "tokens_linear" (2-64 tokens on tensor cores) or "xla"."""
    if not kernels.projection or adapted:
        return "xla"
    if tokens == 1:
        return "norm_qkv"
    if tokens <= PROJECTION_MAX_TOKENS and projection.tokens_linear_fits(*output_sizes):
        return "tokens_linear"
    return "xla"


def output_rule(kernels: Kernels, tokens: int, hidden_size: int, residual: bool, adapted: bool = False) -> str:
    """The output projection (+ the residual add when `residual`): "output_residual" (one
    token), "tokens_linear" (17-64 tokens) or "xla"."""
    if not (kernels.projection and residual) or adapted:
        return "xla"
    if tokens == 1:
        return "output_residual"
    if (OUTPUT_PROJECTION_MIN_TOKENS <= tokens <= PROJECTION_MAX_TOKENS
            and projection.tokens_linear_fits(hidden_size)):
        return "tokens_linear"
    return "xla"


def cached_attention_rule(kernels: Kernels, new_tokens: int, has_cache: bool) -> str:
    """Attention of new tokens against the cache: "decode_attention" (one new token per
    sequence: RoPE, attention and the cache write in one kernel) or "xla"."""
    return "decode_attention" if kernels.decode_attention and has_cache and new_tokens == 1 else "xla"


def attend_rule(kernels: Kernels, new_tokens: int, segmented: bool = False) -> str:
    """Attention over keys that already hold RoPE: "prefill_attention" (several new tokens)
    or "xla"."""
    return "prefill_attention" if kernels.prefill_attention and new_tokens > 1 and not segmented else "xla"


def router_rule(kernels: Kernels, tokens: int, adapted: bool = False) -> str:
    """RMSNorm + router + top-k + softmax: "router" (up to 64 tokens) or "xla"."""
    return "router" if kernels.router and tokens <= ROUTER_MAX_TOKENS and not adapted else "xla"


def experts_rule(kernels: Kernels, pairs: int, adapted: bool = False) -> str:
    """The experts of `pairs` (token, expert) pairs: "moe_tpu", "moe_gemv" (weighted sum and
    residual fused in), "moe_gemm" or "xla"."""
    if adapted:
        return "xla"
    if kernels.moe_tpu:
        return "moe_tpu"
    gemm = kernels.moe_gemm and pairs >= GEMM_MIN_PAIRS
    if kernels.moe_gemv and not gemm and pairs <= GEMV_MAX_PAIRS:
        return "moe_gemv"
    return "moe_gemm" if gemm else "xla"


# ------------------------------------------------------------------------------- calls
def run_norm_qkv(kernels: Kernels, x, norm, qkv_params, *, reference, adapted: bool = False):
    """q, k, v [b, t, heads, head_dim] of x [b, t, embed]; `norm` the RMSNorm module (its
    `scale`, `eps` and call), qkv_params = (wq, bq, wk, bk, wv, bv) as the model holds them.
    `reference(x)`: the XLA path."""
    b, t, d = x.shape
    wq, bq, wk, bk, wv, bv = qkv_params
    head_dim = wq.shape[1]
    rule = qkv_rule(kernels, b * t, (wq.shape[0] * head_dim, wk.shape[0] * head_dim), adapted)
    if rule == "norm_qkv":
        q, k, v = projection.norm_qkv(x[0, 0], norm.scale[...], *qkv_params, eps=norm.eps,
                                      interpret=kernels.interpret)
        return tuple(a[None, None] for a in (q, k, v))
    if rule == "tokens_linear":
        h = norm(x).reshape(b * t, d)
        outs = projection.tokens_linear(h, [w.reshape(-1, d) for w in (wq, wk, wv)],
                                        [bias.reshape(-1) for bias in (bq, bk, bv)], interpret=kernels.interpret)
        return tuple(a.reshape(b, t, -1, head_dim) for a in outs)
    return reference(x)


def run_output(kernels: Kernels, out, wo, bo, residual, *, reference, adapted: bool = False):
    """The output projection of the heads out [b, t, heads, head_dim] -> [b, t, embed], plus
    `residual` when given. `reference(out, residual)`: the XLA path."""
    b, t, heads, hd = out.shape
    d = wo.shape[0]
    rule = output_rule(kernels, b * t, d, residual is not None, adapted)
    if rule == "output_residual":
        added = projection.output_residual(out[0, 0], wo, bo, residual[0, 0], interpret=kernels.interpret)
        return added[None, None]
    if rule == "tokens_linear":
        [added] = projection.tokens_linear(out.reshape(b * t, heads * hd), [wo.reshape(d, -1)], [bo],
                                           residual.reshape(b * t, d), bk=256, interpret=kernels.interpret)
        return added.reshape(b, t, d)
    return reference(out, residual)


def run_cached_attention(kernels: Kernels, q, k, v, positions, cache, sinks, rope, window, *, reference):
    """Attention of the new tokens' q, k, v (before RoPE) against `cache`, and the cache
    with them written. `reference(q, k, v, positions, cache, rope)`: the XLA path."""
    if cached_attention_rule(kernels, q.shape[1], cache is not None) == "decode_attention":
        out, new_cache = attention.decode_attention(q, k, v, positions, *cache, sinks, rope, window=window,
                                                    write_cache=True, interpret=kernels.interpret)
        return out, type(cache)(*new_cache)
    return reference(q, k, v, positions, cache, rope)


def run_attend(kernels: Kernels, q, keys, values, q_positions, k_positions, sinks, window, *, reference,
               segmented: bool = False):
    """Softmax attention with sinks over keys that hold RoPE. `reference(q, keys, values,
    q_positions, k_positions)`: the XLA path."""
    if attend_rule(kernels, q.shape[1], segmented) == "prefill_attention":
        return flash.prefill_attention(q, keys, values, q_positions, k_positions, sinks, window=window,
                                       interpret=kernels.interpret)
    return reference(q, keys, values, q_positions, k_positions)


def run_norm_route(kernels: Kernels, x, norm, router_w, router_b, *, k: int, reference, adapted: bool = False):
    """(h, experts, weights) of tokens x [n, embed]; `norm` the RMSNorm module.
    `reference(x)`: the XLA path."""
    if router_rule(kernels, x.shape[0], adapted) == "router":
        return router.norm_route(x, norm.scale[...], router_w, router_b, eps=norm.eps, k=k,
                                 interpret=kernels.interpret)
    return reference(x)


def run_expert_mix(kernels: Kernels, h, experts, weights, w, residual, *, swiglu: tuple[float, float],
                   scales_fit_bf16: bool, reference, adapted: bool = False):
    """sum_k weights[n, k] * expert_{experts[n, k]}(h[n]) [n, embed] in fp32 (with
    `residual`: residual + that, rounded), `w` the (possibly per-device) ExpertWeights.
    `scales_fit_bf16`: every E8M0 scale of the layer is at most 128, so the grouped GEMM may
    decode FP4 straight to bf16. `reference(h, experts, weights, w, residual, outputs)`:
    the XLA weighted sum of `outputs(h, experts, w)` [n, k, embed] (None: XLA's)."""
    limit, alpha = swiglu
    rule = experts_rule(kernels, experts.size, adapted)
    if rule == "moe_gemv":
        return moe.experts_mix_decode(h, experts, *packed_experts(w), weights=weights, residual=residual, limit=limit,
                                      alpha=alpha, interpret=kernels.interpret)
    if rule == "moe_gemm":
        def outputs(h, experts, w):
            return moe_gemm.experts_grouped_kernel(h, experts, *packed_experts(w), limit=limit, alpha=alpha,
                                                   bf16_decode=scales_fit_bf16, interpret=kernels.interpret)
    elif rule == "moe_tpu":
        def outputs(h, experts, w):
            return moe_tpu.experts_tpu(h, experts, moe_tpu.tpu_experts(w), limit=limit, alpha=alpha,
                                       interpret=kernels.interpret)
    else:
        return reference(h, experts, weights, w, residual, None)

    return reference(h, experts, weights, w, residual, outputs)


def packed_experts(w):
    """The kernels' view of ExpertWeights: FP4 values as the checkpoint's packed bytes."""
    return (moe.packed_bytes(w.mlp1_fp4), w.mlp1_scales, w.mlp1_bias,
            moe.packed_bytes(w.mlp2_fp4), w.mlp2_scales, w.mlp2_bias)

