import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_jax import mxfp4

EXTREME_SCALES = np.array([0, 1, 2, 3, 60, 126, 127, 128, 200, 251, 252, 253, 254], np.uint8)


@pytest.mark.parametrize("torch_dtype, dtype", [(torch.bfloat16, jnp.bfloat16), (torch.float32, jnp.float32)])
@pytest.mark.parametrize("scale_pool", ["extremes", "uniform"])
def test_dequantize_is_bit_identical_to_transformers(torch_dtype, dtype, scale_pool):
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, (3, 48, 5, 16), dtype=np.uint8)
    if scale_pool == "extremes":
        scales = rng.choice(EXTREME_SCALES, (3, 48, 5))
    else:
        scales = rng.integers(0, 255, (3, 48, 5), dtype=np.uint8)
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch_dtype)
    ref = ref.transpose(1, 2).contiguous().float().numpy()  # back to [experts, rows, inputs]
    ours = jax.jit(lambda b, s: mxfp4.dequantize(mxfp4.blocks_to_fp4(b), mxfp4.scales_to_e8m0(s), dtype))(blocks, scales)
    ours = np.asarray(ours).astype(np.float32)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    if scale_pool == "extremes":
        assert (np.abs(ref) < np.finfo(np.float32).tiny).any() and np.isinf(ref).any()  # the edges were exercised


def test_bitcasts_round_trip_and_match_the_host_unpacking():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2, 4, 3, 16), dtype=np.uint8)
    fp4 = mxfp4.blocks_to_fp4(blocks)
    assert fp4.dtype == mxfp4.FP4 and fp4.shape == (2, 4, 3, 32)
    np.testing.assert_array_equal(np.asarray(mxfp4.fp4_to_blocks(fp4)), blocks)
    np.testing.assert_array_equal(np.asarray(fp4).view(np.uint8), mxfp4.blocks_to_fp4_numpy(blocks).view(np.uint8))
    scales = rng.integers(0, 255, (5,), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(mxfp4.e8m0_to_scales(mxfp4.scales_to_e8m0(scales))), scales)


def test_low_nibble_is_the_first_element():
    fp4 = np.asarray(mxfp4.blocks_to_fp4(np.array([[0x72] + [0] * 15], np.uint8)))
    assert float(fp4[0, 0]) == 1.0 and float(fp4[0, 1]) == 6.0  # code 2 -> 1.0, code 7 -> 6.0


def test_fp4_bytes_are_counted_packed():
    assert mxfp4.fp4_nbytes(jnp.zeros((4, 32), mxfp4.FP4)) == 64
    assert mxfp4.fp4_nbytes(jnp.zeros((4,), jnp.bfloat16)) == 8
