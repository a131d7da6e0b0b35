"""Probe (not part of the package or CI; docs/performance-log.md entry 41): could the batch-1
MXFP4 expert GEMV run on tensor cores with the FP4 -> bf16 decode done after Triton's
layout change, in the MMA operand's registers?

Each program: `rows` weight rows of one (token, expert) pair as the MMA's M side, the token
as column 0 of a 16-column B operand (the other columns zero), the even and odd elements of
each 32-value block as two dots over their packed bytes' low and high nibbles. Decode: the
FP4 bits placed as a bf16 (value * 2^-126, the 0.5 code a bf16 subnormal) and multiplied by
the block scale as the bf16 2^(s-1) (exact for scales 0..128), either with jnp integer ops
(`ptx=False`) or one inline-PTX routine per 4 bytes (`ptx=True`: the grouped GEMM's
`moe_gemm._dequantized_bf16`, docs/performance-log.md entry 46). Offline (Triton 3.9,
benchmarks/triton_offline.py's compile) the uint8 -> MMA-operand conversion happens before
the decode, as hoped; this script checks the result against the dequantized reference on
a GPU and times it against `moe.expert_gemv`:

    python benchmarks/tc_gemv_probe.py --json tc_probe.json
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gptoss_jax.kernels import moe_gemm

F32 = jnp.float32
U16 = jnp.uint16


def decode_bf16(w_u8, s_u8, half):
    """w [rows, bps, 16] uint8, s [rows, bps] uint8 -> even, odd bf16 [rows, bps*16], value * 2^(s-127).
    Exact for scales 0..128."""
    rows, bps, _ = w_u8.shape
    w = w_u8.astype(U16)
    lo = ((w & 0x7) << 6) | ((w & 0x8) << 12)
    hi = ((w & 0x70) << 2) | ((w & 0x80) << 8)
    lo = jax.lax.bitcast_convert_type(lo, jnp.bfloat16)
    hi = jax.lax.bitcast_convert_type(hi, jnp.bfloat16)
    sc = jax.lax.bitcast_convert_type((s_u8.astype(U16) + 126) << 7, jnp.bfloat16)
    sc = jnp.broadcast_to(sc[:, :, None], (rows, bps, 16))
    return (lo * sc).reshape(rows, half), (hi * sc).reshape(rows, half)


def _kernel(expert_ref, x_ref, w_ref, s_ref, out_ref, *, rows, bps, num_blocks, cols, pairs_per_x, ptx):
    from jax.experimental.pallas import triton as plgpu
    p, r = pl.program_id(0), pl.program_id(1)
    e = expert_ref[p]
    xrow = p // pairs_per_x
    steps = -(-num_blocks // bps)
    half = bps * 16
    col0 = (jnp.arange(cols) == 0)[None, :]

    def body(i, acc):
        start = i * bps
        ok = start + jnp.arange(bps) < num_blocks
        w = plgpu.load(w_ref.at[e, pl.ds(r * rows, rows), pl.ds(start, bps), :],
                       mask=jnp.broadcast_to(ok[None, :, None], (rows, bps, 16)), other=0)
        s = plgpu.load(s_ref.at[e, pl.ds(r * rows, rows), pl.ds(start, bps)],
                       mask=jnp.broadcast_to(ok[None, :], (rows, bps)), other=0)
        xm = jnp.broadcast_to(ok[:, None], (bps, 16)).reshape(half, 1)
        xe = plgpu.load(x_ref.at[xrow, pl.ds(start * 16, half), pl.ds(0, 1)], mask=xm, other=0)
        xo = plgpu.load(x_ref.at[xrow, pl.ds(start * 16, half), pl.ds(1, 1)], mask=xm, other=0)
        lo, hi = moe_gemm._dequantized_bf16(w, s) if ptx else decode_bf16(w, s, half)
        be = jnp.where(col0, xe, jnp.zeros((), xe.dtype)).astype(jnp.bfloat16)
        bo = jnp.where(col0, xo, jnp.zeros((), xo.dtype)).astype(jnp.bfloat16)
        return acc + plgpu.dot(lo, be) + plgpu.dot(hi, bo)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, cols), F32))
    out_ref[...] = jnp.sum(acc, axis=1).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rows", "bps", "cols", "num_warps", "num_stages", "pairs_per_x", "interpret", "ptx"))
def tc_gemv(x, pair_expert, w_bytes, w_scales, *, pairs_per_x=1, rows=16, bps=8, cols=16, num_warps=4, num_stages=1,
            interpret=False, ptx=False):
    from jax.experimental.pallas import triton as plgpu
    d = x.shape[1]
    _, out_rows, num_blocks, _ = w_bytes.shape
    pairs = pair_expert.shape[0]
    kernel = functools.partial(_kernel, rows=rows, bps=bps, num_blocks=num_blocks, cols=cols, pairs_per_x=pairs_per_x, ptx=ptx)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((pairs, out_rows), F32), grid=(pairs, out_rows // rows),
        in_specs=[anywhere] * 4, out_specs=pl.BlockSpec((None, rows), lambda p, r: (p, r)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="tc_gemv",
    )(pair_expert.astype(jnp.int32), x.reshape(x.shape[0], d // 2, 2), w_bytes, jax.lax.bitcast_convert_type(w_scales, jnp.uint8))


def main():
    import argparse
    import datetime
    import json
    from pathlib import Path

    import numpy as np
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gemv_sweep import CALLS, kernel_us

    from gptoss_jax import mxfp4
    from gptoss_jax.kernels import moe

    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "command": " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "results": []}
    experts, out_rows, features = 32, 5760, 2880
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    raw = jax.random.randint(k1, (experts, out_rows, features // 32, 16), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.randint(k2, (experts, out_rows, features // 32), 112, 129, jnp.int32).astype(jnp.uint8)
    bias = jnp.zeros((experts, out_rows), jnp.bfloat16)
    x = jax.random.normal(k3, (1, features), F32).astype(jnp.bfloat16)
    ids = [jnp.arange(4 * i, 4 * i + 4, dtype=jnp.int32) % experts for i in range(CALLS)]
    w = mxfp4.dequantize(mxfp4.blocks_to_fp4(raw[:4]), mxfp4.scales_to_e8m0(scales[:4]), F32)
    ref = np.asarray(jnp.einsum("d,pod->po", x[0].astype(F32), w, precision=jax.lax.Precision.HIGHEST))
    del w
    nbytes = 4 * out_rows * features // 32 * 17

    def record(row):
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    cases = [("expert_gemv", {}, lambda pe: moe.expert_gemv(x, pe, raw, scales, bias, pairs_per_x=4), "mxfp4_expert_gemv")]
    for v in [dict(rows=64, bps=8, num_warps=4, ptx=True), dict(rows=64, bps=4, num_warps=4, ptx=True),
              dict(rows=128, bps=4, num_warps=8, ptx=True), dict(rows=16, bps=8, num_warps=1, ptx=True),
              dict(rows=64, bps=8, num_warps=4, ptx=False)]:
        cases.append(("tc_gemv", v, lambda pe, v=v: tc_gemv(x, pe, raw, scales, pairs_per_x=4, **v), "tc_gemv"))
    for name, v, fn, kernel in cases:
        row = {"kernel": name, **v}
        try:
            out = np.asarray(fn(ids[0]), np.float32)
            row["max_abs_err_over_max"] = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
            row["bit_equal_fraction_bf16"] = float(np.mean(out.astype(jnp.bfloat16) == ref.astype(jnp.bfloat16)))
            us = kernel_us(fn, [(pe,) for pe in ids], kernel)
            row.update(us=us, gb_per_s=nbytes / us / 1e3)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        record(row)


if __name__ == "__main__":
    main()
