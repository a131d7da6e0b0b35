"""Pallas kernels for gpt-oss (fused MXFP4 MoE, sink-aware attention). The XLA reference
path in gptoss_jax.model stays the default and is the oracle for every kernel test."""

from __future__ import annotations

IMPLEMENTATIONS = ("xla", "pallas")


def set_kernels(model, impl: str):
    """Selects the implementation of the model's MoE (and attention) layers in place:
    "xla" (reference) or "pallas" (fused kernels). Returns the model."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"kernels must be one of {', '.join(IMPLEMENTATIONS)}, got '{impl}'")
    from gptoss_jax.model import MoE

    for block in model.blocks:
        for module in (block.mlp, block.attn):
            if isinstance(module, MoE) or hasattr(type(module), "kernels"):
                module.kernels = impl
    return model
