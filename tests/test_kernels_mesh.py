"""Every kernel on a mesh: the attention, projection, router and expert kernels run per
device under shard_map (heads over the model axis, experts over the expert axis, sequences
over the data axis) and greedy decoding gives the single device's tokens in fp32. The GPU
and TPU kernels run in Pallas interpret mode on the 8 host devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.config import GptOssConfig
from gptoss_jax.engine import generate
from gptoss_jax.kernels import Kernels, attention, attention_tpu, dispatch, flash, moe, moe_tpu, projection, router
from gptoss_jax.loader import random_model, shard_model
from gptoss_jax.sharding.mesh import make_mesh, parse_mesh_spec

# 8 query heads over 2 KV heads, 8 experts, 8 MXFP4 blocks of hidden units: the model axis
# of 2 splits the heads and the hidden units, the expert axis of 4 or 8 the experts.
CONFIG = GptOssConfig.preset("tiny").replace(
    name="mesh-kernels", num_hidden_layers=2, vocab_size=512, hidden_size=64, intermediate_size=256, head_dim=16,
    num_attention_heads=8, num_key_value_heads=2, num_experts=8, experts_per_token=4, sliding_window=8)
rng = np.random.default_rng(0)
PROMPTS = [[int(t) for t in rng.integers(0, CONFIG.vocab_size, n)] for n in (3, 11, 6)]
GPU = Kernels.choose("pallas", "cpu")
TPU = Kernels(moe_tpu=True, decode_attention_tpu=True, interpret=True)
SPIED = {"projection.norm_qkv": (projection, "norm_qkv"), "projection.tokens_linear": (projection, "tokens_linear"),
         "projection.output_residual": (projection, "output_residual"),
         "router.norm_router_logits": (router, "norm_router_logits"),
         "attention.decode_attention": (attention, "decode_attention"),
         "flash.prefill_attention": (flash, "prefill_attention"), "moe.experts_mix_decode": (moe, "experts_mix_decode"),
         "attention_tpu.decode_attention_tpu": (attention_tpu, "decode_attention_tpu"),
         "moe_tpu.experts_tpu": (moe_tpu, "experts_tpu"), "per_device": (dispatch, "per_device")}


@pytest.fixture(scope="module")
def single():
    return random_model(CONFIG, dtype=jnp.float32, seed=5, expert_scale_shift=1)


@functools.cache
def reference_tokens(batch: int):
    model = random_model(CONFIG, dtype=jnp.float32, seed=5, expert_scale_shift=1)
    return generate(model, PROMPTS[:batch], max_new_tokens=10, temperature=0, stop_tokens=[])


def spy_on_kernels(monkeypatch) -> set[str]:
    """The kernels the traced programs call (recorded as they are traced)."""
    called = set()
    for name, (module, attribute) in SPIED.items():
        real = getattr(module, attribute)
        monkeypatch.setattr(module, attribute,
                            lambda *a, _real=real, _name=name, **k: called.add(_name) or _real(*a, **k))
    return called


@pytest.mark.parametrize("kernels, spec, batch, expected", [
    (TPU, "4x2", 3, {"attention_tpu.decode_attention_tpu", "moe_tpu.experts_tpu"}),
    (TPU, "2x2x2", 3, {"attention_tpu.decode_attention_tpu", "moe_tpu.experts_tpu"}),
    # one sequence: the one-token projections, the output projection as fp32 partial sums
    # over the model axis, the router scoring each device's experts
    (GPU, "4x2", 1, {"projection.norm_qkv", "projection.output_residual", "projection.tokens_linear",
                     "router.norm_router_logits", "attention.decode_attention", "flash.prefill_attention",
                     "moe.experts_mix_decode"}),
    (GPU, "2x2x2", 3, {"projection.tokens_linear", "router.norm_router_logits", "attention.decode_attention",
                       "flash.prefill_attention", "moe.experts_mix_decode"}),
], ids=["tpu-4x2", "tpu-2x2x2", "gpu-4x2-one-sequence", "gpu-2x2x2"])
def test_kernels_on_a_mesh_give_the_single_device_tokens(single, monkeypatch, kernels, spec, batch, expected):
    want = reference_tokens(batch)
    called = spy_on_kernels(monkeypatch)
    mesh = make_mesh(spec, jax.devices()[:parse_mesh_spec(spec).size])
    model = shard_model(single, mesh).with_kernels(kernels)
    got = generate(model, PROMPTS[:batch], max_new_tokens=10, temperature=0, stop_tokens=[])
    assert got == want
    assert expected | {"per_device"} <= called, called


def test_kernels_are_chosen_alike_on_one_device_and_on_several():
    for platform in ("gpu", "tpu"):
        assert Kernels.choose("auto", platform, several_devices=True) == Kernels.choose("auto", platform)
