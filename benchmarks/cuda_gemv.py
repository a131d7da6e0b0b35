"""The CUDA tensor-core expert GEMVs (kernels/cuda_moe.py) against the Triton ones
(kernels/moe.py): outputs compared on random experts at the 20b shapes and at edge cases,
then device kernel time per call for each compiled tiling (not part of CI; run on a GPU).

    python benchmarks/cuda_gemv.py --json cuda_gemv.json [--variants 0,1,4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import CALLS, kernel_us, random_experts  # noqa: E402

from gptoss_jax.kernels import cuda_moe, moe  # noqa: E402

F32 = jnp.float32
LIMIT, ALPHA = 7.0, 1.702


def ulps(a, b):
    """Largest difference in bf16 units in the last place of b, and how many elements differ."""
    a, b = np.asarray(a.astype(F32)), np.asarray(b.astype(F32))
    scale = np.maximum(np.abs(b), 1e-30)
    ulp = 2.0 ** (np.floor(np.log2(scale)) - 7)
    diff = np.abs(a - b)
    return {"max_ulps": float(np.max(diff / ulp)), "differing": int(np.sum(diff > 0)), "of": int(diff.size),
            "max_abs": float(np.max(diff)), "nonfinite": int(np.sum(~np.isfinite(a)))}


def compare(key, features, out_rows, experts, tokens, k, x_scale=1.0, dead=False, variants=(None, None)):
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
    w1 = random_experts(k1, experts, 2 * out_rows, features)
    w2 = random_experts(k2, experts, features, out_rows)
    x = (jax.random.normal(k3, (tokens, features), F32) * x_scale).astype(jnp.bfloat16)
    ids = jax.random.randint(k4, (tokens * k,), 0, experts, jnp.int32)
    if dead:
        ids = ids.at[0].set(-1).at[-1].set(experts)
    weights = jax.nn.softmax(jax.random.normal(k5, (tokens * k,), F32).reshape(tokens, k), -1).astype(jnp.bfloat16)
    residual = jax.random.normal(k6, (tokens, features), F32).astype(jnp.bfloat16)
    ref_a = moe.expert_gemv(x, ids, *w1, pairs_per_x=k, swiglu_params=(LIMIT, ALPHA))
    a = cuda_moe.gemv_swiglu(x, ids, *w1, pairs_per_x=k, limit=LIMIT, alpha=ALPHA,
                             variant=cuda_moe.pick_variant(variants[0], 0, 2 * out_rows, 1))
    out = {"mlp1+swiglu": ulps(a, ref_a)}
    mv = cuda_moe.pick_variant(variants[1], cuda_moe.DEFAULT_MIX_VARIANT, features, k)
    for name, res in (("mlp2 mix", None), ("mlp2 mix + residual", residual)):
        ref = moe.expert_gemv(ref_a, ids, *w2, weights.reshape(-1), res, pairs_per_program=k)
        got = cuda_moe.gemv_mix(ref_a, ids, *w2, weights.reshape(-1), res, group=k, variant=mv)
        out[name] = ulps(got, ref)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--variants", help="comma-separated variant ids to time (default: all)")
    parser.add_argument("--experts", type=int, default=32)
    args = parser.parse_args()
    report = {"device": str(jax.devices()[0].device_kind), "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "jax": jax.__version__}
    start = time.perf_counter()
    report["reason_unavailable"] = cuda_moe.unavailable_reason()
    report["build_s"] = time.perf_counter() - start
    print(report, flush=True)
    if report["reason_unavailable"]:
        sys.exit(1)

    key = jax.random.PRNGKey(0)
    checks = {
        "20b b1": dict(features=2880, out_rows=2880, experts=32, tokens=1, k=4),
        "20b b1 dead ids": dict(features=2880, out_rows=2880, experts=32, tokens=1, k=4, dead=True),
        "20b b1 x*1e4": dict(features=2880, out_rows=2880, experts=32, tokens=1, k=4, x_scale=1e4),
        "20b b1 x*1e-5": dict(features=2880, out_rows=2880, experts=32, tokens=1, k=4, x_scale=1e-5),
        "20b b3": dict(features=2880, out_rows=2880, experts=32, tokens=3, k=4),
        "small d64 o32 e3 k2 b3": dict(features=64, out_rows=32, experts=3, tokens=3, k=2, dead=True),
        "odd blocks d96 o64 k3": dict(features=96, out_rows=64, experts=5, tokens=2, k=3),
    }
    report["checks"] = {}
    for name, kw in checks.items():
        try:
            report["checks"][name] = compare(key, **kw)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            report["checks"][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(name, report["checks"][name], flush=True)

    features, experts = 2880, args.experts
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w1 = random_experts(k1, experts, 2 * features, features)
    w2 = random_experts(k2, experts, features, features)
    x = jax.random.normal(k3, (1, features), F32).astype(jnp.bfloat16)
    a = jax.random.normal(k4, (4, features), F32).astype(jnp.bfloat16)
    weights = jnp.asarray([0.4, 0.3, 0.2, 0.1], jnp.bfloat16)
    residual = x
    ids = [(jnp.arange(4 * i, 4 * i + 4, dtype=jnp.int32) % experts,) for i in range(CALLS)]
    nbytes = {"mlp1": 4 * 2 * features * features // 32 * 17, "mlp2": 4 * features * features // 32 * 17}
    rows = []

    def timed(matrix, label, fn, name_part):
        row = {"matrix": matrix, "kernel": label}
        try:
            us = kernel_us(fn, ids, name_part)
            row.update(us=us, gb_per_s=nbytes[matrix] / us / 1e3)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        rows.append(row)

    timed("mlp1", "triton", lambda pe: moe.expert_gemv(x, pe, *w1, pairs_per_x=4, swiglu_params=(LIMIT, ALPHA)),
          "mxfp4_expert_gemv")
    timed("mlp2", "triton", lambda pe: moe.expert_gemv(a, pe, *w2, weights, residual, pairs_per_program=4),
          "mxfp4_expert_gemv")
    chosen = [int(v) for v in args.variants.split(",")] if args.variants else sorted(cuda_moe.VARIANTS)
    for v in chosen:
        timed("mlp1", f"cuda {v} {cuda_moe.VARIANTS[v]}",
              lambda pe, v=v: cuda_moe.gemv_swiglu(x, pe, *w1, pairs_per_x=4, limit=LIMIT, alpha=ALPHA, variant=v),
              "gemv_kernel")
        if 32 * cuda_moe.VARIANTS[v][1] * 4 <= 256:
            timed("mlp2", f"cuda {v} {cuda_moe.VARIANTS[v]}",
                  lambda pe, v=v: cuda_moe.gemv_mix(a, pe, *w2, weights, residual, group=4, variant=v), "gemv_kernel")
    report["timings"] = rows
    for m in nbytes:
        ok = sorted((r for r in rows if r["matrix"] == m and "us" in r), key=lambda r: r["us"])
        print("best", m, ok[:3])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
