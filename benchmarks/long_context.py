"""Long context: prefill and decode speed and peak memory at one context length, through
`generate` as the CLI runs it (random weights at the model's real shape; no files).

    python benchmarks/long_context.py --model tiny --context 131072                # the built-in model, any device
    python benchmarks/long_context.py --model gpt-oss-20b --context 131072 --json 20b_128k.json   # on a GPU

The prompt is `context - new_tokens` random tokens, so the cache holds exactly `context`
positions after the last decoded token (131072 is the most gpt-oss allows). A prompt of two
prefill steps with the same cache length runs first, so that compiling is not timed (the first
step and the steps after it can compile apart). Then one
`generate` call: the prefill time is the time to the first chunk of tokens less one decode
chunk, decode tokens/s is from the first chunk's tokens to the last. Peak memory: the
process's peak resident set (host) and, on an accelerator, the device's peak bytes in use.
Peaks are per process: measure each context in its own process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # gpt-oss-120b needs more than JAX's 75%
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not another one installed

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax.config import PRESETS  # noqa: E402
from gptoss_jax.engine import DEFAULT_CHUNK, PREFILL_TOKENS, generate  # noqa: E402


def peak_host_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on a CPU
    return stats.get("peak_bytes_in_use") if stats else None


def measure(model, context: int, new_tokens: int, seed: int = 0) -> dict:
    if not DEFAULT_CHUNK < new_tokens < context:
        raise ValueError(f"--new-tokens must be in ({DEFAULT_CHUNK}, {context}), got {new_tokens}")
    prompt = np.random.default_rng(seed).integers(0, model.config.vocab_size, context - new_tokens).tolist()
    run = dict(max_new_tokens=new_tokens, max_len=context, temperature=0, stop_tokens=[])

    start = time.perf_counter()
    generate(model, [prompt[:2 * PREFILL_TOKENS]], **run)  # compiles the prefill steps and the decode chunk
    compile_s = time.perf_counter() - start

    chunks = []  # (time, tokens) after each decode chunk
    start = time.perf_counter()
    generate(model, [prompt], **run, on_tokens=lambda new: chunks.append((time.perf_counter(), len(new[0]))))
    total_s = time.perf_counter() - start
    times = np.array([t for t, _ in chunks])
    decode_s = times[-1] - times[0]
    decoded = sum(n for _, n in chunks[1:])
    chunk_s = decode_s / (len(chunks) - 1)
    prefill_s = times[0] - start - chunk_s
    return {
        "context": context, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
        "prefill_s": prefill_s, "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_tokens_per_s": decoded / decode_s, "total_s": total_s, "compile_and_warmup_s": compile_s,
        "peak_host_bytes": peak_host_bytes(), "peak_device_bytes": peak_device_bytes(),
    }


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=PRESETS, default="tiny", help="random weights at this shape")
    parser.add_argument("--context", type=int, default=131072, help="cache positions after the last new token")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after the prompt")
    parser.add_argument("--kernels", choices=["auto", "pallas", "xla"], default="auto")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)

    loaded = time.perf_counter()
    model = gptoss_jax.load(args.model, dtype=args.dtype, kernels=args.kernels)
    jax.block_until_ready(nnx.state(model))
    result = {"model": args.model, "kernels": model.kernels.names() or "xla", "dtype": args.dtype,
              "device": jax.devices()[0].device_kind, "load_s": time.perf_counter() - loaded,
              **measure(model, args.context, args.new_tokens),
              "date": datetime.date.today().isoformat(), "commit": commit(), "jax": jax.__version__,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    gib = 2**30
    device_peak = result["peak_device_bytes"]
    print(f"{args.model} context {args.context} on {result['device']}: prefill of {result['prompt_tokens']} tokens "
          f"{result['prefill_s']:.1f} s ({result['prefill_tokens_per_s']:.0f} tok/s), decode "
          f"{result['decode_tokens_per_s']:.1f} tok/s, peak host RSS {result['peak_host_bytes'] / gib:.2f} GiB"
          + ("" if device_peak is None else f", peak device memory {device_peak / gib:.2f} GiB"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
