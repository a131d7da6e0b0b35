"""Pallas kernels for gpt-oss: fused MXFP4 MoE (grouped GEMV for decode, grouped GEMM for
batches and prompts), sink-aware decode and prefill attention, the fused RMSNorm + q/k/v and
output projection + residual of one-token steps (tensor-core projections for 2-64 tokens)
and the fused RMSNorm + router + top-k of decode steps. They lower to Triton (GPUs); the
TPU expert and decode attention kernels (kernels/moe_tpu.py, kernels/attention_tpu.py)
to Mosaic TPU. On a CPU they run in Pallas interpret
mode (tests only: slow). The XLA reference path in gptoss_jax.model stays available and is
the oracle of every kernel test.

Which kernels run is one value, `Kernels` (kernels/dispatch.py), held by the model:
`gptoss_jax.load(path, kernels="auto")` chooses it for the devices the model is placed on,
and `model.with_kernels(Kernels(...))` gives the same model running others.
"""

from __future__ import annotations

from gptoss_jax.kernels.dispatch import CHOICES, Kernels, target_platform

# set_kernels' names, each a field of Kernels; "moe" is the grouped GEMV on GPUs and the
# expert kernel on TPUs, "decode_attention" the GPU or the TPU decode attention kernel.
KERNELS = ("moe", "moe_gemm", "decode_attention", "prefill_attention", "projection", "router")
IMPLEMENTATIONS = ("xla", "pallas")

__all__ = ["CHOICES", "KERNELS", "Kernels", "kernels_in_use", "set_kernels"]


def set_kernels(model, moe: str | None = None, attention: str | None = None, *, moe_gemm: str | None = None,
                decode_attention: str | None = None, prefill_attention: str | None = None,
                projection: str | None = None, router: str | None = None):
    """Sets model.kernels from "xla" / "pallas" per kernel and returns the model. Without any
    name it sets `Kernels.auto("pallas")` for the devices the model is on; a name left out
    keeps the model's current choice. Prefer `model.with_kernels(Kernels(...))`, which leaves
    this model as it is."""
    decode_attention = attention if decode_attention is None else decode_attention
    prefill_attention = attention if prefill_attention is None else prefill_attention
    chosen = {"moe": moe, "moe_gemm": moe_gemm, "decode_attention": decode_attention,
              "prefill_attention": prefill_attention, "projection": projection, "router": router}
    for name, impl in chosen.items():
        if impl is not None and impl not in IMPLEMENTATIONS:
            shown = "attention" if name.endswith("_attention") and attention == impl else name
            raise ValueError(f"set_kernels: {shown} must be one of {', '.join(IMPLEMENTATIONS)}, got '{impl}'")
    if all(impl is None for impl in chosen.values()):
        model.kernels = Kernels.auto("pallas", mesh=model.mesh)
        return model
    current = model.kernels
    on_tpu = _platform(model) == "tpu"
    # On a TPU "moe" and "decode_attention" name the TPU kernels.
    field_of = {"moe": "moe_tpu" if on_tpu else "moe_gemv",
                "decode_attention": "decode_attention_tpu" if on_tpu else "decode_attention"}
    fields = {field_of.get(name, name): getattr(current, field_of.get(name, name)) for name in chosen}
    fields.update({field_of.get(name, name): impl == "pallas" for name, impl in chosen.items() if impl is not None})
    model.kernels = Kernels(**fields, interpret=_platform(model) == "cpu")
    return model


def kernels_in_use(model) -> dict:
    """{kernel: "xla" | "pallas"} for set_kernels' names."""
    k = model.kernels
    on = {"moe": k.moe_gemv or k.moe_tpu, "moe_gemm": k.moe_gemm,
          "decode_attention": k.decode_attention or k.decode_attention_tpu,
          "prefill_attention": k.prefill_attention, "projection": k.projection, "router": k.router}
    return {name: "pallas" if value else "xla" for name, value in on.items()}


def _platform(model) -> str:
    mesh = model.mesh
    return target_platform(mesh.devices.flat if mesh is not None else [model.embedding[...].devices().pop()])
