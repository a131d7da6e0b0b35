"""The grouped MXFP4 GEMM (gptoss_jax.kernels.moe_gemm) against the XLA reference, in Pallas
interpret mode on the CPU, plus its lowering to Triton at the real gpt-oss shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_mostly_bit_equal

from gptoss_jax import model as model_lib
from gptoss_jax import mxfp4
from gptoss_jax.kernels import Kernels, common, moe_gemm
from gptoss_jax.kernels import moe as moe_kernels
from gptoss_jax.kernels.common import swiglu_pair
from gptoss_jax.loader import load

LIMIT, ALPHA = 7.0, 1.702


def random_experts(rng, num_experts, embed, hidden, dtype):
    """Random FP4 experts (every code) with scales around 1 (numpy: no compile time)."""

    def fp4(rows, features):
        raw = rng.integers(0, 256, (num_experts, rows, features // 32, 16), dtype=np.uint8)
        return jnp.asarray(mxfp4.blocks_to_fp4_numpy(raw))

    def scales(rows, features):
        return jnp.asarray(rng.integers(119, 127, (num_experts, rows, features // 32), dtype=np.uint8)
                           .view(mxfp4.E8M0))

    def bias(rows):
        return jnp.asarray(rng.normal(0, 0.5, (num_experts, rows)), dtype)

    return model_lib.ExpertWeights(fp4(2 * hidden, embed), scales(2 * hidden, embed), bias(2 * hidden),
                                   fp4(embed, hidden), scales(embed, hidden), bias(embed))


@functools.partial(jax.jit, static_argnums=3)
def reference(h, experts, w, dtype):
    """The model's numerics with every expert dequantized to fp32 and fp32 dots; rows of ids
    outside [0, E) are zero."""
    num_experts = w.mlp1_fp4.shape[0]
    known = (experts >= 0) & (experts < num_experts)
    e = jnp.where(known, experts, 0)
    w1 = mxfp4.dequantize(w.mlp1_fp4, w.mlp1_scales, jnp.float32)[e]
    u = jnp.einsum("nd,nkod->nko", h.astype(jnp.float32), w1, precision="highest").astype(dtype) + w.mlp1_bias[e]
    a = swiglu_pair(u[..., 0::2], u[..., 1::2], LIMIT, ALPHA, dtype)
    w2 = mxfp4.dequantize(w.mlp2_fp4, w.mlp2_scales, jnp.float32)[e]
    y = jnp.einsum("nki,nkoi->nko", a.astype(jnp.float32), w2, precision="highest").astype(dtype) + w.mlp2_bias[e]
    return jnp.where(known[..., None], y, 0)


def run_kernel(h, experts, w, **tuning):
    return moe_gemm.experts_grouped_kernel(
        h, experts, moe_kernels.packed_bytes(w.mlp1_fp4), w.mlp1_scales, w.mlp1_bias,
        moe_kernels.packed_bytes(w.mlp2_fp4), w.mlp2_scales, w.mlp2_bias, limit=LIMIT, alpha=ALPHA,
        interpret=True, **tuning)


def test_tile_schedule_covers_each_known_pair_once_within_one_expert():
    num_experts, block_m = 5, 4
    # expert 1 empty, expert 3 holds most pairs (11: not a multiple of 4), ids -1, 5, 9 unknown
    ids = jnp.asarray([3, 0, 3, 9, 3, 2, 3, 3, -1, 3, 3, 4, 3, 3, 5, 3, 3, 0], jnp.int32)
    s = common.tile_schedule(ids, num_experts, block_m)
    assert s.tile_rows.shape == (common.max_tiles(ids.shape[0], num_experts, block_m),)
    sorted_ids = np.asarray(ids)[np.asarray(s.order)]
    covered = []
    for expert, start, rows in zip(*map(np.asarray, (s.tile_expert, s.tile_start, s.tile_rows))):
        assert 0 <= rows <= block_m
        covered += list(range(start, start + rows))
        assert np.all(sorted_ids[start:start + rows] == expert)  # a tile holds one expert only
    known = (np.asarray(ids) >= 0) & (np.asarray(ids) < num_experts)
    assert sorted(covered) == list(range(int(known.sum())))  # each known pair exactly once
    assert np.array_equal(np.asarray(s.known), known)
    assert np.sum(np.asarray(s.tile_rows) > 0) == 1 + 1 + 3 + 1  # experts 0, 2, 3 (11 pairs), 4



def test_tile_schedule_has_no_loop():
    # A while loop here (jnp.searchsorted's default method) runs its condition on the host
    # every iteration on a GPU: ~0.8 ms of a batch-64 decode step (docs/performance-log.md entry 42).
    hlo = jax.jit(lambda ids: common.tile_schedule(ids, 32, 16)).lower(jnp.zeros(256, jnp.int32)).as_text()
    assert "while" not in hlo and "stablehlo.while" not in hlo


CASES = {
    # name: (tokens, k, experts, embed, hidden, id pattern, tuning)
    "uneven_and_empty": (9, 4, 6, 64, 64, "skewed", dict(block_m=16, block_n=16, blocks_per_step=1)),
    "odd_pairs_ragged_tiles": (7, 3, 4, 96, 96, "random", dict(block_m=16, block_n=32, blocks_per_step=2,
                                                               swap_ab=True)),
    "unknown_ids": (9, 4, 6, 64, 64, "unknown", dict(block_m=16, block_n=16, blocks_per_step=1)),
}


def make_ids(pattern, rng, tokens, k, num_experts):
    if pattern == "random":
        return jnp.asarray(rng.integers(0, num_experts, (tokens, k)), jnp.int32)
    if pattern == "skewed":  # expert 2 gets 3 of every 4 pairs (27: not a multiple of 16); 1, 4 get none
        ids = jnp.full((tokens, k), 2, jnp.int32).at[:, 3].set(jnp.arange(tokens) % 2 * 3)
        return ids.at[0, 3].set(5)
    # other devices' experts: -1 and ids >= num_experts, mixed with local ones
    ids = jnp.asarray(rng.integers(0, num_experts, (tokens, k)), jnp.int32)
    return ids.at[0, 0].set(-1).at[2, 1].set(num_experts).at[8, 3].set(num_experts + 7).at[3, :].set(-1)


@pytest.mark.parametrize("case", CASES)
def test_grouped_gemm_bf16_matches_reference(case):
    tokens, k, num_experts, embed, hidden, pattern, tuning = CASES[case]
    rng = np.random.default_rng(len(case))
    w = random_experts(rng, num_experts, embed, hidden, jnp.bfloat16)
    h = jnp.asarray(rng.normal(0, 2, (tokens, embed)), jnp.bfloat16)
    experts = make_ids(pattern, rng, tokens, k, num_experts)
    got = run_kernel(h, experts, w, **tuning)
    want = reference(h, experts, w, jnp.bfloat16)
    assert got.shape == want.shape == (tokens, k, embed) and got.dtype == jnp.bfloat16
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # Same products, another fp32 summation order: only rare one-ulp bf16 flips that mlp2 spreads.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    assert_mostly_bit_equal(got, want, 0.9)
    known = (np.asarray(experts) >= 0) & (np.asarray(experts) < num_experts)
    assert not np.any(got[~known])


def test_grouped_gemm_fp32_is_tight():
    num_experts, embed, hidden = 4, 64, 64
    rng = np.random.default_rng(7)
    w = random_experts(rng, num_experts, embed, hidden, jnp.float32)
    h = jnp.asarray(rng.normal(0, 1, (5, embed)), jnp.float32)
    experts = make_ids("random", rng, 5, 4, num_experts).at[1, 2].set(-3)
    got = run_kernel(h, experts, w, block_m=16, block_n=16, blocks_per_step=2)
    want = reference(h, experts, w, jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_grouped_gemm_rejects_mismatched_shapes():
    w = random_experts(np.random.default_rng(0), 2, 64, 64, jnp.bfloat16)
    schedule = common.tile_schedule(jnp.zeros(4, jnp.int32), 2, 16)
    with pytest.raises(ValueError, match="features"):
        moe_gemm.grouped_gemm(jnp.zeros((2, 4, 48), jnp.bfloat16), schedule, moe_kernels.packed_bytes(w.mlp2_fp4),
                              w.mlp2_scales, w.mlp2_bias, interpret=True)
    with pytest.raises(ValueError, match="power of 2"):
        moe_gemm.grouped_gemm(jnp.zeros((2, 4, 32), jnp.bfloat16), schedule, moe_kernels.packed_bytes(w.mlp2_fp4),
                              w.mlp2_scales, w.mlp2_bias, block_n=48, interpret=True)


# ------------------------------------------------------------------------ in the model
@pytest.fixture(scope="module")
def tiny_model():
    return load("tiny", dtype="bfloat16")


def test_moe_grouped_kernel_equals_grouped_reference(tiny_model):
    mlp = tiny_model.blocks[2].mlp
    h = jnp.asarray(np.random.default_rng(3).normal(0, 1, (16, tiny_model.config.hidden_size)), jnp.bfloat16)
    experts, _ = mlp.route(h)
    want = mlp.experts_grouped(h, experts)
    got = run_kernel(h, experts, mlp.expert_weights())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


def test_end_to_end_logits_prefill_and_decode_batch_with_gemm(tiny_model):
    """A 40-token prefill (160 pairs) and a decode step of batch 16 (64 pairs) run the GEMM;
    logits equal the XLA path's within bf16 tolerance."""
    c = tiny_model.config
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(0, c.vocab_size, (1, 40)), jnp.int32)
    batch = 16
    caches = tiny_model.init_cache(batch, 16)
    positions = jnp.broadcast_to(jnp.arange(8)[None], (batch, 8))
    _, caches = tiny_model.extend(jnp.asarray(rng.integers(0, c.vocab_size, (batch, 8)), jnp.int32), positions, caches)
    next_tokens = jnp.asarray(rng.integers(0, c.vocab_size, (batch, 1)), jnp.int32)
    results = {}
    for impl, kernels in (("xla", Kernels.xla()), ("pallas", Kernels(moe_gemv=True, moe_gemm=True, interpret=True))):
        model = tiny_model.with_kernels(kernels)
        decode, _ = model.extend(next_tokens, jnp.full((batch, 1), 8), caches)
        results[impl] = (np.asarray(model(prompt), np.float32), np.asarray(decode, np.float32))
    for want, got in zip(results["xla"], results["pallas"]):
        np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), rtol=0)
        assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) > 0.9


# ------------------------------------------------------------------- Triton lowering
@pytest.mark.parametrize("num_experts", [32, 128])  # gpt-oss-20b, 120b
@pytest.mark.parametrize("pairs,tuning", [
    (256, dict(block_m=16, block_n=64, blocks_per_step=2, num_warps=4, num_stages=3, swap_ab=True)),
    (32768, dict(block_m=128, block_n=128, blocks_per_step=4, num_warps=8, num_stages=3, swap_ab=False)),
])
def test_lowers_to_triton_at_real_shapes(num_experts, pairs, tuning):
    embed = hidden = 2880
    k = 4
    s = jax.ShapeDtypeStruct
    args = (s((pairs // k, embed), jnp.bfloat16), s((pairs // k, k), jnp.int32),
            s((num_experts, 2 * hidden, embed // 32, 16), jnp.uint8), s((num_experts, 2 * hidden, embed // 32), jnp.uint8),
            s((num_experts, 2 * hidden), jnp.bfloat16),
            s((num_experts, embed, hidden // 32, 16), jnp.uint8), s((num_experts, embed, hidden // 32), jnp.uint8),
            s((num_experts, embed), jnp.bfloat16))
    f = functools.partial(moe_gemm.experts_grouped_kernel, limit=LIMIT, alpha=ALPHA, interpret=False, **tuning)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2  # mlp1 + SwiGLU, mlp2


def test_bf16_decode_is_allowed_only_for_scales_it_decodes_exactly():
    """The loader records per layer whether every expert scale is <= 128 (2^(s-1) a finite
    bf16), the condition of the GEMM's bf16 decode; update_weight_facts recomputes it after
    a weight changes. An abstract model (no values) assumes nothing."""
    from flax import nnx

    from gptoss_jax.model import GptOss

    model = load("tiny", dtype="bfloat16")
    assert all(block.mlp.scales_fit_bf16 for block in model.blocks)  # the random scales sit near 2^-3
    mlp = model.blocks[1].mlp
    big = jax.lax.bitcast_convert_type(jnp.full((), mxfp4.BF16_DECODE_MAX_SCALE + 1, jnp.uint8), mlp.mlp2_scales.dtype)
    mlp.mlp2_scales[...] = mlp.mlp2_scales[...].at[0, 0, 0].set(big)
    model.update_weight_facts()
    assert [block.mlp.scales_fit_bf16 for block in model.blocks] == [True, False, True, True][:len(model.blocks)]
    abstract = nnx.eval_shape(lambda: GptOss(model.config))
    assert not any(block.mlp.scales_fit_bf16 for block in abstract.blocks)
