"""The kernel choice (gptoss_jax.kernels.dispatch) as tables: which kernels a choice gives on
each platform, and which implementation each rule picks for each size."""

import dataclasses

import jax
import pytest

from gptoss_jax.kernels import dispatch
from gptoss_jax.kernels.dispatch import Kernels

GPU = ("moe_gemv", "moe_gemm", "decode_attention", "prefill_attention", "projection", "router")


@pytest.mark.parametrize("choice, platform, several, names, interpret", [
    ("auto", "cpu", False, (), False),
    ("auto", "gpu", False, GPU, False),
    ("auto", "gpu", True, ("moe_gemv", "moe_gemm"), False),
    ("auto", "tpu", False, (), False),
    ("pallas", "cpu", False, GPU, True),
    ("pallas", "cpu", True, ("moe_gemv", "moe_gemm"), True),
    ("pallas", "gpu", False, GPU, False),
    ("pallas", "tpu", False, ("moe_tpu",), False),
    ("pallas", "tpu", True, ("moe_tpu",), False),
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
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1", chip_config_name="default",
                                               chips_per_host_bounds=(1, 1, 1), num_slices=1).devices
    except Exception as e:  # noqa: BLE001 - any failure here means no TPU compiler on this machine
        pytest.skip(f"libtpu (the TPU compiler) is not installed: {e}")
    assert Kernels.auto("pallas", devices=devices) == Kernels(moe_tpu=True)
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


@pytest.mark.parametrize("kernels, tokens, residual, want", [
    (ALL, 1, True, "output_residual"), (ALL, 1, False, "xla"), (ALL, 16, True, "xla"),
    (ALL, 17, True, "tokens_linear"), (ALL, 64, True, "tokens_linear"), (ALL, 65, True, "xla"),
    (NONE, 1, True, "xla"),
])
def test_output_rule(kernels, tokens, residual, want):
    assert dispatch.output_rule(kernels, tokens, 2880, residual) == want


@pytest.mark.parametrize("kernels, new_tokens, has_cache, want", [
    (ALL, 1, True, "decode_attention"), (ALL, 1, False, "xla"), (ALL, 2, True, "xla"), (NONE, 1, True, "xla"),
])
def test_cached_attention_rule(kernels, new_tokens, has_cache, want):
    assert dispatch.cached_attention_rule(kernels, new_tokens, has_cache) == want


@pytest.mark.parametrize("kernels, new_tokens, want", [
    (ALL, 1, "xla"), (ALL, 2, "prefill_attention"), (ALL, 8192, "prefill_attention"), (NONE, 8192, "xla"),
])
def test_attend_rule(kernels, new_tokens, want):
    assert dispatch.attend_rule(kernels, new_tokens) == want


@pytest.mark.parametrize("kernels, tokens, want", [
    (ALL, 1, "router"), (ALL, 64, "router"), (ALL, 65, "xla"), (NONE, 1, "xla"),
])
def test_router_rule(kernels, tokens, want):
    assert dispatch.router_rule(kernels, tokens) == want


@pytest.mark.parametrize("kernels, pairs, want", [
    (ALL, 4, "moe_gemv"), (ALL, 63, "moe_gemv"), (ALL, 64, "moe_gemm"), (ALL, 8192, "moe_gemm"),
    (ONLY_GEMV, 64, "moe_gemv"), (ONLY_GEMV, 512, "moe_gemv"), (ONLY_GEMV, 513, "xla"),
    (Kernels(moe_gemm=True), 4, "xla"), (Kernels(moe_gemm=True), 64, "moe_gemm"),
    (Kernels(moe_tpu=True), 4, "moe_tpu"), (Kernels(moe_tpu=True), 8192, "moe_tpu"),
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
