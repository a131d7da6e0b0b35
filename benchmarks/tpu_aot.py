"""Compiles the TPU kernels for TPU v5e / v6e on this machine (no TPU needed, libtpu must be
installed: pip install "libtpu==0.0.42.*") and prints, per kernel and shape: the compile
time, the compiled memory use (arguments, outputs, temporaries), XLA's cost analysis, the
HBM bytes the kernels' block specs move per call (XLA counts a kernel's whole operands
instead) and what that makes per decoded token.

    python benchmarks/tpu_aot.py [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: no backend but the host's

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax.kernels import moe_tpu, tpu_aot
from gptoss_jax.sharding import mesh as mesh_lib
from gptoss_jax.sharding import rules
from gptoss_jax.sharding.moe import sharded_expert_mix

GB = 1e9


def measure(name, fn, args, block_bytes, layers, tokens=1):
    start = time.perf_counter()
    compiled = tpu_aot.compile_for(fn, *args)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0]
    row = {"kernel": name, "compile_s": round(seconds, 1), "argument_bytes": memory.argument_size_in_bytes,
           "output_bytes": memory.output_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
           "xla_bytes_accessed": int(cost.get("bytes accessed", 0)), "xla_flops": int(cost.get("flops", 0)),
           "block_bytes_per_call": block_bytes, "layers": layers, "tokens_per_call": tokens,
           "block_bytes_per_token": block_bytes * layers // tokens,
           "kernel_calls": tpu_aot.kernel_calls(compiled.as_text())}
    print(f"{name:58s} compile {seconds:5.1f} s  args {row['argument_bytes'] / GB:7.3f} GB  "
          f"temp {row['temp_bytes'] / 2**20:7.2f} MiB  XLA bytes {row['xla_bytes_accessed'] / GB:7.3f} GB  "
          f"blocks/call {block_bytes / 2**20:8.2f} MiB  x{layers} layers / {tokens} = "
          f"{row['block_bytes_per_token'] / GB:6.3f} GB/token",
          flush=True)
    return row


def moe_args(m, tokens, mesh):
    s = jax.ShapeDtypeStruct
    return tpu_aot.placed((s((tokens, m.embed), jnp.bfloat16), s((tokens, m.experts_per_token), jnp.int32),
                           tpu_aot.expert_shapes(m)), mesh)


class ShardedTpuExperts(moe_tpu.TpuExperts):
    """sharding/moe.py counts a device's experts on `mlp1_fp4`."""

    @property
    def mlp1_fp4(self):
        return self.mlp1_bytes


def moe_120b_4x2(tokens):
    m = tpu_aot.GPT_OSS_120B
    mesh = mesh_lib.make_mesh("4x2", devices=tpu_aot.topology("v5e:2x4").devices)
    shapes = tpu_aot.expert_shapes(m, hidden_shards=2)
    params = ShardedTpuExperts(*(jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rules.named_sharding(a, s.shape, mesh))
                                 for s, a in zip(shapes, moe_tpu.TPU_EXPERT_AXES)))
    replicated = NamedSharding(mesh, PartitionSpec())
    s = jax.ShapeDtypeStruct
    tokens_in = [s((tokens, m.embed), jnp.bfloat16, sharding=replicated),
                 s((tokens, 4), jnp.int32, sharding=replicated), s((tokens, 4), jnp.bfloat16, sharding=replicated)]
    mix = tpu_aot.moe_decode_fn()

    def expert_mix(h, experts, weights, w):
        y = mix(h, experts, moe_tpu.TpuExperts(*w))
        return jnp.einsum("nko,nk->no", y, weights, preferred_element_type=jnp.float32)

    def step(h, experts, weights, params):
        return sharded_expert_mix(mesh, expert_mix, h, experts, weights, params,
                                  ShardedTpuExperts(*moe_tpu.TPU_EXPERT_AXES))

    return step, (*tokens_in, params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    m20, m120 = tpu_aot.GPT_OSS_20B, tpu_aot.GPT_OSS_120B
    rows = []
    for chip in ("v5e:1x1", "v6e:1x1"):
        mesh = tpu_aot.one_chip(chip)
        for tokens in (1, 8):
            rows.append(measure(f"moe experts 20b, {tokens} token(s), {chip}", tpu_aot.moe_decode_fn(),
                                moe_args(m20, tokens, mesh), tpu_aot.moe_block_bytes(m20, tokens), m20.layers, tokens))
    rows.append(measure("moe experts 20b, 64-token prefill chunk, v5e:1x1", tpu_aot.moe_decode_fn(),
                        moe_args(m20, 64, tpu_aot.one_chip()), tpu_aot.moe_block_bytes(m20, 64), m20.layers, 64))
    step, step_args = moe_120b_4x2(1)
    rows.append(measure("moe experts 120b, 1 token, per chip of v5e:2x4 (mesh 4x2)", step, step_args,
                        tpu_aot.moe_block_bytes(m120, 1, hidden_shards=2, expert_shards=4), m120.layers))
    for chip in ("v5e:1x1", "v6e:1x1"):
        mesh = tpu_aot.one_chip(chip)
        for batch, slots, position in ((1, 4096, 4095), (1, 131072, 8191), (8, 4096, 4095)):
            rows.append(measure(f"attention full, batch {batch}, {slots} slots at {position + 1}, {chip}",
                                tpu_aot.attention_fn(None),
                                tpu_aot.placed(tpu_aot.attention_shapes(m20, batch, slots), mesh),
                                tpu_aot.attention_block_bytes(m20, batch, slots, position, None), m20.layers // 2,
                                batch))
        rows.append(measure(f"attention sliding ring, batch 1, 128 slots, {chip}", tpu_aot.attention_fn(m20.window),
                            tpu_aot.placed(tpu_aot.attention_shapes(m20, 1, m20.window), mesh),
                            tpu_aot.attention_block_bytes(m20, 1, m20.window, 4095, m20.window), m20.layers // 2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
