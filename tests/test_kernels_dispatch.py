"""The kernel choice (gptoss_jax.kernels.dispatch) as tables: which kernels a choice gives on
each platform, and which implementation each rule picks for each size."""

import dataclasses

import jax
import pytest
from jax.sharding import AbstractMesh

from gptoss_jax.kernels import dispatch, tpu_aot
from gptoss_jax.kernels.dispatch import Kernels

GPU = ("moe_gemv", "moe_gemm", "decode_attention", "prefill_attention", "projection", "router")


TPU = ("moe_tpu", "decode_attention_tpu")


@pytest.mark.parametrize("choice, platform, several, names, interpret", [
    ("auto", "cpu", False, (), False),
    ("auto", "gpu", False, GPU, False),
    ("auto", "gpu", True, GPU, False),  # on a mesh every kernel runs per device
    ("auto", "tpu", False, TPU, False),
    ("auto", "tpu", True, TPU, False),
    ("pallas", "cpu", False, GPU, True),
    ("pallas", "cpu", True, GPU, True),
    ("pallas", "gpu", False, GPU, False),
    ("pallas", "tpu", False, TPU, False),
    ("pallas", "tpu", True, TPU, False),
    ("xla", "gpu", False, (), False),
    ("xla", "tpu", True, (), False),
])
def test_choice_by_platform_and_device_count(choice, platform, several, names, interpret):
    kernels = Kernels.choose(choice, platform, several)
    assert kernels.names() == names and kernels.interpret == interpret


def test_choice_is_hashable_and_frozen():
    a, b = Kernels.choose("pallas", "gpu"), Kernels.choose("pallas", "gpu")
    assert a == b and hash(a) == hash(b) and a != Kernels.xla()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.router = False


def test_unknown_choice_and_mixed_platforms_are_refused():
    with pytest.raises(ValueError, match="kernels must be one of auto, pallas, xla"):
        Kernels.choose("cuda", "gpu")

    class Device:
        def __init__(self, platform):
            self.platform = platform

    with pytest.raises(ValueError, match="several platforms"):
        dispatch.target_platform([Device("cpu"), Device("tpu")])
    assert dispatch.target_platform([Device("cuda")]) == "gpu"


def test_auto_follows_the_target_devices_not_the_host():
    """Compiling for a TPU from this CPU host: the devices of the mesh decide."""
    pytest.importorskip("libtpu", reason="libtpu (the TPU compiler) is not installed")
    devices = tpu_aot.topology("v5e:1x1").devices
    assert Kernels.auto("pallas", devices=devices) == Kernels(moe_tpu=True, decode_attention_tpu=True)
    assert Kernels.auto("auto", devices=devices) == Kernels(moe_tpu=True, decode_attention_tpu=True)
    assert Kernels.auto("pallas", devices=jax.devices("cpu")[:1]).interpret


ALL = Kernels.choose("pallas", "gpu")
NONE = Kernels.xla()
ONLY_GEMV = dataclasses.replace(NONE, moe_gemv=True)


@pytest.mark.parametrize("kernels, tokens, want", [
    (ALL, 1, "norm_qkv"), (ALL, 2, "tokens_linear"), (ALL, 64, "tokens_linear"), (ALL, 65, "xla"),
    (NONE, 1, "xla"), (NONE, 8, "xla"),
])
def test_qkv_rule(kernels, tokens, want):
    assert dispatch.qkv_rule(kernels, tokens, (4096, 512)) == want


def test_qkv_rule_needs_sizes_the_tensor_core_kernel_takes():
    assert dispatch.qkv_rule(ALL, 8, (4096, 520)) == "xla"


@pytest.mark.parametrize("kernels, tokens, residual, heads_split, want", [
    (ALL, 1, True, False, "output_residual"), (ALL, 1, False, False, "xla"), (ALL, 16, True, False, "xla"),
    (ALL, 17, True, False, "tokens_linear"), (ALL, 64, True, False, "tokens_linear"), (ALL, 65, True, False, "xla"),
    (NONE, 1, True, False, "xla"),
    # heads split over the model axis: one token sums fp32 partial projections over it; the
    # few-token kernel rounds its output, so XLA takes those
    (ALL, 1, True, True, "output_residual"), (ALL, 17, True, True, "xla"),
])
def test_output_rule(kernels, tokens, residual, heads_split, want):
    assert dispatch.output_rule(kernels, tokens, 2880, residual, heads_split) == want


ON_TPU = Kernels.choose("auto", "tpu")


def on_mesh(kernels, spec):
    """The kernels partitioned over an (abstract) mesh of data x expert x model devices."""
    return kernels.on(AbstractMesh(spec, ("data", "expert", "model")))


@pytest.mark.parametrize("kernels, new_tokens, has_cache, heads, want", [
    (ALL, 1, True, (64, 8), "decode_attention"), (ALL, 1, False, (64, 8), "xla"), (ALL, 2, True, (64, 8), "xla"),
    (NONE, 1, True, (64, 8), "xla"),
    (ON_TPU, 1, True, (64, 8), "decode_attention_tpu"), (ON_TPU, 1, False, (64, 8), "xla"),
    (ON_TPU, 16, True, (64, 8), "xla"),
    # heads over the model axis: 8 KV heads split 2 ways run per device; 2 KV heads on a
    # 4-way model axis would be replicated while the query heads split, so XLA runs
    (on_mesh(ON_TPU, (1, 4, 2)), 1, True, (64, 8), "decode_attention_tpu"),
    (on_mesh(ALL, (1, 8, 1)), 1, True, (8, 2), "decode_attention"),
    (on_mesh(ALL, (1, 2, 4)), 1, True, (8, 2), "xla"),
    (on_mesh(ON_TPU, (2, 2, 2)), 1, True, (8, 2), "decode_attention_tpu"),
])
def test_cached_attention_rule(kernels, new_tokens, has_cache, heads, want):
    assert dispatch.cached_attention_rule(kernels, new_tokens, has_cache, heads) == want


@pytest.mark.parametrize("kernels, new_tokens, heads, want", [
    (ALL, 1, (64, 8), "xla"), (ALL, 2, (64, 8), "prefill_attention"), (ALL, 8192, (64, 8), "prefill_attention"),
    (NONE, 8192, (64, 8), "xla"), (ON_TPU, 8192, (64, 8), "xla"),
    (on_mesh(ALL, (1, 4, 2)), 64, (64, 8), "prefill_attention"), (on_mesh(ALL, (1, 1, 8)), 64, (8, 2), "xla"),
])
def test_attend_rule(kernels, new_tokens, heads, want):
    assert dispatch.attend_rule(kernels, new_tokens, heads) == want


@pytest.mark.parametrize("kernels, tokens, want", [
    (ALL, 1, "router"), (ALL, 64, "router"), (ALL, 65, "xla"), (NONE, 1, "xla"),
])
def test_router_rule(kernels, tokens, want):
    assert dispatch.router_rule(kernels, tokens) == want


@pytest.mark.parametrize("kernels, pairs, want", [
    (ALL, 4, "moe_gemv"), (ALL, 63, "moe_gemv"), (ALL, 64, "moe_gemm"), (ALL, 8192, "moe_gemm"),
    (ONLY_GEMV, 64, "moe_gemv"), (ONLY_GEMV, 512, "moe_gemv"), (ONLY_GEMV, 513, "xla"),
    (Kernels(moe_gemm=True), 4, "xla"), (Kernels(moe_gemm=True), 64, "moe_gemm"),
    (Kernels(moe_tpu=True), 4, "moe_tpu"), (Kernels(moe_tpu=True), 8192, "moe_tpu"),  # prefill: grouped tiles
    (NONE, 4, "xla"),
])
def test_experts_rule(kernels, pairs, want):
    assert dispatch.experts_rule(kernels, pairs) == want


@pytest.mark.parametrize("rule, args", [
    (dispatch.qkv_rule, (1, (4096, 512))), (dispatch.qkv_rule, (8, (4096, 512))),
    (dispatch.output_rule, (1, 2880, True)), (dispatch.output_rule, (32, 2880, True)),
    (dispatch.router_rule, (1,)), (dispatch.experts_rule, (4,)), (dispatch.experts_rule, (8192,)),
])
def test_an_op_with_a_fine_tuning_adapter_takes_the_xla_path(rule, args):
    """Only the XLA path applies LoRA adapters and expert adapters."""
    for kernels in (ALL, Kernels(moe_tpu=True)):
        assert rule(kernels, *args, adapted=True) == "xla"
    assert rule(ALL, *args, adapted=False) != "xla"


def test_attention_over_packed_documents_takes_the_xla_path():
    assert dispatch.attend_rule(ALL, 2048, segmented=True) == "xla"
    assert dispatch.attend_rule(ALL, 2048, segmented=False) == "prefill_attention"
