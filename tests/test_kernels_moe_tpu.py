"""The TPU MXFP4 expert kernel (gptoss_jax.kernels.moe_tpu) against the model's XLA expert
paths (MoE.experts_gathered / experts_grouped), in Pallas interpret mode on the CPU, and its
Mosaic TPU lowering at the gpt-oss-20b shapes. Compiling for TPUs (Mosaic's own compiler)
is tests/test_tpu_aot.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_kernels_moe_gemm import random_experts

from gptoss_jax import model as model_lib
from gptoss_jax import mxfp4
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels import moe_tpu
from gptoss_jax.sharding import mesh as mesh_lib
from gptoss_jax.sharding import moe as sharded_moe
from gptoss_jax.sharding import rules


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
    c = mlp.config
    return moe_tpu.experts_tpu(h, experts, moe_tpu.tpu_experts(mlp.expert_weights()), limit=c.swiglu_limit,
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


def flushed(x):
    """fp32 values below the normal range set to zero, as the TPU treats them."""
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)


def test_fp4_times_scale_equals_dequantize_for_every_code_and_scale():
    codes = np.arange(16, dtype=np.int32)[:, None]
    scales = np.arange(moe_tpu.MAX_SCALE + 1, dtype=np.int32)[None, :]
    got = np.asarray(moe_tpu.fp4_times_scale(jnp.asarray(codes), moe_tpu.scale_exponent(jnp.asarray(scales))))
    fp4 = np.broadcast_to(codes.astype(np.uint8), (16, scales.size)).view(ml_dtypes.float4_e2m1fn)
    e8m0 = np.broadcast_to(scales.astype(np.uint8), (16, scales.size)).view(ml_dtypes.float8_e8m0fnu)
    want = np.asarray(mxfp4.dequantize(jnp.asarray(fp4)[..., None], jnp.asarray(e8m0), jnp.float32))
    np.testing.assert_array_equal(flushed(got).view(np.uint32), flushed(want).view(np.uint32))
    assert np.all(got[:, 2:] == want[:, 2:])  # scales 2..MAX_SCALE: every value normal and exact


def test_tpu_experts_layout():
    mlp = make_moe(4, 64, 96, jnp.bfloat16, seed=7)
    w = mlp.expert_weights()
    t = moe_tpu.tpu_experts(w, hidden_shards=3)
    codes1 = np.asarray(w.mlp1_fp4).view(np.uint8)  # [E, 2I, D/32, 32], one code per byte
    codes2 = np.asarray(w.mlp2_fp4).view(np.uint8)
    e, j, c = 2, 21, 40  # byte row j holds features 2j (low nibble) and 2j+1 (high)
    for plane in (0, 1):  # gate = row 2c, up = row 2c + 1
        byte = int(np.asarray(t.mlp1_bytes)[e, plane, j, c])
        assert (byte & 15, byte >> 4) == (codes1[e, 2 * c + plane, j // 16, (2 * j) % 32],
                                         codes1[e, 2 * c + plane, j // 16, (2 * j + 1) % 32])
        want_scale = np.asarray(w.mlp1_scales).view(np.uint8)[e, 2 * c + plane, j // 16]
        assert np.asarray(t.mlp1_scales)[e, plane, j // 16, c] == want_scale
        assert np.asarray(t.mlp1_bias)[e, plane, c] == np.asarray(w.mlp1_bias)[e, 2 * c + plane]
    byte = int(np.asarray(t.mlp2_bytes)[e, j, c])
    assert (byte & 15, byte >> 4) == (codes2[e, c, j // 16, (2 * j) % 32], codes2[e, c, j // 16, (2 * j + 1) % 32])
    # 3 hidden blocks, one per shard, each padded to 8 rows
    assert t.mlp1_scales.shape == (4, 2, 8, 96) and t.mlp2_scales.shape == (4, 24, 64)
    s2 = np.asarray(w.mlp2_scales).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(t.mlp2_scales)[:, ::8, :], np.swapaxes(s2, 1, 2))
    assert not np.any(np.asarray(t.mlp2_scales).reshape(4, 3, 8, 64)[:, :, 1:])


def test_tpu_experts_refuses_out_of_range_scales():
    w = make_moe(4, 64, 64, jnp.bfloat16, seed=8).expert_weights()
    w = w._replace(mlp2_scales=w.mlp2_scales.at[1, 3, 0].set(mxfp4.scales_to_e8m0(jnp.uint8(253))))
    with pytest.raises(ValueError, match="scale"):
        moe_tpu.tpu_experts(w)
    with pytest.raises(ValueError, match="shards"):
        moe_tpu.tpu_experts(w._replace(mlp2_scales=w.mlp2_scales), hidden_shards=4)


# embed 288 = 9 blocks (one 8-block step and a tail), hidden 160 = 5 blocks (a tail only);
# with block_n 128 every projection ends in a partial column block.
@pytest.mark.parametrize("block_m", [4, 16])
def test_fp32_matches_gathered_tightly(block_m):
    mlp = make_moe(6, 288, 160, jnp.float32, seed=1)
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(0, 2, (7, 288)), jnp.float32)
    experts = routed_ids(rng, 7, 4, 6)
    got = run_tpu(mlp, h, experts, block_m=block_m, block_n=128, mlp2_block_n=128)
    want = reference(mlp, h, experts)
    assert got.shape == (7, 4, 288) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    known = (np.asarray(experts) >= 0) & (np.asarray(experts) < 6)
    assert not np.any(np.asarray(got)[~known]) and np.all(np.any(np.asarray(got)[known] != 0, axis=-1))
    # the clamp is engaged: some mlp1 pre-activations exceed the limit
    w = mlp.expert_weights()
    u = jnp.einsum("nd,nkod->nko", h, mxfp4.dequantize(w.mlp1_fp4, w.mlp1_scales, jnp.float32)[
        jnp.clip(experts, 0, 5)])
    assert np.mean(np.abs(np.asarray(u)) > mlp.config.swiglu_limit) > 0.2


def test_bf16_matches_gathered_and_grouped():
    mlp = make_moe(6, 288, 160, jnp.bfloat16, seed=3)
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(0, 2, (9, 288)), jnp.bfloat16)
    experts = routed_ids(rng, 9, 4, 6)
    got = np.asarray(run_tpu(mlp, h, experts, block_n=128), np.float32)
    want = reference(mlp, h, experts)
    known = (np.asarray(experts) >= 0) & (np.asarray(experts) < 6)
    grouped = np.where(known[..., None], np.asarray(mlp.experts_grouped(h, experts), np.float32), 0)
    for other in (want, grouped):
        # Same products and roundings, another fp32 summation order: rare one-ulp bf16 flips.
        np.testing.assert_allclose(got, other, rtol=2e-2, atol=2e-2 * np.abs(other).max())
        assert np.mean(got == other) > 0.98
    assert not np.any(got[~known])


def test_tpu_interpreter_dmas_and_partial_blocks():
    """Pallas' TPU interpreter simulates the kernel's DMAs and VMEM (uninitialized VMEM reads
    NaN, out-of-bounds reads raise): partial column blocks, skipped empty tiles and weight
    blocks kept across tiles give the reference's values."""
    mlp = make_moe(6, 288, 160, jnp.bfloat16, seed=3)
    h = jnp.asarray(np.random.default_rng(12).normal(0, 2, (3, 288)), jnp.bfloat16)
    experts = jnp.asarray([[0, 1, 2, 4], [1, 1, 5, 0], [2, 3, 4, 5]], jnp.int32)
    got = moe_tpu.experts_tpu(h, experts, moe_tpu.tpu_experts(mlp.expert_weights()), limit=mlp.config.swiglu_limit,
                              alpha=mlp.config.swiglu_alpha, interpret=pltpu.InterpretParams(), block_n=128,
                              mlp2_block_n=128)
    want = reference(mlp, h, experts)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    assert np.mean(np.asarray(got, np.float32) == want) > 0.98


def test_no_pairs_and_mismatched_shapes():
    mlp = make_moe(4, 64, 64, jnp.bfloat16, seed=5)
    assert run_tpu(mlp, jnp.zeros((0, 64), jnp.bfloat16), jnp.zeros((0, 4), jnp.int32)).shape == (0, 4, 64)
    t = moe_tpu.tpu_experts(mlp.expert_weights())
    one = jnp.ones(1, jnp.int32)
    with pytest.raises(ValueError, match="features"):
        moe_tpu.expert_projection(jnp.zeros((1, 2, 16, 16), jnp.bfloat16), one, one, t.mlp2_bytes[:, None],
                                  t.mlp2_scales[:, None], interpret=True)
    with pytest.raises(ValueError, match="planes"):
        moe_tpu.expert_projection(jnp.zeros((1, 2, 16, 32), jnp.bfloat16), one, one, t.mlp1_bytes, t.mlp1_scales,
                                  interpret=True)


class _ShardedTpuExperts(moe_tpu.TpuExperts):
    """sharding/moe.py counts a device's experts on `mlp1_fp4`; TpuExperts names it mlp1_bytes."""

    @property
    def mlp1_fp4(self):
        return self.mlp1_bytes


def sharded_setup(mlp):
    mesh = mesh_lib.make_mesh("4x2", devices=jax.devices("cpu")[:8])
    params = moe_tpu.tpu_experts(mlp.expert_weights(), hidden_shards=2)
    params = _ShardedTpuExperts(*(jax.device_put(p, rules.named_sharding(a, p.shape, mesh))
                                  for p, a in zip(params, moe_tpu.TPU_EXPERT_AXES)))
    return mesh, params, _ShardedTpuExperts(*moe_tpu.TPU_EXPERT_AXES)


def kernel_expert_mix(mlp, interpret):
    def expert_mix(h, experts, weights, w):
        y = moe_tpu.experts_tpu(h, experts, moe_tpu.TpuExperts(*w), limit=mlp.config.swiglu_limit,
                                alpha=mlp.config.swiglu_alpha, interpret=interpret)
        return jnp.einsum("nko,nk->no", y, weights, precision="highest")

    return expert_mix


def test_kernel_outputs_typecheck_under_shard_map():
    """shard_map's check_vma needs each pallas_call output to say which mesh axes it varies
    along (the 120b 4x2 failure: 'manual_axis_type on jax.ShapeDtypeStruct must not be None')."""
    mlp = make_moe(8, 64, 64, jnp.bfloat16, seed=11)
    mesh, params, axes = sharded_setup(mlp)
    h, experts, weights = jnp.ones((2, 64), jnp.bfloat16), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), jnp.bfloat16)
    for strategy in ("replicated", "all_to_all"):
        def run(h, experts, weights, params, strategy=strategy):
            return sharded_moe.sharded_expert_mix(mesh, kernel_expert_mix(mlp, False), h, experts, weights, params,
                                                  axes, strategy=strategy)

        assert jax.eval_shape(run, h, experts, weights, params).shape == (2, 64)


@pytest.mark.parametrize("strategy", ["replicated", "all_to_all"])
def test_sharded_expert_mix_runs_the_kernel_per_device(strategy):
    """Each device of a 4x2 mesh runs the kernel on its experts and hidden units; the sum
    equals the single-device XLA expert mix. Pallas' interpreter cannot evaluate index maps
    on arrays that vary over mesh axes with check_vma on (JAX: 'dynamic_slice requires
    varying manual axes to match'), so this run turns it off; the test above and
    tests/test_tpu_aot.py type-check and compile the kernels with it on."""
    mlp = make_moe(8, 64, 64, jnp.float32, seed=9)
    mesh, params, axes = sharded_setup(mlp)
    rng = np.random.default_rng(10)
    h = jnp.asarray(rng.normal(0, 2, (6, 64)), jnp.float32)
    experts = jnp.asarray(rng.integers(0, 8, (6, 4)), jnp.int32)
    weights = jax.nn.softmax(jnp.asarray(rng.normal(0, 1, (6, 4)), jnp.float32), axis=-1)
    got = sharded_moe.sharded_expert_mix(mesh, kernel_expert_mix(mlp, True), h, experts, weights, params, axes,
                                         strategy=strategy, check_vma=False)
    want = mlp.expert_mix(h, experts, weights, mlp.expert_weights())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --------------------------------------------------------------- Mosaic TPU lowering
def expert_shapes_20b():
    e, d, i = 32, 2880, 2880
    s = jax.ShapeDtypeStruct
    return moe_tpu.TpuExperts(s((e, 2, d // 2, i), jnp.uint8), s((e, 2, 96, i), jnp.uint8), s((e, 2, i), jnp.bfloat16),
                              s((e, i // 2, d), jnp.uint8), s((e, 96, d), jnp.uint8), s((e, d), jnp.bfloat16))


@pytest.mark.parametrize("pairs", [4, 256])
def test_lowers_to_mosaic_tpu_at_20b_shapes(pairs):
    s = jax.ShapeDtypeStruct
    f = functools.partial(moe_tpu.experts_tpu, limit=7.0, alpha=1.702, interpret=False)
    args = (s((pairs // 4, 2880), jnp.bfloat16), s((pairs // 4, 4), jnp.int32), expert_shapes_20b())
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2  # mlp1 + SwiGLU, mlp2
