"""The sink-aware decode attention kernel (gptoss_jax/kernels/attention.py) against the XLA
reference (Attention.attend and Attention.__call__ with kernels="xla"), in interpret mode,
and its lowering to Triton at the real gpt-oss-20b shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels import Kernels
from gptoss_jax.kernels.attention import decode_attention, default_splits
from gptoss_jax.model import NO_POSITION, Attention, LayerCache, apply_rope, rope_tables

# 8 query heads per kv head as in gpt-oss (so the kernel pads the group to 16 rows), small
# head_dim and window for speed. Layer 0 slides, layer 1 attends fully.
SMALL = GptOssConfig.preset("tiny").replace(num_attention_heads=16, num_key_value_heads=2, sliding_window=8,
                                           num_hidden_layers=2, name="attention-test")
DTYPES = {"bf16": (jnp.bfloat16, dict(atol=2e-2, rtol=2e-2)), "fp32": (jnp.float32, dict(atol=2e-6, rtol=2e-6))}


@functools.lru_cache(maxsize=None)
def random_attention(config, layer, dtype, seed=0):
    attn = Attention(config, layer, dtype)
    state = nnx.state(attn, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(attn, jax.tree.unflatten(tree, [(jax.random.normal(k, x.shape) * 0.3).astype(dtype)
                                                for k, x in zip(keys, leaves)]))
    return attn


def ring_positions(position, slots, sliding):
    """What the cache holds before the step at `position` (model.Attention.write_cache)."""
    slot = jnp.arange(slots)
    if sliding:  # slot s holds the newest position below `position` with p % slots == s
        newest = position - 1 - ((position - 1 - slot) % slots)
        return jnp.where(newest >= 0, newest, NO_POSITION)
    return jnp.where(slot < position, slot, NO_POSITION)


def random_step(attn, query_positions, slots, seed, holes=0.0):
    """Random q, new k/v and cache for one decode step at `query_positions` (one per
    sequence, NO_POSITION: padding); `holes`: share of cache slots emptied at random."""
    c, dtype = attn.config, attn.dtype
    b, kv, hd = len(query_positions), c.num_key_value_heads, c.head_dim
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, 1, c.num_attention_heads, hd)).astype(dtype)
    k_new, v_new = (jax.random.normal(k, (b, 1, kv, hd)).astype(dtype) for k in ks[1:3])
    cache_k, cache_v = (jax.random.normal(k, (b, slots, kv, hd)).astype(dtype) for k in ks[3:5])
    positions = jnp.asarray(query_positions, jnp.int32)[:, None]
    cache_positions = jnp.stack([ring_positions(max(p, 0), slots, attn.sliding) for p in query_positions])
    cache_positions = jnp.where(jax.random.bernoulli(ks[5], holes, cache_positions.shape), NO_POSITION,
                                cache_positions).astype(jnp.int32)
    return q, k_new, v_new, positions, cache_k, cache_v, cache_positions


def reference(attn, q, k_new, v_new, positions, cache_k, cache_v, cache_positions):
    return attn.attend(q, jnp.concatenate([cache_k, k_new], 1), jnp.concatenate([cache_v, v_new], 1), positions,
                       jnp.concatenate([cache_positions, positions], 1))


def kernel(attn, *step, **knobs):
    window = attn.config.sliding_window if attn.sliding else None
    return decode_attention(*step, attn.sinks[...], window=window, interpret=True, **knobs)


def assert_close(got, want, tolerance):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tolerance)


# Sliding (window 8, ring of 8): position 0, the window edge (7, 8, 9), a wrapped ring.
# Full (50 slots, not a multiple of the 16-slot block): block edges, the last slot, a
# position beyond the cache. Every batch ends with a padding query.
CASES = {"sliding": (0, 8, [0, 1, 7, 8, 9, 30, -1]), "full": (1, 50, [0, 1, 16, 17, 49, 50, 70, -1])}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,splits", [("sliding", None), ("sliding", 2), ("full", 1), ("full", 4), ("full", None)])
def test_decode_attention_matches_reference(kind, splits, dtype):
    dt, tolerance = DTYPES[dtype]
    layer, slots, query_positions = CASES[kind]
    attn = random_attention(SMALL, layer, dt)
    step = random_step(attn, query_positions, slots, seed=layer)
    got = kernel(attn, *step, splits=splits, block=16)
    assert got.shape == step[0].shape and got.dtype == dt
    assert_close(got, reference(attn, *step), tolerance)
    assert not np.any(np.asarray(got[-1], np.float32))  # padding attends nothing


@pytest.mark.parametrize("kind,splits", [("sliding", None), ("full", 4)])
def test_decode_attention_applies_rope_and_writes_the_cache(kind, splits):
    """rope=(cos, sin) and write_cache=True: the output of apply_rope + attend on the cache
    + new key, and the cache Attention.write_cache leaves (ring wrap, a position beyond the
    full cache and a padding query write nothing)."""
    layer, slots, query_positions = CASES[kind]
    attn = random_attention(SMALL, layer, jnp.bfloat16)
    q, k_new, v_new, positions, cache_k, cache_v, cache_positions = random_step(attn, query_positions, slots, seed=4)
    cos, sin = rope_tables(SMALL, positions, jnp.bfloat16)
    q_rope, k_rope = apply_rope(q, cos, sin), apply_rope(k_new, cos, sin)
    want = reference(attn, q_rope, k_rope, v_new, positions, cache_k, cache_v, cache_positions)
    want_cache = attn.write_cache(LayerCache(cache_k, cache_v, cache_positions), k_rope, v_new, positions)
    got, got_cache = kernel(attn, q, k_new, v_new, positions, cache_k, cache_v, cache_positions, rope=(cos, sin),
                            write_cache=True, splits=splits, block=16)
    assert_close(got, want, DTYPES["bf16"][1])
    np.testing.assert_allclose(np.asarray(got_cache[0], np.float32), np.asarray(want_cache.k, np.float32),
                               rtol=1e-2, atol=1e-2)  # RoPE'd keys: at most a bf16 ulp apart
    np.testing.assert_array_equal(np.asarray(got_cache[1]), np.asarray(want_cache.v))
    np.testing.assert_array_equal(np.asarray(got_cache[2]), np.asarray(want_cache.positions))
    assert not np.array_equal(np.asarray(got_cache[2]), np.asarray(cache_positions))  # something was written


def test_decode_attention_window_128_edges():
    """The real window: queries 127, 128, 129 keys past the start of the ring, and a wrapped ring."""
    attn = random_attention(SMALL.replace(sliding_window=128), 0, jnp.bfloat16)
    step = random_step(attn, [127, 128, 129, 300], 128, seed=5)
    assert_close(kernel(attn, *step), reference(attn, *step), DTYPES["bf16"][1])


@pytest.mark.parametrize("layer", [0, 1])
def test_decode_attention_skips_empty_slots(layer):
    """Empty slots (NO_POSITION) anywhere in the cache are masked, block size 32."""
    attn = random_attention(SMALL, layer, jnp.float32)
    step = random_step(attn, [5, 37, 40], 8 if layer == 0 else 40, seed=7, holes=0.3)
    assert_close(kernel(attn, *step, block=32, splits=2), reference(attn, *step), DTYPES["fp32"][1])


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_layer_kernel_equals_xla(layer):
    """Attention.__call__ on a one-token step, ragged positions: the output within bf16
    tolerance of kernels="xla", and the same cache written."""
    attn = random_attention(SMALL, layer, jnp.bfloat16)
    slots = 8 if attn.sliding else 24
    query_positions = [0, 9, 23, 5]
    _, k, v, positions, cache_k, cache_v, cache_positions = random_step(attn, query_positions, slots, seed=11)
    x = jax.random.normal(jax.random.key(3), (len(query_positions), 1, SMALL.hidden_size)).astype(jnp.bfloat16)
    cache = LayerCache(cache_k, cache_v, cache_positions)
    want, want_cache = attn(x, positions, cache)
    got, got_cache = attn(x, positions, cache, kernels=Kernels(decode_attention=True, interpret=True))
    assert_close(got, want, dict(atol=3e-2, rtol=3e-2))
    for a, b in zip(got_cache, want_cache):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decode_attention_rejects_bad_arguments():
    attn = random_attention(SMALL, 1, jnp.float32)
    step = random_step(attn, [3], 16, seed=0)
    with pytest.raises(ValueError, match="block must be a power of 2"):
        kernel(attn, *step, block=24)
    with pytest.raises(ValueError, match="splits must be a power of 2"):
        kernel(attn, *step, splits=3)
    q2 = jnp.concatenate([step[0], step[0]], axis=1)
    with pytest.raises(ValueError, match="one new token per sequence"):
        kernel(attn, q2, *step[1:])
    with pytest.raises(ValueError, match="cache_positions has shape"):
        kernel(attn, *step[:-1], step[-1][:, :8])


def test_default_splits():
    assert default_splits(1, 8, 4096, 64, None) == 32  # 256 programs for batch 1
    assert default_splits(1, 8, 128, 64, None) == 2  # never more splits than blocks
    assert default_splits(64, 8, 1024, 64, None) == 1
    assert default_splits(1, 8, 128, 64, 128) == 1  # the sliding ring is a few blocks


# The real gpt-oss-20b attention: 64 query heads, 8 kv heads, head_dim 64, window 128.
@pytest.mark.parametrize("window,slots", [(128, 128), (None, 4096), (None, 32768)])
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_attention_lowers_to_triton_at_20b_shapes(window, slots, batch):
    bf16, i32 = jnp.bfloat16, jnp.int32
    s = jax.ShapeDtypeStruct
    args = (s((batch, 1, 64, 64), bf16), s((batch, 1, 8, 64), bf16), s((batch, 1, 8, 64), bf16), s((batch, 1), i32),
            s((batch, slots, 8, 64), bf16), s((batch, slots, 8, 64), bf16), s((batch, slots), i32), s((64,), bf16))
    splits = default_splits(batch, 8, slots, 64, window)
    f = functools.partial(decode_attention, window=window, interpret=False)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == (1 if splits == 1 else 2)
    # as the model calls it: RoPE in the kernel, the cache written in place
    rope = (s((batch, 1, 32), bf16),) * 2
    f = functools.partial(decode_attention, window=window, write_cache=True, interpret=False)
    text = jax.jit(f).trace(*args, rope).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == (1 if splits == 1 else 2)


@pytest.mark.parametrize("knobs", [dict(block=32, num_warps=2), dict(block=128, splits=8, num_stages=3),
                                   dict(splits=128, num_warps=8), dict(splits=4, block=16)])
def test_decode_attention_knobs_lower_to_triton(knobs):
    """The variants benchmarks/kernel_check.py --attention times, at the 20b full-layer shape."""
    bf16, i32 = jnp.bfloat16, jnp.int32
    s = jax.ShapeDtypeStruct
    args = (s((1, 1, 64, 64), bf16), s((1, 1, 8, 64), bf16), s((1, 1, 8, 64), bf16), s((1, 1), i32),
            s((1, 4224, 8, 64), bf16), s((1, 4224, 8, 64), bf16), s((1, 4224), i32), s((64,), bf16))
    f = functools.partial(decode_attention, window=None, interpret=False, **knobs)
    assert "custom_call @__gpu$xla.gpu.triton" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
