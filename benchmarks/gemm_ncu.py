"""One grouped-GEMM call per projection at batch 64 (256 pairs, 20b shapes, the decode tiling
with the bf16 decode), to profile under Nsight Compute (needs a GPU; not part of CI):

    ncu --set full -k regex:grouped_gemm -c 2 python benchmarks/gemm_ncu.py > gemm_ncu.txt
    ncu ... python benchmarks/gemm_ncu.py '{"block_n": 64}'     # a tuning on top of the default

docs/performance.md entry 49 reads its report.
"""

import ast
import sys

import jax
import jax.numpy as jnp

from gptoss_jax.kernels import moe_gemm


def random_experts(key, rows, features, experts=32):
    """Packed FP4 bytes, scales in [118, 128) (the bf16 decode's exact range), bias."""
    k1, k2, k3 = jax.random.split(key, 3)
    return (jax.random.randint(k1, (experts, rows, features // 32, 16), 0, 256, jnp.int32).astype(jnp.uint8),
            jax.random.randint(k2, (experts, rows, features // 32), 118, 128, jnp.int32).astype(jnp.uint8),
            jax.random.normal(k3, (experts, rows)).astype(jnp.bfloat16))


def main():
    extra = ast.literal_eval(sys.argv[1]) if len(sys.argv) > 1 else {}  # a dict literal of grouped_gemm tunings
    w1, w2 = random_experts(jax.random.key(1), 5760, 2880), random_experts(jax.random.key(2), 2880, 2880)
    h = jax.random.normal(jax.random.key(3), (64, 2880)).astype(jnp.bfloat16)
    ids = jax.lax.top_k(jax.random.normal(jax.random.key(4), (64, 32)), 4)[1]  # 4 distinct experts per token
    tuning = dict(moe_gemm.default_tuning(256, 32), bf16_decode=True, **extra)
    schedule = moe_gemm.tile_schedule(ids.reshape(-1), 32, tuning["block_m"])
    x = moe_gemm.parity_planes(h[schedule.order // 4])
    mlp1 = jax.jit(lambda x, s, w: moe_gemm.grouped_gemm(x, s, *w, swiglu_params=(7.0, 1.702), **tuning))
    a = jax.block_until_ready(mlp1(x, schedule, w1))
    mlp2 = jax.jit(lambda a, s, w: moe_gemm.grouped_gemm(a, s, *w, **tuning))
    jax.block_until_ready(mlp2(a, schedule, w2))
    print("tuning", tuning)


if __name__ == "__main__":
    main()
