"""The device's copy bandwidth: the limit the decode byte bound is held against (GPU; not CI).

    python benchmarks/bandwidth.py --json bandwidth.json

Three measurements of reading and writing device memory, each at several sizes:
- `jax_donated`: a jitted `x + 1` on bf16 whose output takes the input's buffer (donated), so
  nothing is allocated in the loop; `calls` calls are queued back to back and waited for once,
  so the time is the device's (host dispatch overlaps the previous call).
- `torch_copy`: `dst.copy_(src)` between two preallocated tensors, timed with CUDA events.
Bandwidth counts bytes read plus bytes written. The largest sizes (GiBs, far past L2) give
the figure to use; small sizes show where launch latency takes over.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp

SIZES_MIB = (64, 256, 1024, 4096)


def jax_donated(size_mib: int, calls: int = 50) -> dict:
    n = size_mib * (1 << 20) // 2
    step = jax.jit(lambda x: x + jnp.bfloat16(1), donate_argnums=0)
    x = step(jnp.zeros((n,), jnp.bfloat16))
    for _ in range(5):
        x = step(x)
    x.block_until_ready()
    start = time.perf_counter()
    for _ in range(calls):
        x = step(x)
    x.block_until_ready()
    seconds = (time.perf_counter() - start) / calls
    return {"size_mib": size_mib, "seconds_per_call": seconds, "tb_per_s": 2 * n * 2 / seconds / 1e12}


def torch_copy(size_mib: int, calls: int = 50) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = size_mib * (1 << 20) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / calls
    del src, dst
    torch.cuda.empty_cache()
    return {"size_mib": size_mib, "seconds_per_call": seconds, "tb_per_s": 2 * n * 2 / seconds / 1e12}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_MIB)), help="MiB per buffer, comma-separated")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    device = jax.devices()[0]
    report = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "results": {}}
    for name, measure in (("torch_copy", torch_copy), ("jax_donated", jax_donated)):
        rows = [r for r in (measure(s) for s in sizes) if r is not None]
        report["results"][name] = rows
        for r in rows:
            print(f"{name:17s} {r['size_mib']:6d} MiB  {r['tb_per_s']:.3f} TB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
