"""One grouped-GEMM call per projection at batch 64 (256 pairs, 20b shapes, the decode tiling
with the bf16 decode), to profile under Nsight Compute (needs a GPU; not part of CI):

    ncu --set full -k regex:grouped_gemm -c 2 python benchmarks/gemm_ncu.py > gemm_ncu.txt
    ncu ... python benchmarks/gemm_ncu.py '{"block_n": 64}'     # a tuning on top of the default

docs/performance-log.md entry 50 reads its report.
"""

import ast
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import random_experts  # noqa: E402

from gptoss_jax.kernels import (
    common,  # noqa: E402
    moe_gemm,  # noqa: E402
)


def main():
    extra = ast.literal_eval(sys.argv[1]) if len(sys.argv) > 1 else {}  # a dict literal of grouped_gemm tunings
    w1, w2 = random_experts(jax.random.key(1), 32, 5760, 2880), random_experts(jax.random.key(2), 32, 2880, 2880)
    h = jax.random.normal(jax.random.key(3), (64, 2880)).astype(jnp.bfloat16)
    ids = jax.lax.top_k(jax.random.normal(jax.random.key(4), (64, 32)), 4)[1]  # 4 distinct experts per token
    tuning = dict(moe_gemm.default_tuning(256, 32), bf16_decode=True, **extra)
    schedule = common.tile_schedule(ids.reshape(-1), 32, tuning["block_m"])
    x = moe_gemm.parity_planes(h[schedule.order // 4])
    mlp1 = jax.jit(lambda x, s, w: moe_gemm.grouped_gemm(x, s, *w, swiglu_params=(7.0, 1.702), **tuning))
    a = jax.block_until_ready(mlp1(x, schedule, w1))
    mlp2 = jax.jit(lambda a, s, w: moe_gemm.grouped_gemm(a, s, *w, **tuning))
    jax.block_until_ready(mlp2(a, schedule, w2))
    print("tuning", tuning)


if __name__ == "__main__":
    main()
