"""MXFP4 experts as ml_dtypes arrays: `float4_e2m1fn` values in blocks of 32 along the
contraction axis, one `float8_e8m0fnu` scale per block (docs/architecture.md 3.3).

A checkpoint byte holds element 2j in its low nibble and 2j+1 in its high nibble, which is
exactly what `lax.bitcast_convert_type(uint8[..., 16], float4_e2m1fn)` produces, so going
from the checkpoint to FP4 arrays and back is a bitcast, never a re-quantization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP4 = jnp.float4_e2m1fn
E8M0 = jnp.float8_e8m0fnu
BLOCK = 32
BYTES_PER_BLOCK = BLOCK // 2
NAN_SCALE = 255  # E8M0 reserves 0xFF for NaN
# Up to this scale 2^(scale - 1) is a finite bf16, so the grouped GEMM kernel may decode FP4
# straight to bf16 (every trained checkpoint's scales sit far below).
BF16_DECODE_MAX_SCALE = 128

def blocks_to_fp4(blocks):
    """uint8 [..., G, 16] checkpoint bytes -> float4_e2m1fn [..., G, 32] (a bitcast)."""
    blocks = jnp.asarray(blocks, jnp.uint8)
    fp4 = jax.lax.bitcast_convert_type(blocks, FP4)
    return fp4.reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)


def fp4_to_blocks(fp4):
    """float4_e2m1fn [..., G, 32] -> the checkpoint's uint8 [..., G, 16] (a bitcast)."""
    pairs = fp4.reshape(*fp4.shape[:-1], fp4.shape[-1] // 2, 2)
    return jax.lax.bitcast_convert_type(pairs, jnp.uint8)


def scales_to_e8m0(scales):
    return jax.lax.bitcast_convert_type(jnp.asarray(scales, jnp.uint8), E8M0)


def e8m0_to_scales(e8m0):
    return jax.lax.bitcast_convert_type(e8m0, jnp.uint8)


def blocks_to_fp4_numpy(blocks: np.ndarray) -> np.ndarray:
    """Host version of `blocks_to_fp4` (one byte per element, as ml_dtypes stores FP4)."""
    low, high = blocks & 0x0F, blocks >> 4
    codes = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)
    return codes.view(ml_dtypes.float4_e2m1fn)


def dequantize(fp4, scales, dtype=jnp.bfloat16):
    """FP4 values [..., G, 32] and E8M0 scales [..., G] -> dtype [..., G*32].

    value * 2^(scale - 127), rounded like `torch.ldexp`, but built from the bits so that no
    subnormal intermediate is flushed to zero (XLA's CPU backend flushes some): results at
    the bottom of the exponent range are exact subnormals. Scale 255 (NaN) is refused at
    load time; here it gives +-inf.
    """
    # Flat [..., G*32] with the scale repeated per element: on a TPU a minor axis of 32 would be
    # padded to 128 lanes, and the integer temporaries of a whole experts tensor with it.
    flat = (*fp4.shape[:-2], fp4.shape[-2] * fp4.shape[-1])
    codes = jax.lax.bitcast_convert_type(fp4, jnp.uint4).astype(jnp.int32).reshape(flat)
    scale = jnp.repeat(jax.lax.bitcast_convert_type(scales, jnp.uint8).astype(jnp.int32), fp4.shape[-1], axis=-1)
    magnitude = codes & 7
    sign = (codes >> 3) << 31
    # Magnitudes 1..7 are 0.5, 1, 1.5, 2, 3, 4, 6 = 1.m * 2^e: e = -1 for code 1, else (code >> 1) - 1;
    # m = code & 1 from code 2 on. Arithmetic, not a table lookup: XLA gathers would not fuse.
    normal_code = magnitude >= 2
    mantissa = jnp.where(normal_code, magnitude & 1, 0)
    biased = jnp.where(normal_code, (magnitude >> 1) - 1, -1) + scale  # fp32 biased exponent of the result
    normal = (biased << 23) | (mantissa << 22)
    subnormal = ((1 << 23) | (mantissa << 22)) >> jnp.clip(1 - biased, 0, 31)
    bits = jnp.where(biased >= 1, normal, subnormal)
    bits = jnp.where(biased >= 255, 0x7F800000, bits)
    bits = jnp.where(magnitude == 0, 0, bits) | sign
    bits = bits.astype(jnp.uint32)
    if jnp.dtype(dtype) == jnp.bfloat16:
        # The low 16 bits are zero, so the bf16 value is the same number.
        return jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def scales_at_most(limit: int, *scales) -> bool:
    """Whether every E8M0 scale in the (concrete) arrays is at most `limit`."""
    return all(int(jnp.max(e8m0_to_scales(s))) <= limit for s in scales)


def fp4_nbytes(array) -> int:
    """Bytes an FP4 array takes in device memory (packed two per byte; `.nbytes` says one)."""
    if array.dtype == FP4:
        return (array.size + 1) // 2
    return array.size * array.dtype.itemsize


def quantize(w):
    """Weights [..., K] (K a multiple of 32) -> MXFP4: FP4 values [..., K/32, 32] and E8M0
    scales [..., K/32]. Each block of 32 takes the smallest power-of-two scale that fits its
    largest magnitude within FP4's 6 (so nothing is clipped), and each value rounds to the
    nearest FP4 value, ties to even."""
    w = jnp.asarray(w, jnp.float32)
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    mantissa, exponent = jnp.frexp(amax / 6)  # amax / 6 = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = jnp.clip(jnp.where(mantissa == 0.5, exponent - 1, exponent), -127, 127)
    exponent = jnp.minimum(jnp.where(_times_power_of_two(amax, -exponent) > 6, exponent + 1, exponent), 127)
    values = _times_power_of_two(blocks, -exponent[..., None])
    return values.astype(FP4), scales_to_e8m0((exponent + 127).astype(jnp.uint8))


def fake_quantize(w):
    """`w` rounded to MXFP4 and back, in fp32 (see `quantize`)."""
    fp4, scales = quantize(w)
    return dequantize(fp4, scales, jnp.float32).reshape(jnp.shape(w))


def _times_power_of_two(x, exponent):
    """x * 2^exponent for integer exponents in [-127, 127], in two steps so that no factor
    is a subnormal (which XLA's CPU backend may flush to zero)."""
    def power(e):
        return jax.lax.bitcast_convert_type(((e + 127) << 23).astype(jnp.int32), jnp.float32)

    half = exponent // 2
    return x * power(half) * power(exponent - half)
