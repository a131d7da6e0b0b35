"""The TPU MXFP4 expert kernel (gptoss_jax.kernels.moe_tpu) against the model's XLA expert
paths (MoE.experts_gathered / experts_grouped), in Pallas interpret mode on the CPU, plus
its Mosaic TPU lowering at the gpt-oss-20b shapes. The lowering runs here; Mosaic's own
compiler and the kernel's speed need a TPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_kernels_moe_gemm import random_experts

from gptoss_jax import model as model_lib
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels import moe as moe_kernels
from gptoss_jax.kernels import moe_tpu


def make_moe(num_experts, embed, hidden, dtype, seed):
    """A MoE layer of a small config with random FP4 experts (every code) and a clamp that
    bites: limit 2 on pre-activations of scale ~10."""
    config = dataclasses.replace(GptOssConfig.preset("tiny"), num_experts=num_experts, hidden_size=embed,
                                 intermediate_size=hidden, swiglu_limit=2.0)
    mlp = model_lib.MoE(config, dtype)
    w = random_experts(np.random.default_rng(seed), num_experts, embed, hidden, dtype)
    for name, value in zip(model_lib.ExpertWeights._fields, w):
        getattr(mlp, name)[...] = value
    return mlp


def run_tpu(mlp, h, experts, **tuning):
    w, c = mlp.expert_weights(), mlp.config
    return moe_tpu.experts_tpu(
        h, experts, moe_kernels.packed_bytes(w.mlp1_fp4), w.mlp1_scales, w.mlp1_bias,
        moe_kernels.packed_bytes(w.mlp2_fp4), w.mlp2_scales, w.mlp2_bias, limit=c.swiglu_limit,
        alpha=c.swiglu_alpha, interpret=True, **tuning)


def reference(mlp, h, experts):
    """experts_gathered with unknown ids zeroed (as expert_mix does)."""
    known = (experts >= 0) & (experts < mlp.config.num_experts)
    y = mlp.experts_gathered(h, jnp.where(known, experts, 0))
    return np.asarray(jnp.where(known[..., None], y, 0), np.float32)


def routed_ids(rng, tokens, k, num_experts):
    """Uneven loads: expert 1 takes most pairs, expert 3 none; ids -1 and >= E (other
    devices' experts) mixed in."""
    ids = rng.choice([0, 1, 1, 1, 1, 2, 4, 5][:num_experts], size=(tokens, k)).astype(np.int32)
    ids[0, 0], ids[2, 1], ids[3, :] = -1, num_experts, num_experts + 5
    return jnp.asarray(ids)


def test_fp4_values_decode_every_code():
    codes = jnp.arange(16, dtype=jnp.int32)
    want = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)  # the E2M1 table
    np.testing.assert_array_equal(np.asarray(moe_tpu.fp4_values(codes)), want)


# embed 64 / hidden 96 with block_n 32: mlp1 and mlp2 both end in a partial column block.
@pytest.mark.parametrize("block_m", [4, 16])
def test_fp32_matches_gathered_tightly(block_m):
    mlp = make_moe(6, 64, 96, jnp.float32, seed=1)
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(0, 2, (7, 64)), jnp.float32)
    experts = routed_ids(rng, 7, 4, 6)
    got = run_tpu(mlp, h, experts, block_m=block_m, block_n=32, mlp2_block_n=48)
    want = reference(mlp, h, experts)
    assert got.shape == (7, 4, 64) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    known = (np.asarray(experts) >= 0) & (np.asarray(experts) < 6)
    assert not np.any(np.asarray(got)[~known]) and np.all(np.any(np.asarray(got)[known] != 0, axis=-1))
    # the clamp is engaged: some mlp1 pre-activations exceed the limit
    w = mlp.expert_weights()
    u = jnp.einsum("nd,nkod->nko", h, model_lib.mxfp4.dequantize(w.mlp1_fp4, w.mlp1_scales, jnp.float32)[
        jnp.clip(experts, 0, 5)])
    assert np.mean(np.abs(np.asarray(u)) > mlp.config.swiglu_limit) > 0.2


def test_bf16_matches_gathered_and_grouped():
    mlp = make_moe(6, 64, 96, jnp.bfloat16, seed=3)
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(0, 2, (9, 64)), jnp.bfloat16)
    experts = routed_ids(rng, 9, 4, 6)
    got = np.asarray(run_tpu(mlp, h, experts, block_n=32), np.float32)
    assert got.dtype == np.float32
    want = reference(mlp, h, experts)
    known = (np.asarray(experts) >= 0) & (np.asarray(experts) < 6)
    grouped = np.where(known[..., None], np.asarray(mlp.experts_grouped(h, experts), np.float32), 0)
    for other in (want, grouped):
        # Same products, another fp32 summation order: rare one-ulp bf16 flips that mlp2 spreads.
        np.testing.assert_allclose(got, other, rtol=2e-2, atol=2e-2 * np.abs(other).max())
        assert np.mean(got == other) > 0.9
    assert not np.any(got[~known])


def test_no_pairs_and_mismatched_shapes():
    mlp = make_moe(4, 64, 64, jnp.bfloat16, seed=5)
    assert run_tpu(mlp, jnp.zeros((0, 64), jnp.bfloat16), jnp.zeros((0, 4), jnp.int32)).shape == (0, 4, 64)
    w = mlp.expert_weights()
    with pytest.raises(ValueError, match="features"):
        moe_tpu.tpu_grouped_gemm(jnp.zeros((1, 2, 16, 16), jnp.bfloat16), jnp.zeros(1, jnp.int32),
                                 jnp.ones(1, jnp.int32), moe_kernels.packed_bytes(w.mlp2_fp4), w.mlp2_scales,
                                 w.mlp2_bias, interpret=True)


# --------------------------------------------------------------- Mosaic TPU lowering
@pytest.mark.parametrize("pairs", [4, 256])
def test_lowers_to_mosaic_tpu_at_20b_shapes(pairs):
    num_experts, embed, hidden, k = 32, 2880, 2880, 4
    s = jax.ShapeDtypeStruct
    args = (s((pairs // k, embed), jnp.bfloat16), s((pairs // k, k), jnp.int32),
            s((num_experts, 2 * hidden, embed // 32, 16), jnp.uint8),
            s((num_experts, 2 * hidden, embed // 32), jnp.uint8),
            s((num_experts, 2 * hidden), jnp.bfloat16),
            s((num_experts, embed, hidden // 32, 16), jnp.uint8), s((num_experts, embed, hidden // 32), jnp.uint8),
            s((num_experts, embed), jnp.bfloat16))
    f = functools.partial(moe_tpu.experts_tpu, limit=7.0, alpha=1.702, interpret=False)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2  # mlp1 + SwiGLU, mlp2
