"""Greedy generation of one random-weight model on several meshes: identical tokens, decode
tokens/s and parameter bytes per device. For the multi-GPU kinds of the device machine.

python benchmarks/mesh_check.py --model gpt-oss-120b --meshes 1x1 2x1 1x2 --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import time

import jax
import numpy as np

from gptoss_jax.generate import generate
from gptoss_jax.loader import load
from gptoss_jax.sharding.memory import bytes_per_device
from gptoss_jax.sharding.mesh import make_mesh


def decode_rate(model, batch: int, new_tokens: int, prompt):
    prompts = [list(prompt) for _ in range(batch)]
    kw = dict(max_new_tokens=new_tokens, temperature=0, stop_tokens=[], chunk=16)
    generate(model, prompts, **kw)  # compiles
    start = time.perf_counter()
    out = generate(model, prompts, **kw)
    return out, batch * new_tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt-oss-120b")
    parser.add_argument("--meshes", nargs="+", default=["1x1", "2x1", "1x2"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    prompt = np.random.default_rng(0).integers(0, 199_998, 16).tolist()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    record = dict(device=str(jax.devices()), date=datetime.datetime.now(datetime.UTC).isoformat(),
                  command=" ".join(sys.argv), commit=commit or None, model=args.model, runs=[])
    reference = None
    for spec in args.meshes:
        mesh = None if spec == "1x1" else make_mesh(spec)
        start = time.perf_counter()
        model = load(args.model, mesh=mesh, seed=0)
        jax.block_until_ready(jax.tree.leaves(model))
        run = dict(mesh=spec, load_s=round(time.perf_counter() - start, 1))
        if mesh is not None:
            run["param_gib_per_device"] = round(max(bytes_per_device(model).values()) / 2**30, 2)
        for batch in args.batches:
            out, rate = decode_rate(model, batch, args.new_tokens, prompt)
            run[f"decode_tok_s_batch{batch}"] = round(rate, 1)
            if batch == 1:
                run["tokens"] = out[0]
                reference = reference or out[0]
                run["same_tokens_as_first_mesh"] = out[0] == reference
        run["peak_gib_per_device"] = [round((d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 2)
                                      for d in jax.local_devices()]
        record["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "tokens"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
