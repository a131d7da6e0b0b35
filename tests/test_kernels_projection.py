"""The fused RMSNorm + q/k/v decode kernel against the model's XLA path (interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.kernels.projection import norm_qkv
from conftest import assert_mostly_bit_equal

F32 = jnp.float32


def reference(x, scale, weights, eps):
    t = x.astype(F32)
    t = t * jax.lax.rsqrt(jnp.mean(t * t) + eps)
    h = (t * scale.astype(F32)).astype(x.dtype)
    return [(jnp.einsum("d,nkd->nk", h, w, preferred_element_type=F32, precision=jax.lax.Precision.HIGHEST)
             + b.astype(F32)).astype(x.dtype) for w, b in weights]


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
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape
        if dtype == jnp.float32:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        else:  # fp32 sums in another order: an occasional one-ulp rounding difference
            assert np.max(np.abs(g - w)) <= 2 ** -7 * np.max(np.abs(w))
            assert_mostly_bit_equal(g, w, 0.9)


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
