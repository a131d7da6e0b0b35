"""How the XLA expert path that training uses (`MoE.experts_grouped`: jax.lax.ragged_dot on
the dequantized experts) runs on a GPU, against a dense GEMM of the same useful work, at the
gpt-oss-20b mlp1 shape for 2,048 tokens x top-4 (8,192 rows over 32 experts, 256 each).
Not part of CI.

    python benchmarks/ragged_check.py --json ragged.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, *args, repeats=10):
    jax.block_until_ready(fn(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=2880)
    parser.add_argument("--outputs", type=int, default=5760)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows, e, i, o = args.rows, args.experts, args.inputs, args.outputs
    key = jax.random.key(0)
    x = jax.random.normal(key, (rows, i), jnp.bfloat16)
    w = jax.random.normal(key, (e, i, o), jnp.bfloat16) * 0.02
    sizes = jnp.full((e,), rows // e, jnp.int32)

    def ragged(x, w):
        return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    def dense(x, w):  # the same useful FLOPs: every row against one expert
        return jnp.dot(x, w[0], preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    def batched(x, w):  # rows grouped [e, rows/e, in] (balanced groups), one batched GEMM
        return jnp.einsum("egi,eio->ego", x.reshape(e, rows // e, i), w,
                          preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    results = {}
    variants = [("ragged_dot", ragged, False), ("dense_one_expert", dense, False), ("batched_balanced", batched, False)]
    if hasattr(jax.config, "jax_ragged_dot_use_gpu_pallas_triton_lowering"):
        variants.insert(1, ("ragged_dot_pallas_triton", ragged, True))  # jax's own Triton lowering, off by default
    for name, fn, triton in variants:
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", triton)
        try:
            check(name, fn, x, w, results, rows, i, o)
        except Exception as e:  # noqa: BLE001 - a variant that fails is recorded, the others still run
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            print(name, results[name], flush=True)
    jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", False)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
           "command": " ".join(["python", *sys.argv]), "shape": [rows, e, i, o], "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def check(name, fn, x, w, results, rows, i, o):
    forward = jax.jit(fn)
    backward = jax.jit(jax.grad(lambda x, w, fn=fn: fn(x, w).astype(jnp.float32).sum()))
    compiled = forward.lower(x, w).compile()
    memory = compiled.memory_analysis()
    results[name] = {"forward_s": timed(forward, x, w), "grad_x_s": timed(backward, x, w),
                     "forward_temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
    flops = 2 * rows * i * o
    results[name]["forward_tflops"] = flops / results[name]["forward_s"] / 1e12
    print(name, results[name], flush=True)
    if name.startswith("ragged_dot"):
        text = compiled.as_text()
        results[name]["hlo_ops"] = sorted({line.split("=")[1].split("(")[0].strip().split(" ")[-1]
                                           for line in text.splitlines() if " = " in line and "(" in line})[:80]
        custom = [line.strip()[:200] for line in text.splitlines() if "custom_call_target" in line]
        results[name]["custom_calls"] = custom[:10]
        print("custom calls:", custom[:10], flush=True)


if __name__ == "__main__":
    main()
