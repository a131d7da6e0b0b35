"""Which implementation runs each part of the model.

`Kernels` is one frozen value naming the kernels that may run. It is chosen once, from the
user's choice, the platform of the devices the program is compiled for (never the host's
backend: a CPU host compiling for a TPU gets the TPU kernels) and whether the model spans
several devices. The model holds it and passes it down; the rules below (pure functions of
`Kernels` and shapes) decide per call, and the `run_*` functions call the chosen kernel or
the model's XLA reference, which stays the oracle of every kernel test.

On a mesh of several devices every kernel runs per device under jax.shard_map
(gptoss_jax.sharding.per_device): attention heads over the model axis, experts over the
expert axis, sequences over the data axis. The model gives its mesh with the `Kernels`
value it passes down (`Kernels.on`).

Adding a kernel: write its module in gptoss_jax/kernels/, add one field to `Kernels` (and
its name to `COMPILES_FOR` / `AUTO`), and one rule plus its call here.
docs/kernels.md walks through an example.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gptoss_jax.kernels import attention, attention_tpu, flash, moe, moe_gemm, moe_tpu, projection, router
from gptoss_jax.kernels.common import F32, ExpertWeights
from gptoss_jax.sharding.per_device import heads_split_evenly, per_device, splits
from gptoss_jax.sharding.rules import EXPERT, MODEL, partition_spec

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
    moe_tpu: bool = False  # moe_tpu.py: the MXFP4 expert kernel for TPU (Mosaic), every token count
    decode_attention: bool = False  # attention.py: one-token attention with sinks, RoPE and the cache write
    decode_attention_tpu: bool = False  # attention_tpu.py: one-token attention with sinks for TPU (Mosaic)
    prefill_attention: bool = False  # flash.py: flash attention with sinks over prompts
    projection: bool = False  # projection.py: RMSNorm + q/k/v and output projection + residual
    router: bool = False  # router.py: RMSNorm + router + top-k + softmax of few tokens
    interpret: bool = False  # run the Pallas kernels in interpret mode (CPU targets: tests)
    # The mesh the kernels are partitioned over (None: one device). The model sets it from
    # its own mesh (`on`) when it passes the value down.
    mesh: Mesh | None = None

    @classmethod
    def xla(cls) -> Kernels:
        """The XLA reference path everywhere."""
        return cls()

    @classmethod
    def choose(cls, choice: str, platform: str, several_devices: bool = False) -> Kernels:
        """`choice` "auto": the kernels chosen for `platform` (`AUTO`: none on a CPU);
        "pallas": every kernel that compiles for `platform` (on a CPU the GPU kernels, in
        interpret mode); "xla": none. The same on one device as on several: on a mesh each
        kernel runs per device (`several_devices` is kept for callers that pass it)."""
        del several_devices
        if choice not in CHOICES:
            raise ValueError(f"kernels must be one of {', '.join(CHOICES)}, got {choice!r}")
        table = AUTO if choice == "auto" else COMPILES_FOR if choice == "pallas" else {}
        names = table.get(platform, ())
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
        return tuple(f.name for f in dataclasses.fields(self)
                     if f.name not in ("interpret", "mesh") and getattr(self, f.name))

    def on(self, mesh: Mesh | None) -> Kernels:
        """The same choice, partitioned over `mesh` (None: one device)."""
        return self if mesh is self.mesh else dataclasses.replace(self, mesh=mesh)


XLA = Kernels.xla()

# The kernels that compile for each platform (a CPU runs the GPU kernels in interpret mode),
# and those "auto" picks. On a GPU: the kernels that measured faster than XLA
# (docs/performance.md). On a TPU: the expert and decode attention kernels, chosen from the
# compiled programs (docs/tpu.md: XLA's expert path converts and copies every layer's whole
# experts each step, about 24 times the bytes a step must read); not yet timed on a TPU.
GPU_KERNELS = ("moe_gemv", "moe_gemm", "decode_attention", "prefill_attention", "projection", "router")
TPU_KERNELS = ("moe_tpu", "decode_attention_tpu")
COMPILES_FOR = {"gpu": GPU_KERNELS, "cpu": GPU_KERNELS, "tpu": TPU_KERNELS}
AUTO = {"gpu": GPU_KERNELS, "tpu": TPU_KERNELS}

# Logical axes (gptoss_jax.sharding.rules) of what the kernels take, as the model holds it:
# they split each kernel's inputs over a mesh as the parameters and the cache are split.
TOKEN_AXES = ("batch", "seq", "embed")
ROWS_AXES = ("batch", "embed")  # tokens flattened to rows
Q_AXES = ("batch", "seq", "q_heads", "head_dim")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")
POSITION_AXES = ("batch", "seq")
ROPE_AXES = ("batch", "seq", None)
QKV_PARAM_AXES = (("q_heads", "head_dim", "embed"), ("q_heads", "head_dim"),
                  ("kv_heads", "head_dim", "embed"), ("kv_heads", "head_dim"),
                  ("kv_heads", "head_dim", "embed"), ("kv_heads", "head_dim"))
WO_AXES = ("embed", "q_heads", "head_dim")
SINK_AXES = ("q_heads",)
ROUTER_AXES = (("norm",), ("experts", "embed"), ("experts",))


def target_platform(devices) -> str:
    """"gpu", "tpu" or "cpu": the platform of the devices (all of one kind)."""
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise ValueError(f"devices of several platforms ({', '.join(sorted(platforms))}); use devices of one kind")
    platform = platforms.pop()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _partitioned(kernels: Kernels) -> bool:
    return kernels.mesh is not None and kernels.mesh.size > 1


def _run(kernels: Kernels, fn, args, in_axes, outputs):
    """fn(*args), per device on the kernels' mesh (`outputs`: (axes, global shape) each)."""
    if not _partitioned(kernels):
        return fn(*args)
    return per_device(kernels.mesh, fn, args, in_axes, outputs)


def _local(kernels: Kernels, axes, shape) -> tuple[int, ...]:
    """The shape of one device's shard of an array on the kernels' mesh."""
    if not _partitioned(kernels):
        return tuple(shape)
    spec = partition_spec(axes, shape, kernels.mesh)
    return tuple(n // (1 if a is None else kernels.mesh.shape[a]) for n, a in zip(shape, spec))


# ------------------------------------------------------------------------------- rules
# `adapted`: the op carries a fine-tuning adapter (gptoss_jax.train), which only the XLA path
# applies; `segmented`: attention limited to segments of packed documents, likewise.
def qkv_rule(kernels: Kernels, tokens: int, output_sizes: tuple[int, ...], adapted: bool = False) -> str:
    """RMSNorm + q/k/v of `tokens` tokens (batch x sequence): "norm_qkv" (one token, one
    kernel), "tokens_linear" (2-64 tokens on tensor cores) or "xla". `output_sizes`: the
    q and k/v widths one device computes."""
    if not kernels.projection or adapted:
        return "xla"
    if tokens == 1:
        return "norm_qkv"
    if tokens <= PROJECTION_MAX_TOKENS and projection.tokens_linear_fits(*output_sizes):
        return "tokens_linear"
    return "xla"


def output_rule(kernels: Kernels, tokens: int, hidden_size: int, residual: bool, heads_split: bool = False,
                adapted: bool = False) -> str:
    """The output projection (+ the residual add when `residual`): "output_residual" (one
    token), "tokens_linear" (17-64 tokens, on a mesh only when the heads are not split:
    it rounds its output, so it cannot give partial sums over the heads) or "xla"."""
    if not (kernels.projection and residual) or adapted:
        return "xla"
    if tokens == 1:
        return "output_residual"
    if (OUTPUT_PROJECTION_MIN_TOKENS <= tokens <= PROJECTION_MAX_TOKENS and not heads_split
            and projection.tokens_linear_fits(hidden_size)):
        return "tokens_linear"
    return "xla"


def cached_attention_rule(kernels: Kernels, new_tokens: int, has_cache: bool, heads: tuple[int, int] = (1, 1)) -> str:
    """Attention of new tokens against the cache: "decode_attention" (one new token per
    sequence: RoPE, attention and the cache write in one kernel), "decode_attention_tpu"
    (one new token; RoPE and the cache write in XLA) or "xla". `heads`: (query heads, KV
    heads); on a mesh whose model axis does not split them evenly the XLA path runs."""
    if not (has_cache and new_tokens == 1 and heads_split_evenly(kernels.mesh, *heads)):
        return "xla"
    if kernels.decode_attention_tpu:
        return "decode_attention_tpu"
    return "decode_attention" if kernels.decode_attention else "xla"


def attend_rule(kernels: Kernels, new_tokens: int, heads: tuple[int, int] = (1, 1), segmented: bool = False) -> str:
    """Attention over keys that already hold RoPE: "prefill_attention" (several new tokens)
    or "xla"."""
    if (kernels.prefill_attention and new_tokens > 1 and not segmented
            and heads_split_evenly(kernels.mesh, *heads)):
        return "prefill_attention"
    return "xla"


def router_rule(kernels: Kernels, tokens: int, adapted: bool = False) -> str:
    """RMSNorm + router + top-k + softmax: "router" (up to 64 tokens) or "xla"."""
    return "router" if kernels.router and tokens <= ROUTER_MAX_TOKENS and not adapted else "xla"


def experts_rule(kernels: Kernels, pairs: int, adapted: bool = False) -> str:
    """The experts of `pairs` (token, expert) pairs: "moe_tpu" (every count: decode steps
    and prompts), "moe_gemv" (weighted sum and residual fused in), "moe_gemm" or "xla"."""
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
    q_heads, kv_heads = (_local(kernels, axes[:1], w.shape[:1])[0] for axes, w in
                         ((QKV_PARAM_AXES[0], wq), (QKV_PARAM_AXES[2], wk)))
    rule = qkv_rule(kernels, b * t, (q_heads * head_dim, kv_heads * head_dim), adapted)
    outputs = [(Q_AXES, (b, t, *wq.shape[:2])), (KV_AXES, (b, t, *wk.shape[:2])), (KV_AXES, (b, t, *wv.shape[:2]))]
    if rule == "norm_qkv":
        def one_token(x, scale, *params):
            q, k, v = projection.norm_qkv(x[0, 0], scale, *params, eps=norm.eps, interpret=kernels.interpret)
            return tuple(a[None, None] for a in (q, k, v))

        return _run(kernels, one_token, (x, norm.scale[...], *qkv_params), (TOKEN_AXES, ("norm",), *QKV_PARAM_AXES),
                    outputs)
    if rule == "tokens_linear":
        def few_tokens(h, *params):
            weights, biases = params[0::2], params[1::2]
            outs = projection.tokens_linear(h.reshape(-1, d), [w.reshape(-1, d) for w in weights],
                                            [bias.reshape(-1) for bias in biases], interpret=kernels.interpret)
            return tuple(a.reshape(*h.shape[:2], -1, head_dim) for a in outs)

        return _run(kernels, few_tokens, (norm(x), *qkv_params), (TOKEN_AXES, *QKV_PARAM_AXES), outputs)
    return reference(x)


def run_output(kernels: Kernels, out, wo, bo, residual, *, reference, adapted: bool = False):
    """The output projection of the heads out [b, t, heads, head_dim] -> [b, t, embed], plus
    `residual` when given. `reference(out, residual)`: the XLA path."""
    b, t, heads, hd = out.shape
    d = wo.shape[0]
    heads_split = splits(kernels.mesh, SINK_AXES, (heads,)) if _partitioned(kernels) else False
    rule = output_rule(kernels, b * t, d, residual is not None, heads_split, adapted)
    if rule == "output_residual" and heads_split:
        # Each device projects its heads: fp32 partial sums (zero bias and residual in
        # fp32: the kernel rounds to the residual's dtype), summed over the model axis;
        # then the bias, the rounding and the residual add as Attention.output.
        def partial(out, wo):
            zeros = jnp.zeros((d,), F32)
            part = projection.output_residual(out[0, 0], wo, zeros, zeros, interpret=kernels.interpret)
            return jax.lax.psum(part, MODEL)

        summed = per_device(kernels.mesh, partial, (out, wo), (Q_AXES, WO_AXES), [(("embed",), (d,))])
        return residual + (summed + bo.astype(F32)).astype(out.dtype)[None, None]
    if rule == "output_residual":
        def one_token(out, wo, bo, residual):
            return projection.output_residual(out[0, 0], wo, bo, residual[0, 0], interpret=kernels.interpret)[None, None]

        return _run(kernels, one_token, (out, wo, bo, residual), (Q_AXES, WO_AXES, ("embed",), TOKEN_AXES),
                    [(TOKEN_AXES, residual.shape)])
    if rule == "tokens_linear":
        def few_tokens(out, wo, bo, residual):
            n = out.shape[0] * out.shape[1]
            [added] = projection.tokens_linear(out.reshape(n, -1), [wo.reshape(d, -1)], [bo], residual.reshape(n, d),
                                               bk=256, interpret=kernels.interpret)
            return added.reshape(residual.shape)

        return _run(kernels, few_tokens, (out, wo, bo, residual), (Q_AXES, WO_AXES, ("embed",), TOKEN_AXES),
                    [(TOKEN_AXES, residual.shape)])
    return reference(out, residual)


def run_cached_attention(kernels: Kernels, q, k, v, positions, cache, sinks, rope, window, *, reference, apply_rope,
                         write_cache):
    """Attention of the new tokens' q, k, v (before RoPE) against `cache`, and the cache
    with them written. `reference(q, k, v, positions, cache, rope)`: the XLA path;
    `apply_rope(x, cos, sin)` and `write_cache(cache, k, v, positions)`: the model's, for
    kernels that leave RoPE and the cache write to XLA."""
    rule = cached_attention_rule(kernels, q.shape[1], cache is not None, (q.shape[2], k.shape[2]))
    cache_axes = (KV_AXES, KV_AXES, POSITION_AXES)
    if rule == "decode_attention":
        def step(q, k, v, positions, cache_k, cache_v, cache_positions, sinks, cos, sin):
            out, new_cache = attention.decode_attention(q, k, v, positions, cache_k, cache_v, cache_positions, sinks,
                                                        (cos, sin), window=window, write_cache=True,
                                                        interpret=kernels.interpret)
            return (out, *new_cache)

        out, *new_cache = _run(kernels, step, (q, k, v, positions, *cache, sinks, *rope),
                               (Q_AXES, KV_AXES, KV_AXES, POSITION_AXES, *cache_axes, SINK_AXES, ROPE_AXES, ROPE_AXES),
                               [(Q_AXES, q.shape), *zip(cache_axes, (a.shape for a in cache))])
        return out, type(cache)(*new_cache)
    if rule == "decode_attention_tpu":
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        def step(*args):
            return attention_tpu.decode_attention_tpu(*args, window=window, interpret=kernels.interpret)

        out = _run(kernels, step, (q, k, v, positions, *cache, sinks),
                   (Q_AXES, KV_AXES, KV_AXES, POSITION_AXES, *cache_axes, SINK_AXES), [(Q_AXES, q.shape)])
        return out, write_cache(cache, k, v, positions)
    return reference(q, k, v, positions, cache, rope)


def run_attend(kernels: Kernels, q, keys, values, q_positions, k_positions, sinks, window, *, reference,
               segmented: bool = False):
    """Softmax attention with sinks over keys that hold RoPE. `reference(q, keys, values,
    q_positions, k_positions)`: the XLA path."""
    if attend_rule(kernels, q.shape[1], (q.shape[2], keys.shape[2]), segmented) == "prefill_attention":
        def attend(*args):
            return flash.prefill_attention(*args, window=window, interpret=kernels.interpret)

        return _run(kernels, attend, (q, keys, values, q_positions, k_positions, sinks),
                    (Q_AXES, KV_AXES, KV_AXES, POSITION_AXES, POSITION_AXES, SINK_AXES), [(Q_AXES, q.shape)])
    return reference(q, keys, values, q_positions, k_positions)


def run_norm_route(kernels: Kernels, x, norm, router_w, router_b, *, k: int, reference, adapted: bool = False):
    """(h, experts, weights) of tokens x [n, embed]; `norm` the RMSNorm module.
    `reference(x)`: the XLA path."""
    if router_rule(kernels, x.shape[0], adapted) != "router":
        return reference(x)
    experts_split = splits(kernels.mesh, ROUTER_AXES[2], router_b.shape) if _partitioned(kernels) else False

    def route(x, scale, router_w, router_b):
        # On a mesh each device scores its own experts; the scores of all experts, gathered
        # over the expert axis, pick the top k on every device.
        h, logits = router.norm_router_logits(x, scale, router_w, router_b, eps=norm.eps, interpret=kernels.interpret)
        if experts_split:
            logits = jax.lax.all_gather(logits, EXPERT, axis=1, tiled=True)
        return (h, *router.top_k_softmax(logits, k=k, interpret=kernels.interpret))

    n = x.shape[0]
    return _run(kernels, route, (x, norm.scale[...], router_w, router_b), (ROWS_AXES, *ROUTER_AXES),
                [(ROWS_AXES, x.shape), (("batch", None), (n, k)), (("batch", None), (n, k))])


def run_expert_mix(kernels: Kernels, h, experts, weights, w, residual, *, swiglu: tuple[float, float],
                   scales_fit_bf16: bool, reference, adapted: bool = False):
    """sum_k weights[n, k] * expert_{experts[n, k]}(h[n]) [n, embed] in fp32 (with
    `residual`: residual + that, rounded), `w` the (possibly per-device) experts: the
    model's ExpertWeights, or moe_tpu.TpuExperts when the model stores them for the TPU
    kernel (read in place by it; re-laid out per call for the other paths, which only
    tests compare). `scales_fit_bf16`: every E8M0 scale of the layer is at most 128, so
    the grouped GEMM may decode FP4 straight to bf16. `reference(h, experts, weights, w,
    residual, outputs)`: the XLA weighted sum of `outputs(h, experts, w)` [n, k, embed]
    (None: XLA's, which re-lays out TpuExperts itself)."""
    limit, alpha = swiglu
    rule = experts_rule(kernels, experts.size, adapted)
    if rule == "moe_tpu":
        # The model stores the experts as TpuExperts whenever its kernels include moe_tpu;
        # other ExpertWeights (set_kernels on a loaded model) are converted on every call.
        tpu = w if isinstance(w, moe_tpu.TpuExperts) else moe_tpu.tpu_experts(w)

        def outputs(h, experts, w):
            return moe_tpu.experts_tpu(h, experts, w, limit=limit, alpha=alpha, interpret=kernels.interpret)

        return reference(h, experts, weights, tpu, residual, outputs)
    if rule == "xla":
        return reference(h, experts, weights, w, residual, None)
    w = standard_view(w)
    if rule == "moe_gemv":
        return moe.experts_mix_decode(h, experts, *packed_experts(w), weights=weights, residual=residual, limit=limit,
                                      alpha=alpha, interpret=kernels.interpret)

    def outputs(h, experts, w):
        return moe_gemm.experts_grouped_kernel(h, experts, *packed_experts(w), limit=limit, alpha=alpha,
                                               bf16_decode=scales_fit_bf16, interpret=kernels.interpret)

    return reference(h, experts, weights, w, residual, outputs)


def standard_view(w) -> ExpertWeights:
    """ExpertWeights of `w` (TpuExperts are re-laid out)."""
    return moe_tpu.expert_weights_of(w) if isinstance(w, moe_tpu.TpuExperts) else w


def packed_experts(w):
    """The kernels' view of ExpertWeights: FP4 values as the checkpoint's packed bytes."""
    return (moe.packed_bytes(w.mlp1_fp4), w.mlp1_scales, w.mlp1_bias,
            moe.packed_bytes(w.mlp2_fp4), w.mlp2_scales, w.mlp2_bias)
