"""Compile the Pallas Triton kernels for an H100 without a GPU: registers, spills, shared
memory, layout conversions and the SASS instruction mix, to try kernel variants before
spending device time (not part of CI).

The TTIR comes from the Pallas lowering on this machine (lowering for "cuda" needs no GPU);
pip's Triton compiles it for sm_90 and its bundled cuobjdump reads the cubin. XLA compiles
with its own Triton fork, so treat the numbers as close, not equal: for the mlp1 GEMV both
report 96 registers (ncu, docs/performance-log.md entry 33). Needs Triton in its own
environment (it pins its own LLVM; keep it out of the project's):

    python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton
    python benchmarks/triton_offline.py mlp1 --set rows=8 blocks_per_step=32 --triton-python /tmp/tvenv/bin/python

Kernels: mlp1 (GEMV + SwiGLU, 4 pairs), mlp2_sum4 (GEMV summing a token's 4 experts),
norm_qkv, output_residual, at the gpt-oss-20b shapes. --set passes keyword arguments to
the kernel (Python literals). Writes KERNEL.{ttir,ttgir,ptx,sass} under --out.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

BF16 = jnp.bfloat16

# Run by --triton-python: compile one .ttir and summarize (argv: path, num_warps, num_stages).
COMPILE = r"""
import collections, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
stem = os.path.splitext(path)[0]
for kind in ("ttgir", "ptx"):
    open(f"{stem}.{kind}", "w").write(k.asm[kind])
open(stem + ".cubin", "wb").write(k.asm["cubin"])
tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
usage = subprocess.run([f"{tools}/cuobjdump", "-res-usage", stem + ".cubin"], capture_output=True, text=True).stdout
sass = subprocess.run([f"{tools}/cuobjdump", "-sass", stem + ".cubin"], capture_output=True, text=True).stdout
open(stem + ".sass", "w").write(sass)
ops = collections.Counter(m.group(2).split(".")[0] for m in
                          (re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", l) for l in sass.splitlines()) if m)
print(usage.strip().splitlines()[-1].strip())
print("SASS instructions (static):", sum(ops.values()), dict(ops.most_common(16)))
print("convert_layout:", k.asm["ttgir"].count("ttg.convert_layout"), " bar.sync in PTX:", k.asm["ptx"].count("bar.sync"))
"""


def kernel_calls():
    """name -> (function of **kwargs, arguments, default num_warps): the 20b shapes."""
    from gptoss_jax.kernels import moe, projection

    z = jnp.zeros
    mlp1 = (z((32, 5760, 90, 16), jnp.uint8), z((32, 5760, 90), jnp.uint8), z((32, 5760), BF16))
    mlp2 = (z((32, 2880, 90, 16), jnp.uint8), z((32, 2880, 90), jnp.uint8), z((32, 2880), BF16))
    pairs = jnp.arange(4, dtype=jnp.int32)
    return {
        "mlp1": (lambda x, pe, w, s, b, **kw: moe.expert_gemv(x, pe, w, s, b, pairs_per_x=4, swiglu_params=(7.0, 1.702), **kw),
                 (z((1, 2880), BF16), pairs, *mlp1), 4),
        "mlp2_sum4": (lambda a, pe, w, s, b, wt, r, **kw: moe.expert_gemv(a, pe, w, s, b, wt, r, pairs_per_program=4, **kw),
                      (z((4, 2880), BF16), pairs, *mlp2, z((4,), BF16), z((1, 2880), BF16)), 4),
        "norm_qkv": (lambda *a, **kw: projection.norm_qkv(*a, eps=1e-5, **kw),
                     (z((2880,), BF16), z((2880,), BF16), z((64, 64, 2880), BF16), z((64, 64), BF16),
                      z((8, 64, 2880), BF16), z((8, 64), BF16), z((8, 64, 2880), BF16), z((8, 64), BF16)), 8),
        "output_residual": (projection.output_residual,
                            (z((64, 64), BF16), z((2880, 64, 64), BF16), z((2880,), BF16), z((2880,), BF16)), 8),
    }


def ttir_of(fn, args) -> list[str]:
    """The TTIR text of every Pallas Triton kernel that lowering fn(*args) for cuda emits."""
    from jax._src.pallas.triton import lowering, pallas_call_registration

    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original
    return captured


def main():
    calls = kernel_calls()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", choices=sorted(calls))
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="kernel keyword arguments")
    parser.add_argument("--triton-python", required=True, help="a Python with pip's triton installed")
    parser.add_argument("--out", default="/tmp/triton_offline")
    args = parser.parse_args()
    kwargs = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected NAME=VALUE, e.g. rows=8")
        try:
            kwargs[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f"--set {item!r}: the value must be a Python literal, e.g. rows=8 or use_ptx=False")
    fn, call_args, warps = calls[args.kernel]
    warps = kwargs.get("num_warps", warps)
    stages = kwargs.get("num_stages", 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(ttir_of(lambda *a: fn(*a, **kwargs), call_args)):
        path = out / f"{args.kernel}{i or ''}.ttir"
        path.write_text(text)
        print(f"{path} (num_warps={warps}, num_stages={stages})", flush=True)
        done = subprocess.run([args.triton_python, "-c", COMPILE, str(path), str(warps), str(stages)],
                              env={**os.environ, "TRITON_DEFAULT_FP_FUSION": "0"}, text=True)
        if done.returncode:
            sys.exit(done.returncode)


if __name__ == "__main__":
    main()
