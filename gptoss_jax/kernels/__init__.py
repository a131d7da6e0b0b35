"""Pallas kernels for gpt-oss (fused MXFP4 MoE, sink-aware decode attention). The XLA
reference path in gptoss_jax.model stays the default and is the oracle for every kernel test."""

from __future__ import annotations

IMPLEMENTATIONS = ("xla", "pallas")


def set_kernels(model, moe: str = "pallas", attention: str = "xla"):
    """Selects, in place, the implementation of the model's MoE experts and of its decode
    attention: "xla" (reference) or "pallas" (fused kernels). The attention kernel is
    correct but slower than XLA on an H100 so far (docs/performance.md), hence its default
    "xla". Returns the model."""
    for name, impl in (("moe", moe), ("attention", attention)):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"set_kernels: {name} must be one of {', '.join(IMPLEMENTATIONS)}, got '{impl}'")
    for block in model.blocks:
        block.mlp.kernels = moe
        block.attn.kernels = attention
    return model
