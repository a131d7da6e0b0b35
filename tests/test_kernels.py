"""Pallas kernels against the XLA reference path (the oracle), in Pallas interpret mode on
the CPU. The Triton lowering itself is checked on a GPU by benchmarks/kernel_check.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_mostly_bit_equal

from gptoss_jax import mxfp4
from gptoss_jax.kernels import Kernels, common, kernels_in_use, set_kernels
from gptoss_jax.kernels import moe as moe_kernels
from gptoss_jax.kernels.common import swiglu_pair
from gptoss_jax.kernels.dispatch import packed_experts
from gptoss_jax.loader import load

GEMV = Kernels(moe_gemv=True, interpret=True)
ALL = Kernels.choose("pallas", "cpu")


def random_fp4(key, shape_blocks):
    """FP4 values [..., blocks, 32] with every code (including -0 and the subnormal 0.5)."""
    raw = jax.random.randint(key, (*shape_blocks, 16), 0, 256, jnp.int32).astype(jnp.uint8)
    return mxfp4.blocks_to_fp4(raw)


def random_scales(key, shape, low=118, high=134):
    return mxfp4.scales_to_e8m0(jax.random.randint(key, shape, low, high, jnp.int32).astype(jnp.uint8))


def reference_gemv(x, pair_expert, fp4, scales, bias, pairs_per_x=1, swiglu_params=None):
    x_rows = x[jnp.arange(pair_expert.shape[0]) // pairs_per_x]
    w = mxfp4.dequantize(fp4[pair_expert], scales[pair_expert], jnp.float32)
    u = jnp.einsum("pd,pod->po", x_rows.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    u = u.astype(x.dtype) + bias[pair_expert]
    if swiglu_params is None:
        return u
    return swiglu_pair(u[:, 0::2], u[:, 1::2], *swiglu_params, x.dtype)


def test_decode_nibbles_is_exact_for_every_byte():
    byte = jnp.arange(256, dtype=jnp.int32)
    low, high = common.decode_nibbles(byte)
    fp4 = mxfp4.blocks_to_fp4(jnp.arange(256, dtype=jnp.uint8).reshape(16, 16))  # [16, 32]
    expected = np.asarray(fp4.astype(jnp.float32)).reshape(256, 2)
    scale = 2.0 ** common.FP16_SHIFT
    np.testing.assert_array_equal(np.asarray(low) * scale, expected[:, 0])
    np.testing.assert_array_equal(np.asarray(high) * scale, expected[:, 1])


def test_block_scale_matches_e8m0():
    """Exact for every scale up to 2^113 (E8M0 240); trained MXFP4 scales sit far below."""
    exponents = jnp.arange(0, 241, dtype=jnp.uint8)
    got = np.asarray(common.block_scale(exponents), np.float64) * 2.0 ** -common.FP16_SHIFT
    np.testing.assert_array_equal(got, 2.0 ** (np.arange(0, 241) - 127.0))


@pytest.mark.parametrize("features,rows,pairs,pairs_per_x,swiglu", [
    (96, 64, 3, 1, False),    # 3 blocks: a ragged last step of the contraction loop
    (64, 32, 8, 4, True),     # mlp1 shape: x per token, gate/up interleaved, SwiGLU fused
    (160, 16, 5, 1, True),    # 5 blocks, a single row tile
])
def test_expert_gemv_matches_reference(features, rows, pairs, pairs_per_x, swiglu):
    keys = jax.random.split(jax.random.key(features + rows + pairs), 5)
    experts = 6
    fp4 = random_fp4(keys[0], (experts, rows, features // 32))
    scales = random_scales(keys[1], (experts, rows, features // 32))
    bias = (jax.random.normal(keys[2], (experts, rows)) * 0.5).astype(jnp.bfloat16)
    x = (jax.random.normal(keys[3], (pairs // pairs_per_x if pairs_per_x > 1 else pairs, features)) * 2).astype(jnp.bfloat16)
    # uneven loads: some experts used several times, some never
    pair_expert = jax.random.randint(keys[4], (pairs,), 0, experts // 2, jnp.int32) * 2
    params = (7.0, 1.702) if swiglu else None
    got = moe_kernels.expert_gemv(x, pair_expert, moe_kernels.packed_bytes(fp4), scales, bias,
                                  pairs_per_x=pairs_per_x, swiglu_params=params, rows=8, blocks_per_step=2,
                                  interpret=True)
    want = reference_gemv(x, pair_expert, fp4, scales, bias, pairs_per_x, params)
    assert got.shape == want.shape and got.dtype == want.dtype
    # Same products; only the fp32 summation order differs, so at most one bf16 rounding flip.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
    assert_mostly_bit_equal(got, want, 0.95)


def test_expert_gemv_sums_a_tokens_experts_and_skips_other_devices():
    """pairs_per_program=k: one fp32 row per token, sum_j weight_j * output_j in slot order;
    expert ids outside [0, E) (another device's experts) add nothing even with a nonzero weight."""
    keys = jax.random.split(jax.random.key(12), 6)
    experts, k, tokens, d = 5, 4, 3, 96
    fp4 = random_fp4(keys[0], (experts, 64, d // 32))
    scales = random_scales(keys[1], (experts, 64, d // 32))
    bias = jax.random.normal(keys[2], (experts, 64)).astype(jnp.bfloat16)
    x = jax.random.normal(keys[3], (tokens * k, d)).astype(jnp.bfloat16)
    ids = jnp.asarray([[0, 4, 2, 2], [1, -1, 3, 5], [-1, 9, -1, -1]], jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(keys[4], (tokens, k)), axis=-1).astype(jnp.bfloat16)
    got = moe_kernels.expert_gemv(x, ids.reshape(-1), moe_kernels.packed_bytes(fp4), scales, bias, weights.reshape(-1),
                                  pairs_per_program=k, rows=8, blocks_per_step=2, interpret=True)
    known = (ids >= 0) & (ids < experts)
    y = reference_gemv(x, jnp.where(known, ids, 0).reshape(-1), fp4, scales, bias).reshape(tokens, k, -1)
    y = jnp.where(known[..., None], y, 0)
    want = jnp.einsum("nko,nk->no", y, weights, preferred_element_type=jnp.float32)
    assert got.shape == (tokens, 64) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2, atol=1e-2)
    assert not np.any(np.asarray(got[2]))
    # with the residual connection: residual + the sum rounded to bf16, rounded (x + MoE(x))
    residual = jax.random.normal(keys[5], (tokens, 64)).astype(jnp.bfloat16)
    with_residual = moe_kernels.expert_gemv(x, ids.reshape(-1), moe_kernels.packed_bytes(fp4), scales, bias,
                                            weights.reshape(-1), residual, pairs_per_program=k, rows=8,
                                            blocks_per_step=2, interpret=True)
    assert with_residual.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(with_residual, np.float32),
                                  np.asarray(residual + got.astype(jnp.bfloat16), np.float32))
    with pytest.raises(ValueError, match="residual"):
        moe_kernels.expert_gemv(x, ids.reshape(-1), moe_kernels.packed_bytes(fp4), scales, bias, weights.reshape(-1),
                                residual[:2], pairs_per_program=k, interpret=True)
    with pytest.raises(ValueError, match="pair_weight"):
        moe_kernels.expert_gemv(x, ids.reshape(-1), moe_kernels.packed_bytes(fp4), scales, bias, pairs_per_program=k,
                                interpret=True)


def test_expert_gemv_rejects_mismatched_shapes():
    fp4 = random_fp4(jax.random.key(0), (2, 16, 2))
    scales = random_scales(jax.random.key(1), (2, 16, 2))
    bias = jnp.zeros((2, 16), jnp.bfloat16)
    x = jnp.ones((1, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="features"):
        moe_kernels.expert_gemv(x, jnp.zeros(1, jnp.int32), moe_kernels.packed_bytes(fp4), scales, bias,
                                interpret=True)


@pytest.fixture(scope="module")
def tiny_model():
    return load("tiny", dtype="bfloat16")


def gemv_expert_outputs(mlp, h, experts):
    """[n, k, embed] expert outputs of the two grouped GEMVs (as MoE.experts_gathered)."""
    w1, s1, b1, w2, s2, b2 = packed_experts(mlp.expert_weights())
    pair_expert = experts.reshape(-1)
    c = mlp.config
    a = moe_kernels.expert_gemv(h, pair_expert, w1, s1, b1, pairs_per_x=experts.shape[1],
                                swiglu_params=(c.swiglu_limit, c.swiglu_alpha), interpret=True)
    return moe_kernels.expert_gemv(a, pair_expert, w2, s2, b2, interpret=True).reshape(*experts.shape, -1)


@pytest.mark.parametrize("tokens", [1, 5])
def test_moe_experts_kernel_equals_gathered_reference(tiny_model, tokens):
    mlp = tiny_model.blocks[1].mlp
    h = jax.random.normal(jax.random.key(tokens), (tokens, tiny_model.config.hidden_size)).astype(jnp.bfloat16)
    experts, _ = mlp.route(h)
    want = mlp.experts_gathered(h, experts)
    got = gemv_expert_outputs(mlp, h, experts)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("tokens", [1, 3])
def test_moe_mix_kernel_equals_expert_mix_reference(tiny_model, tokens):
    """The decode path with the kernels on: both GEMVs and the weighted sum over the k
    experts in the second kernel, against expert_mix on the reference path; ids of another
    device's experts (as under a mesh) add nothing."""
    mlp = tiny_model.blocks[1].mlp
    h = jax.random.normal(jax.random.key(tokens), (tokens, tiny_model.config.hidden_size)).astype(jnp.bfloat16)
    experts, weights = mlp.route(h)
    want = mlp.expert_mix(h, experts, weights, mlp.expert_weights())
    got = mlp.expert_mix(h, experts, weights, mlp.expert_weights(), kernels=GEMV)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2, atol=1e-2)
    assert_mostly_bit_equal(got.astype(jnp.bfloat16), want.astype(jnp.bfloat16), 0.95)
    foreign = experts.at[:, 1].set(mlp.config.num_experts + 3)
    want = mlp.expert_mix(h, foreign, weights, mlp.expert_weights())
    got = mlp.expert_mix(h, foreign, weights, mlp.expert_weights(), kernels=GEMV)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kernels", [Kernels.xla(), Kernels(moe_gemv=True, router=True, interpret=True)])
def test_moe_adds_its_input_as_the_block_did(tiny_model, kernels):
    """MoE(x, add_input=True) is x + MoE(x) bit for bit, on the reference path and with the
    batch-1 kernels (where the mlp2 GEMV adds the residual itself)."""
    mlp = tiny_model.blocks[3].mlp
    x = (3 * jax.random.normal(jax.random.key(5), (1, 1, tiny_model.config.hidden_size))).astype(jnp.bfloat16)
    added = mlp(x, kernels=kernels, add_input=True)
    np.testing.assert_array_equal(np.asarray(added, np.float32), np.asarray(x + mlp(x, kernels=kernels), np.float32))


def test_moe_kernel_saturates_swiglu_clamp(tiny_model):
    """Large inputs push the mlp1 pre-activations past the clamp (limit 7)."""
    mlp = tiny_model.blocks[0].mlp
    h = (jax.random.normal(jax.random.key(9), (2, tiny_model.config.hidden_size)) * 64).astype(jnp.bfloat16)
    experts, _ = mlp.route(h)
    w1 = mxfp4.dequantize(mlp.mlp1_fp4[...][experts], mlp.mlp1_scales[...][experts], jnp.float32)
    assert float(jnp.max(jnp.abs(jnp.einsum("nd,nkod->nko", h.astype(jnp.float32), w1)))) > 2 * 7.0
    want = mlp.experts_gathered(h, experts)
    got = gemv_expert_outputs(mlp, h, experts)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=2e-2)


def test_end_to_end_decode_logits_with_kernels(tiny_model):
    """Prefill (reference path: many tokens) then decode steps through the MoE, router,
    projection and attention kernels: logits equal the reference path's within bf16 tolerance."""
    tokens = jnp.asarray([[3, 17, 4000, 99, 123456, 7, 8]])
    positions = jnp.arange(tokens.shape[1])[None]
    caches = tiny_model.init_cache(1, 64)
    _, caches = tiny_model.extend(tokens, positions, caches)
    steps = [[11], [200000], [5]]
    reference, kernel = [], []
    for model, out in ((tiny_model, reference), (tiny_model.with_kernels(ALL), kernel)):
        c = caches
        for i, t in enumerate(steps):
            logits, c = model.extend(jnp.asarray([t]), jnp.asarray([[tokens.shape[1] + i]]), c)
            out.append(np.asarray(logits, np.float32))
    for r, k in zip(reference, kernel):
        np.testing.assert_allclose(k, r, atol=0.05 * np.abs(r).max(), rtol=0)
        assert np.argmax(k) == np.argmax(r)


def test_with_kernels_shares_the_parameters_and_leaves_the_model_alone(tiny_model):
    other = tiny_model.with_kernels(ALL)
    assert other.kernels == ALL and tiny_model.kernels == Kernels.xla()
    assert other.embedding[...] is tiny_model.embedding[...]


def test_set_kernels_rejects_unknown_implementation(tiny_model):
    model = tiny_model.with_kernels(Kernels.xla())
    with pytest.raises(ValueError, match="moe must be one of"):
        set_kernels(model, "cuda")
    with pytest.raises(ValueError, match="attention must be one of"):
        set_kernels(model, attention="flash")
    with pytest.raises(ValueError, match="projection must be one of"):
        set_kernels(model, projection="triton")


def test_set_kernels_defaults_and_partial_choices(tiny_model):
    """The compatible wrapper: no name sets every kernel for the model's devices; a name
    changes only that kernel."""
    model = tiny_model.with_kernels(Kernels.xla())
    assert set_kernels(model).kernels == Kernels.auto("pallas")
    everything = kernels_in_use(model)
    assert set(everything.values()) == {"pallas"}
    set_kernels(model, projection="xla")
    assert kernels_in_use(model) == {**everything, "projection": "xla"}
    set_kernels(model, "xla", "xla", moe_gemm="xla", projection="xla", router="xla")
    assert model.kernels == Kernels(interpret=True) and set(kernels_in_use(model).values()) == {"xla"}


@pytest.mark.parametrize("num_experts", [32, 128])  # gpt-oss-20b, 120b
@pytest.mark.parametrize("with_residual", [False, True])
def test_mix_decode_lowers_to_triton_at_real_shapes(num_experts, with_residual):
    """Both GEMVs of the batch-1 MoE (mlp1 + SwiGLU; mlp2 summing the 4 experts) lower to
    Triton at the real shapes, with and without the residual add (Pallas lowering errors show
    up here; the Triton compile itself is checked on a GPU by benchmarks/gemv_sweep.py)."""
    import functools

    embed = hidden = 2880
    s = jax.ShapeDtypeStruct
    args = (s((1, embed), jnp.bfloat16), s((1, 4), jnp.int32),
            s((num_experts, 2 * hidden, embed // 32, 16), jnp.uint8), s((num_experts, 2 * hidden, embed // 32), jnp.uint8),
            s((num_experts, 2 * hidden), jnp.bfloat16),
            s((num_experts, embed, hidden // 32, 16), jnp.uint8), s((num_experts, embed, hidden // 32), jnp.uint8),
            s((num_experts, embed), jnp.bfloat16))
    residual = jnp.ones((1, embed), jnp.bfloat16) if with_residual else None
    f = functools.partial(moe_kernels.experts_mix_decode, weights=jnp.full((1, 4), 0.25, jnp.bfloat16), limit=7.0,
                          alpha=1.702, residual=residual, interpret=False)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2
