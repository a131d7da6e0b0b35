"""The TPU decode attention kernel (gptoss_jax.kernels.attention_tpu) against
Attention.attend on the cache followed by the new key, in Pallas interpret mode on the CPU.
Compiling it for TPUs (Mosaic) is tests/test_tpu_aot.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax import model as model_lib
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels import attention_tpu

WINDOW = 128
HEADS, KV_HEADS, HEAD_DIM = 16, 2, 64


def layer(dtype, sliding: bool, seed: int):
    config = dataclasses.replace(GptOssConfig.preset("tiny"), head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                 num_key_value_heads=KV_HEADS, sliding_window=WINDOW)
    attn = model_lib.Attention(config, 0 if sliding else 1, dtype)
    assert attn.sliding == sliding
    attn.sinks[...] = jnp.asarray(np.random.default_rng(seed).normal(0, 1, HEADS), dtype)
    return attn


def step_inputs(dtype, sliding: bool, slots: int, query_positions, seed: int):
    """A decode step: random q, new k/v and cache contents; the cache's positions as the
    model's write_cache leaves them after positions 0..p-1 (the ring keeps the newest
    `slots`), NO_POSITION elsewhere."""
    rng = np.random.default_rng(seed)
    batch = len(query_positions)
    normal = lambda *shape: jnp.asarray(rng.normal(0, 1, shape), dtype)
    cache_positions = np.full((batch, slots), model_lib.NO_POSITION, np.int32)
    for row, p in enumerate(query_positions):
        for position in range(max(p, 0)):
            if sliding and position > p - slots:
                cache_positions[row, position % slots] = position
            elif not sliding and position < slots:
                cache_positions[row, position] = position
    return (normal(batch, 1, HEADS, HEAD_DIM), normal(batch, 1, KV_HEADS, HEAD_DIM),
            normal(batch, 1, KV_HEADS, HEAD_DIM), jnp.asarray(np.array(query_positions, np.int32)[:, None]),
            normal(batch, slots, KV_HEADS, HEAD_DIM), normal(batch, slots, KV_HEADS, HEAD_DIM),
            jnp.asarray(cache_positions))


def reference(attn, q, k_new, v_new, positions, cache_k, cache_v, cache_positions):
    return attn.attend(q, jnp.concatenate([cache_k, k_new], 1), jnp.concatenate([cache_v, v_new], 1), positions,
                       jnp.concatenate([cache_positions, positions], 1))


# Full layers: 300 slots in blocks of 128 (the last block runs past the cache), a row at the
# first position, one at the last slot, a padding row. Sliding layers: the 128-slot ring
# before and after it wraps.
CASES = [(False, 300, [5, 299, -1]), (True, WINDOW, [5, 300, 129])]


@pytest.mark.parametrize("sliding, slots, query_positions", CASES)
def test_bf16_matches_attend(sliding, slots, query_positions):
    attn = layer(jnp.bfloat16, sliding, seed=1)
    inputs = step_inputs(jnp.bfloat16, sliding, slots, query_positions, seed=2)
    got = attention_tpu.decode_attention_tpu(*inputs, attn.sinks[...], window=WINDOW if sliding else None,
                                             interpret=True, block=128)
    want = reference(attn, *inputs)
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # The reference's roundings; another fp32 summation order flips rare bf16 ulps.
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    assert np.mean(got == want) > 0.99
    padding = np.array(query_positions) < 0
    assert not np.any(got[padding]) and np.all(np.any(got[~padding] != 0, axis=(1, 2, 3)))


@pytest.mark.parametrize("sliding, slots, query_positions", CASES)
def test_tpu_interpreter_dmas_and_dynamic_grid(sliding, slots, query_positions):
    """Pallas' TPU interpreter simulates the DMAs and VMEM (uninitialized VMEM reads NaN,
    out-of-bounds reads raise): the dynamic grid, the clamped block indices and the block
    past the cache's end give the reference's values."""
    attn = layer(jnp.bfloat16, sliding, seed=1)
    inputs = step_inputs(jnp.bfloat16, sliding, slots, query_positions, seed=2)
    got = attention_tpu.decode_attention_tpu(*inputs, attn.sinks[...], window=WINDOW if sliding else None,
                                             interpret=pltpu.InterpretParams(), block=128)
    want = np.asarray(reference(attn, *inputs), np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    assert np.mean(np.asarray(got, np.float32) == want) > 0.99


@pytest.mark.parametrize("sliding, slots, query_positions", [(False, 300, [5, 200, 0]), (True, WINDOW, [400, 127, -1])])
def test_fp32_matches_attend_tightly(sliding, slots, query_positions):
    attn = layer(jnp.float32, sliding, seed=3)
    inputs = step_inputs(jnp.float32, sliding, slots, query_positions, seed=4)
    got = attention_tpu.decode_attention_tpu(*inputs, attn.sinks[...], window=WINDOW if sliding else None,
                                             interpret=True, block=128)
    want = np.asarray(reference(attn, *inputs))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_reads_only_valid_blocks():
    """Keys and values beyond the query's position are never read: poisoning them with NaN
    changes nothing (a full layer of 4 blocks with the query in block 1)."""
    attn = layer(jnp.float32, False, seed=5)
    q, k_new, v_new, positions, cache_k, cache_v, cache_positions = step_inputs(jnp.float32, False, 512, [200],
                                                                               seed=6)
    run = lambda k, v: np.asarray(attention_tpu.decode_attention_tpu(
        q, k_new, v_new, positions, k, v, cache_positions, attn.sinks[...], window=None, interpret=True, block=128))
    clean = run(cache_k, cache_v)
    poisoned = run(cache_k.at[:, 256:].set(jnp.nan), cache_v.at[:, 256:].set(jnp.nan))
    np.testing.assert_array_equal(poisoned, clean)


def test_bad_shapes():
    inputs = step_inputs(jnp.bfloat16, False, 256, [3], seed=7)
    sinks = jnp.zeros(HEADS, jnp.bfloat16)
    with pytest.raises(ValueError, match="one new token"):
        attention_tpu.decode_attention_tpu(jnp.concatenate([inputs[0]] * 2, 1), *inputs[1:], sinks, window=None,
                                           interpret=True)
    with pytest.raises(ValueError, match="sinks"):
        attention_tpu.decode_attention_tpu(*inputs, sinks[:4], window=None, interpret=True)
    with pytest.raises(ValueError, match="block"):
        attention_tpu.decode_attention_tpu(*inputs, sinks, window=None, interpret=True, block=100)


def test_lowers_to_mosaic_tpu_at_model_shapes():
    s = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = (s((1, 1, 64, 64), bf), s((1, 1, 8, 64), bf), s((1, 1, 8, 64), bf), s((1, 1), jnp.int32),
            s((1, 4096, 8, 64), bf), s((1, 4096, 8, 64), bf), s((1, 4096), jnp.int32), s((64,), bf))
    lowered = jax.jit(lambda *a: attention_tpu.decode_attention_tpu(*a, window=None, interpret=False)).trace(
        *args).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 1
