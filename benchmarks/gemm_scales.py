"""Grouped GEMM with row-major vs block-major scales (moe_gemm.block_major_scales, an
experiment: docs/performance.md entry 50): device kernel time per call at 256 and 2048
pairs, 20b shapes, bf16 decode. Needs a GPU; writes $OUT/gemm_scales.json.

    python benchmarks/gemm_scales.py
"""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax, jax.numpy as jnp, numpy as np
from gemv_sweep import kernel_us
from gptoss_jax.kernels import moe_gemm
def experts(k, rows, feats):
    k1, k2, k3 = jax.random.split(k, 3)
    return (jax.random.randint(k1, (32, rows, feats // 32, 16), 0, 256, jnp.int32).astype(jnp.uint8),
            jax.random.randint(k2, (32, rows, feats // 32), 118, 128, jnp.int32).astype(jnp.uint8),
            jax.random.normal(k3, (32, rows)).astype(jnp.bfloat16))
results = []
for pairs in (256, 2048):
    for name, rows, swiglu in (("mlp1", 5760, True), ("mlp2", 2880, False)):
        copies = [experts(jax.random.key(10 * i + rows), rows, 2880) for i in range(3)]
        h = jax.random.normal(jax.random.key(3), (pairs // 4, 2880)).astype(jnp.bfloat16)
        ids = jax.lax.top_k(jax.random.normal(jax.random.key(4), (pairs // 4, 32)), 4)[1]
        t = dict(moe_gemm.default_tuning(pairs, 32), bf16_decode=True)
        sched = moe_gemm.tile_schedule(ids.reshape(-1), 32, t["block_m"])
        x = moe_gemm.parity_planes(h[sched.order // 4])
        if not swiglu:
            x = x[:, :, :1440]
        sp = (7.0, 1.702) if swiglu else None
        f = lambda w, s, b: moe_gemm.grouped_gemm(x, sched, w, s, b, swiglu_params=sp, **t)
        base = None
        for layout in ("rows", "blocks"):
            args = [(w, s if layout == "rows" else moe_gemm.block_major_scales(s, swiglu), b) for w, s, b in copies]
            out = np.asarray(f(*args[0]).astype(jnp.float32))
            base = out if base is None else base
            us = kernel_us(f, args, "grouped_gemm")
            row = dict(pairs=pairs, matrix=name, scales=layout, us=us, equal=bool(np.array_equal(out, base)))
            print(json.dumps(row), flush=True)
            results.append(row)
json.dump(dict(device=jax.devices()[0].device_kind, results=results), open(os.environ.get("OUT", "/tmp") + "/gemm_scales.json", "w"), indent=1)
