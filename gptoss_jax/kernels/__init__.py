"""Pallas kernels for gpt-oss: fused MXFP4 MoE (grouped GEMV for decode, grouped GEMM for
batches and prompts), sink-aware decode and prefill attention, the fused RMSNorm + q/k/v and
output projection + residual of one-token steps (tensor-core projections for 2-64 tokens)
and the fused RMSNorm + router + top-k of decode steps. The XLA reference path in
gptoss_jax.model stays available and is the oracle for every kernel test. The kernels lower
to Triton (GPUs); the MoE kernel also to Mosaic TPU (kernels/moe_tpu.py, checked in
interpret mode and by lowering, not yet run on a TPU); on the CPU they run in Pallas
interpret mode (tests only: slow)."""

from __future__ import annotations

IMPLEMENTATIONS = ("xla", "pallas")
KERNELS = ("moe", "moe_gemm", "decode_attention", "prefill_attention", "projection", "router")
# What set_kernels(model) selects: each kernel that measured faster than XLA on an H100
# (docs/performance.md).
FASTEST = {"moe": "pallas", "moe_gemm": "pallas", "decode_attention": "pallas", "prefill_attention": "pallas",
           "projection": "pallas", "router": "pallas"}


def set_kernels(model, moe: str | None = None, attention: str | None = None, *, moe_gemm: str | None = None,
                decode_attention: str | None = None, prefill_attention: str | None = None,
                projection: str | None = None, router: str | None = None):
    """Selects, in place, "xla" (reference) or "pallas" for each kernel of the model: moe
    (grouped GEMV, few pairs), moe_gemm (grouped GEMM, many pairs), decode_attention,
    prefill_attention, projection (RMSNorm + q/k/v, and output projection + residual, of
    one token; the projections of 2-64 tokens on tensor cores), router (RMSNorm + router +
    top-k + softmax of up to 64 tokens). With moe_gemm "pallas" it also checks each layer's
    expert scales for the GEMM's bf16 decode (moe_gemm.bf16_decode_exact).
    `attention` sets both attention kernels; a kernel left unnamed gets FASTEST's choice
    when no kernel is named at all, and is left as it is otherwise. Returns the model."""
    chosen = {"moe": moe, "moe_gemm": moe_gemm, "decode_attention": decode_attention if decode_attention is not None else attention,
              "prefill_attention": prefill_attention if prefill_attention is not None else attention,
              "projection": projection, "router": router}
    if all(v is None for v in chosen.values()):
        chosen = dict(FASTEST)
    for name, impl in chosen.items():
        if impl is not None and impl not in IMPLEMENTATIONS:
            shown = "attention" if name.endswith("_attention") and attention == impl else name
            raise ValueError(f"set_kernels: {shown} must be one of {', '.join(IMPLEMENTATIONS)}, got '{impl}'")
    for block in model.blocks:
        if chosen["moe"] is not None:
            block.mlp.kernels = chosen["moe"]
        if chosen["moe_gemm"] is not None:
            block.mlp.gemm_kernel = chosen["moe_gemm"]
            block.mlp.gemm_bf16_decode = chosen["moe_gemm"] == "pallas" and _bf16_decode_exact(block.mlp)
        if chosen["router"] is not None:
            block.mlp.router_kernel = chosen["router"]
        for name in ("decode_attention", "prefill_attention", "projection"):
            if chosen[name] is not None:
                setattr(block.attn, f"{name}_kernel", chosen[name])
    return model


def _bf16_decode_exact(mlp) -> bool:
    """Whether the layer's expert scales allow the grouped GEMM's bf16 decode (all <= 128);
    False when they are not concrete (set_kernels called under a trace)."""
    import jax

    from gptoss_jax.kernels import moe_gemm

    try:
        return moe_gemm.bf16_decode_exact(mlp.mlp1_scales[...], mlp.mlp2_scales[...])
    except jax.errors.ConcretizationTypeError:
        return False


def kernels_in_use(model) -> dict:
    """{kernel: "xla" | "pallas"} as set on the model's first block."""
    block = model.blocks[0]
    return {"moe": block.mlp.kernels, "moe_gemm": block.mlp.gemm_kernel, "router": block.mlp.router_kernel, **{n: getattr(block.attn, f"{n}_kernel")
                                         for n in ("decode_attention", "prefill_attention", "projection")}}
