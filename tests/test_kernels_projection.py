"""The projection kernels against the model's XLA path (interpret mode): the fused one-token
kernels (RMSNorm + q/k/v; output projection + residual) and tokens_linear (2-64 tokens)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_mostly_bit_equal

from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels import Kernels
from gptoss_jax.kernels.dispatch import OUTPUT_PROJECTION_MIN_TOKENS, PROJECTION_MAX_TOKENS
from gptoss_jax.kernels.projection import norm_qkv, output_residual, tokens_linear
from gptoss_jax.model import Attention, LayerCache

F32 = jnp.float32


def reference(x, scale, weights, eps):
    t = x.astype(F32)
    t = t * jax.lax.rsqrt(jnp.mean(t * t) + eps)
    h = (t * scale.astype(F32)).astype(x.dtype)
    return [(jnp.einsum("d,nkd->nk", h, w, preferred_element_type=F32, precision=jax.lax.Precision.HIGHEST)
             + b.astype(F32)).astype(x.dtype) for w, b in weights]


def assert_matches(got, want, dtype):
    """fp32: to 1e-5; bf16: fp32 sums in another order, so an occasional one-ulp rounding
    difference, mostly bit-equal."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=2 ** -7 * np.max(np.abs(want)))
        assert_mostly_bit_equal(got, want, 0.9)


@pytest.mark.parametrize("dtype,features,bk", [(jnp.float32, 80, 32), (jnp.bfloat16, 80, 32), (jnp.bfloat16, 96, 64)])
def test_norm_qkv_matches_reference(dtype, features, bk):
    """80 features with 32-wide chunks: a ragged last chunk; 8 heads / 2 kv heads, head_dim 16."""
    keys = jax.random.split(jax.random.key(features), 8)

    def rand(key, shape, scale=1.0):
        return (jax.random.normal(key, shape, F32) * scale).astype(dtype)

    x, gain = rand(keys[0], (features,), 3.0), rand(keys[1], (features,))
    weights = [(rand(keys[2 + 2 * i], (heads, 16, features), 0.2), rand(keys[3 + 2 * i], (heads, 16)))
               for i, heads in enumerate((8, 2, 2))]
    got = norm_qkv(x, gain, *weights[0], *weights[1], *weights[2], eps=1e-5, rows=8, bk=bk, interpret=True)
    want = reference(x, gain, weights, 1e-5)
    for g, w in zip(got, want):
        assert_matches(g, w, dtype)


def test_norm_qkv_rejects_a_row_tile_that_does_not_divide():
    x = jnp.ones((64,), jnp.bfloat16)
    w, b = jnp.ones((2, 6, 64), jnp.bfloat16), jnp.ones((2, 6), jnp.bfloat16)
    with pytest.raises(ValueError, match="not a multiple of the row tile 8"):
        norm_qkv(x, x, w, b, w, b, w, b, eps=1e-5, rows=8, interpret=True)


def test_norm_qkv_lowers_to_triton_at_the_20b_shape():
    s, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (s((2880,), bf), s((2880,), bf), s((64, 64, 2880), bf), s((64, 64), bf), s((8, 64, 2880), bf),
            s((8, 64), bf), s((8, 64, 2880), bf), s((8, 64), bf))
    lowered = jax.jit(lambda *a: norm_qkv(*a, eps=1e-5)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()


@pytest.mark.parametrize("dtype,heads,bk", [(jnp.float32, 3, 32), (jnp.bfloat16, 5, 64)])
def test_output_residual_matches_reference(dtype, heads, bk):
    """x + round(attn @ wo^T + bo): 3 or 5 heads of 16 (48 / 80 features, ragged chunks)."""
    keys = jax.random.split(jax.random.key(heads), 4)
    attn = (jax.random.normal(keys[0], (heads, 16), F32)).astype(dtype)
    wo = (0.2 * jax.random.normal(keys[1], (40, heads, 16), F32)).astype(dtype)
    bo = jax.random.normal(keys[2], (40,), F32).astype(dtype)
    x = (4 * jax.random.normal(keys[3], (40,), F32)).astype(dtype)
    got = output_residual(attn, wo, bo, x, rows=8, bk=bk, interpret=True)
    projected = (jnp.einsum("nk,dnk->d", attn, wo, preferred_element_type=F32, precision=jax.lax.Precision.HIGHEST)
                 + bo.astype(F32)).astype(dtype)
    want = np.asarray(x + projected, np.float32)
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # the projection's fp32 sum in another order: rare one-ulp differences, then the add
        np.testing.assert_allclose(got, want, rtol=0, atol=2 ** -7 * np.max(np.abs(want)))
        assert_mostly_bit_equal(got, want, 0.9)
    with pytest.raises(ValueError, match="wo"):
        output_residual(attn, wo[:, :2], bo, x, interpret=True)


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_adds_its_input_with_and_without_the_kernels(layer):
    """Attention(..., add_input=True) is x + the attention output: bit for bit on the XLA
    path, within bf16 tolerance with the one-token kernels (projection + decode attention)."""
    config = GptOssConfig.preset("tiny").replace(head_dim=32, num_hidden_layers=2)
    attn = Attention(config, layer, jnp.bfloat16)
    from flax import nnx

    state = nnx.state(attn, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(layer), len(leaves))
    nnx.update(attn, jax.tree.unflatten(tree, [(0.3 * jax.random.normal(k, v.shape)).astype(jnp.bfloat16)
                                                for k, v in zip(keys, leaves)]))
    x = (2 * jax.random.normal(jax.random.key(7), (1, 1, config.hidden_size))).astype(jnp.bfloat16)
    positions = jnp.asarray([[5]], jnp.int32)
    slots = config.sliding_window if attn.sliding else 16
    kv = (1, slots, config.num_key_value_heads, config.head_dim)
    cache = LayerCache(jax.random.normal(jax.random.key(1), kv).astype(jnp.bfloat16),
                       jax.random.normal(jax.random.key(2), kv).astype(jnp.bfloat16),
                       jnp.where(jnp.arange(slots) < 5, jnp.arange(slots), -1)[None].astype(jnp.int32))
    plain, _ = attn(x, positions, cache)
    added, _ = attn(x, positions, cache, add_input=True)
    np.testing.assert_array_equal(np.asarray(added, np.float32), np.asarray(x + plain, np.float32))
    fused, _ = attn(x, positions, cache, kernels=Kernels(projection=True, decode_attention=True, interpret=True),
                    add_input=True)
    want = np.asarray(added, np.float32)
    np.testing.assert_allclose(np.asarray(fused, np.float32), want, rtol=0, atol=0.03 * np.abs(want).max())


def test_output_residual_lowers_to_triton_at_the_20b_shape():
    s, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (s((64, 64), bf), s((2880, 64, 64), bf), s((2880,), bf), s((2880,), bf))
    lowered = jax.jit(lambda *a: output_residual(*a)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()


@pytest.mark.parametrize("dtype,tokens", [(jnp.float32, 3), (jnp.bfloat16, 2), (jnp.bfloat16, 20), (jnp.bfloat16, 64)])
def test_tokens_linear_matches_reference(dtype, tokens):
    """Several weights in one kernel (48 and 32 outputs: the 32-column tile drops to 16 for
    48), 80 features in 32-wide chunks (a ragged last chunk), tokens padded to the 16-row
    dot; and one weight with the residual add."""
    keys = jax.random.split(jax.random.key(tokens), 7)
    h = (2 * jax.random.normal(keys[0], (tokens, 80), F32)).astype(dtype)
    ws = [(0.2 * jax.random.normal(keys[1 + i], (n, 80), F32)).astype(dtype) for i, n in enumerate((48, 32))]
    bs = [jax.random.normal(keys[3 + i], (n,), F32).astype(dtype) for i, n in enumerate((48, 32))]
    x = (4 * jax.random.normal(keys[5], (tokens, 48), F32)).astype(dtype)

    def project(w, b):
        return (jnp.einsum("nd,od->no", h, w, preferred_element_type=F32, precision=jax.lax.Precision.HIGHEST)
                + b.astype(F32)).astype(dtype)

    got = list(tokens_linear(h, ws, bs, bk=32, interpret=True))
    got += tokens_linear(h, ws[:1], bs[:1], x, bk=32, interpret=True)
    want = [project(w, b) for w, b in zip(ws, bs)] + [x + project(ws[0], bs[0])]
    for g, w in zip(got, want):
        assert_matches(g, w, dtype)


def test_tokens_linear_rejects_bad_shapes():
    h, w, b = jnp.ones((4, 64), jnp.bfloat16), jnp.ones((32, 64), jnp.bfloat16), jnp.ones((32,), jnp.bfloat16)
    with pytest.raises(ValueError, match="weights \\[N, 64\\]"):
        tokens_linear(h, [w[:, :48]], [b], interpret=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        tokens_linear(h, [w[:24]], [b[:24]], interpret=True)
    with pytest.raises(ValueError, match="a residual needs one weight"):
        tokens_linear(h, [w, w], [b, b], jnp.ones((4, 32), jnp.bfloat16), interpret=True)


@pytest.mark.parametrize("tokens", [2, OUTPUT_PROJECTION_MIN_TOKENS + 3, PROJECTION_MAX_TOKENS])
def test_attention_over_a_few_tokens_with_the_projection_kernel(tokens):
    """A prompt chunk of 2-64 tokens through Attention with the projection kernel (q/k/v and,
    from OUTPUT_PROJECTION_MIN_TOKENS, the output projection + residual in tokens_linear)
    equals the XLA path within bf16 tolerance, and the kernel is really in the program."""
    from flax import nnx

    config = GptOssConfig.preset("tiny").replace(head_dim=32, num_hidden_layers=1)
    attn = Attention(config, 0, jnp.bfloat16)
    state = nnx.state(attn, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(tokens), len(leaves))
    nnx.update(attn, jax.tree.unflatten(tree, [(0.3 * jax.random.normal(k, v.shape)).astype(jnp.bfloat16)
                                                for k, v in zip(keys, leaves)]))
    x = (2 * jax.random.normal(jax.random.key(7), (1, tokens, config.hidden_size))).astype(jnp.bfloat16)
    positions = jnp.arange(tokens, dtype=jnp.int32)[None]
    want, _ = attn(x, positions, add_input=True)
    kernels = Kernels(projection=True, interpret=True)
    got, _ = attn(x, positions, kernels=kernels, add_input=True)
    program = str(jax.make_jaxpr(lambda x: attn(x, positions, kernels=kernels, add_input=True))(x))
    assert program.count("pallas_call[") == (2 if tokens >= OUTPUT_PROJECTION_MIN_TOKENS else 1)
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=0.03 * np.abs(want).max())


def test_tokens_linear_lowers_to_triton_at_the_20b_shape():
    s, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (s((64, 2880), bf), s((4096, 2880), bf), s((512, 2880), bf), s((512, 2880), bf))
    biases = [jnp.zeros((n,), bf) for n in (4096, 512, 512)]
    lowered = jax.jit(lambda h, *w: tokens_linear(h, w, biases)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()
