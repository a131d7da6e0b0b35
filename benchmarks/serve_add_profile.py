"""Where a continuous batch's admission of one prompt (`engine.ContinuousBatch.add`) spends
its time on one accelerator: the cache allocation, the prefill, and the insertion into the
batch's slots, each waited for, against a decode chunk of the full batch. Not part of CI.

    python benchmarks/serve_add_profile.py --model gpt-oss-20b --slots 64 --json add.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptoss_jax import engine  # noqa: E402
from gptoss_jax.config import PRESETS, GptOssConfig  # noqa: E402
from gptoss_jax.kernels.dispatch import Kernels  # noqa: E402
from gptoss_jax.loader import random_model  # noqa: E402


def waited(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=PRESETS, default="gpt-oss-20b")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=131)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model = random_model(GptOssConfig.preset(args.model), kernels=Kernels.auto("auto"))
    batch = engine.ContinuousBatch(model, slots=args.slots, max_len=args.max_len)
    prompt = list(np.random.default_rng(0).integers(0, 199_000, args.prompt))
    length = len(prompt)
    padded = engine.bucket(length, 16)
    cache_len = min(engine.bucket(padded, 64), batch.cache_len)
    step = engine._prefill_step(model, batch.prefill_rows, cache_len, padded)
    width = engine.round_up(length, step)
    tokens = np.full((1, width), engine.PAD_TOKEN, np.int32)
    positions = np.full((1, width), engine.NO_POSITION, np.int32)
    tokens[0, :length], positions[0, :length] = prompt, np.arange(length)
    lengths = np.array([length], np.int32)
    timings = {"init_caches": [], "prefill": [], "add_whole": [], "decode_chunk_full_batch": []}
    for i in range(args.repeats + 2):
        t = {}
        t["init_caches"] = waited(lambda: engine.init_caches(model, 1, cache_len))
        caches = engine.init_caches(model, 1, cache_len)
        t["prefill"] = waited(lambda: engine._prefill_in_steps(batch.graphdef, batch.params, tokens, positions, lengths,
                                                               caches, step, batch.place))
        while batch.free_slots > 1:  # a full batch but one slot
            batch.add(engine.Generation(prompt, max_new_tokens=100_000, temperature=0.0))
        t["add_whole"] = waited(lambda: batch.add(engine.Generation(prompt, max_new_tokens=100_000, temperature=0.0))
                                or batch.state)
        t["decode_chunk_full_batch"] = waited(lambda: (batch.step(), batch.state)[1])
        batch.cancel(batch.generations[0])
        if i >= 2:
            for k, v in t.items():
                timings[k].append(v)
        print(i, {k: round(v * 1000, 2) for k, v in t.items()}, flush=True)
    out = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(),
           "command": " ".join(["python", *sys.argv]), "prompt_tokens": length, "padded": width, "cache_len": cache_len,
           "median_ms": {k: float(np.median(v)) * 1000 for k, v in timings.items()}}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
