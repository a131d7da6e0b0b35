"""The clamped SwiGLU's bf16 results on an accelerator for every pair of bf16 inputs that matter,
three ways: the XLA path (`MoE.swiglu`), the Pallas kernels' epilogue (`common.swiglu_pair`
inside a Triton kernel) and PyTorch's ops as OpenAI's reference runs them on the same device.
Prints the share of elements where each differs from torch (GPU; not CI).

    python benchmarks/swiglu_check.py --json swiglu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels.common import swiglu_pair
from gptoss_jax.model import MoE

LIMIT, ALPHA = 7.0, 1.702


def all_bf16_in(low: float, high: float) -> np.ndarray:
    """Every finite bf16 value in [low, high] of magnitude 0 or at least 2^-100: XLA flushes
    subnormal inputs and results to zero on CPUs and GPUs and torch keeps them (a platform
    convention, not a rounding difference), so gates near 2^-126 are left out."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = bits.view(jnp.bfloat16).astype(np.float32)
    normal = (values == 0) | (np.abs(values) >= 2.0**-100)
    keep = np.isfinite(values) & normal & (values >= low) & (values <= high)
    return values[keep].astype(jnp.bfloat16)


def torch_swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def t(a):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device)

    x_glu, x_linear = t(gate), t(up)
    x_glu = x_glu.clamp(min=None, max=LIMIT)
    x_linear = x_linear.clamp(min=-LIMIT, max=LIMIT)
    out = x_glu * torch.sigmoid(ALPHA * x_glu) * (x_linear + 1)
    return out.cpu().view(torch.int16).numpy().view(jnp.bfloat16)


def xla_swiglu(gate, up):
    moe = MoE(GptOssConfig.preset("tiny"), jnp.bfloat16)  # swiglu reads only the config (limit 7, alpha 1.702)
    interleaved = jnp.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)
    return jax.jit(moe.swiglu)(interleaved)


def kernel_swiglu(gate, up):
    rows, cols = gate.shape

    def kernel(g_ref, u_ref, o_ref):
        o_ref[...] = swiglu_pair(g_ref[...], u_ref[...], LIMIT, ALPHA, jnp.bfloat16)

    block = pl.BlockSpec((16, 1024), lambda i, j: (i, j))
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, cols), jnp.bfloat16),
                          grid=(rows // 16, cols // 1024), in_specs=[block, block], out_specs=block,
                          interpret=jax.default_backend() == "cpu")(gate, up)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    gates = all_bf16_in(-20.0, 8.0)  # the clamp caps gates at 7; below -20 the sigmoid underflows
    ups = np.asarray([-8, -3.5, -1, -0.25, 0, 0.3, 1, 2.75, 6.5, 9], jnp.bfloat16)
    gate = np.repeat(gates[None, :], len(ups), 0)
    up = np.repeat(ups[:, None], gates.size, 1)
    pad = (-gate.shape[1]) % 1024
    gate = np.pad(gate, ((0, 6), (0, pad)))  # rows to a multiple of 16 with zeros
    up = np.pad(up, ((0, 6), (0, pad)))
    want = torch_swiglu(gate, up)
    results = {}
    for name, fn in (("xla", xla_swiglu), ("kernel", kernel_swiglu)):
        got = np.asarray(fn(jnp.asarray(gate), jnp.asarray(up)))
        differ = got.view(np.uint16) != want.view(np.uint16)
        results[name] = {"elements": int(differ.size), "differ": int(differ.sum()), "share": float(differ.mean())}
        print(f"{name:7s} differs from torch in {differ.sum()} of {differ.size} elements ({differ.mean():.2e})")
    if args.json:
        device = jax.devices()[0]
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "jax": jax.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": "python benchmarks/swiglu_check.py", "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
