"""The fused norm + router + top-k kernels (kernels/router.py) against MoE.norm / MoE.route,
in Pallas interpret mode on the CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_mostly_bit_equal

from gptoss_jax.kernels import Kernels, router
from gptoss_jax.kernels.dispatch import ROUTER_MAX_TOKENS
from gptoss_jax.loader import load

F32 = jnp.float32


def reference(x, gain, w, b, k, eps=1e-5):
    t = x.astype(F32)
    t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + eps)
    h = (t * gain.astype(F32)).astype(x.dtype)
    logits = (jnp.einsum("nd,ed->ne", h, w, preferred_element_type=F32) + b.astype(F32)).astype(x.dtype)
    values, experts = jax.lax.top_k(logits, k)
    return h, logits, experts, jax.nn.softmax(values.astype(F32), axis=-1).astype(x.dtype)


def random_router(seed, tokens, features, experts, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = (3 * jax.random.normal(keys[0], (tokens, features))).astype(dtype)
    gain = (1 + 0.2 * jax.random.normal(keys[1], (features,))).astype(dtype)
    w = (0.2 * jax.random.normal(keys[2], (experts, features))).astype(dtype)
    b = (0.2 * jax.random.normal(keys[3], (experts,))).astype(dtype)
    return x, gain, w, b


@pytest.mark.parametrize("tokens,features,experts,k,per_program", [
    (1, 64, 8, 4, 1),      # the tiny model's shape
    (3, 96, 32, 4, 4),     # features not a power of 2; several router rows per program
    (2, 80, 5, 3, 2),      # experts and k not powers of 2: a ragged last program
])
def test_norm_route_matches_reference(tokens, features, experts, k, per_program):
    x, gain, w, b = random_router(tokens + features, tokens, features, experts)
    h, logits = router.norm_router_logits(x, gain, w, b, eps=1e-5, experts_per_program=per_program, interpret=True)
    want_h, want_logits, want_experts, want_weights = reference(x, gain, w, b, k)
    assert h.shape == x.shape and logits.shape == (tokens, experts) and logits.dtype == x.dtype
    assert_mostly_bit_equal(h, want_h, 0.98)
    np.testing.assert_allclose(np.asarray(logits, F32), np.asarray(want_logits, F32), rtol=1e-2, atol=1e-2)
    # top-k + softmax of the same logits: the same experts in the same order, weights to bf16
    got_experts, got_weights = router.top_k_softmax(want_logits, k=k, interpret=True)
    np.testing.assert_array_equal(np.asarray(got_experts), np.asarray(want_experts))
    np.testing.assert_allclose(np.asarray(got_weights, F32), np.asarray(want_weights, F32), rtol=8e-3, atol=0)
    assert got_weights.dtype == x.dtype and got_experts.dtype == jnp.int32


def test_top_k_breaks_ties_like_lax_top_k():
    """Equal logits: the lower expert id comes first, as lax.top_k; -inf logits are only
    picked when nothing else is left."""
    logits = jnp.asarray([[0.5, 2.0, 2.0, -1.0, 2.0, 0.5, 0.5, 0.5],
                          [-jnp.inf, 1.0, -jnp.inf, 1.0, 0.0, -jnp.inf, -jnp.inf, -jnp.inf]], jnp.bfloat16)
    got_experts, got_weights = router.top_k_softmax(logits, k=4, interpret=True)
    values, want_experts = jax.lax.top_k(logits, 4)
    np.testing.assert_array_equal(np.asarray(got_experts), np.asarray(want_experts))
    np.testing.assert_array_equal(np.asarray(got_experts), [[1, 2, 4, 0], [1, 3, 4, 0]])
    want_weights = jax.nn.softmax(values.astype(F32), axis=-1).astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(got_weights, F32), np.asarray(want_weights, F32), rtol=8e-3)


def test_rejects_mismatched_shapes_and_k():
    x, gain, w, b = random_router(0, 1, 64, 8)
    with pytest.raises(ValueError, match="router_w"):
        router.norm_router_logits(x, gain, w[:, :32], b, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="power of 2"):
        router.norm_router_logits(x, gain, w, b, eps=1e-5, experts_per_program=3, interpret=True)
    with pytest.raises(ValueError, match="k=9"):
        router.top_k_softmax(jnp.zeros((1, 8), jnp.bfloat16), k=9, interpret=True)


@pytest.fixture(scope="module")
def tiny_model():
    return load("tiny", dtype="bfloat16")


@pytest.mark.parametrize("tokens", [1, 3, 40])  # 40: a batch-64-like step, up to ROUTER_MAX_TOKENS
def test_moe_layer_with_router_kernel_equals_reference(tiny_model, tokens):
    """A MoE layer's output with the router kernel on (and the expert kernels) equals the
    reference path within bf16 tolerance."""
    mlp = tiny_model.blocks[2].mlp
    x = (2 * jax.random.normal(jax.random.key(tokens), (1, tokens, tiny_model.config.hidden_size))).astype(jnp.bfloat16)
    want = np.asarray(mlp(x), F32)
    assert tokens <= ROUTER_MAX_TOKENS
    c = tiny_model.config
    h, experts, weights = router.norm_route(x.reshape(tokens, -1), mlp.norm.scale[...], mlp.router_w[...],
                                            mlp.router_b[...], eps=mlp.norm.eps, k=c.experts_per_token,
                                            interpret=True)
    want_experts, want_weights = mlp.route(mlp.norm(x).reshape(tokens, -1))
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_experts))
    np.testing.assert_allclose(np.asarray(weights, F32), np.asarray(want_weights, F32), rtol=8e-3)
    got = np.asarray(mlp(x, kernels=Kernels(router=True, interpret=True)), F32)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.abs(want).max())


@pytest.mark.parametrize("experts", [32, 128])  # gpt-oss-20b, 120b
def test_lowers_to_triton_at_real_shapes(experts):
    s = jax.ShapeDtypeStruct
    args = (s((1, 2880), jnp.bfloat16), s((2880,), jnp.bfloat16), s((experts, 2880), jnp.bfloat16),
            s((experts,), jnp.bfloat16))
    f = functools.partial(router.norm_route, eps=1e-5, k=4, interpret=False)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2
