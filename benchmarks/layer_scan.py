"""Does a layer scan cut compile time? Compiles one model step of gpt-oss-20b for a TPU v5e
chip (no TPU needed; libtpu must be installed) in two forms and prints the compile times:

- unrolled: the model as it is (`GptOss.extend`), every layer its own code;
- scanned: the same blocks under `jax.lax.scan` over (sliding, full) layer pairs, with
  each pair's parameters and caches stacked along a leading axis (a prototype: the
  model's parameters are not stored that way).

Each measurement runs in a fresh process (JAX caches the kernels' lowering within one) and
times tracing, lowering and compiling together.

    python benchmarks/layer_scan.py [--layers 2 8 24] [--tokens 1 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import SingleDeviceSharding

from gptoss_jax import plan
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels import Kernels
from gptoss_jax.model import F32, Block, LayerCache

CONTEXT = 4096


def shapes(device, *specs):
    return tuple(jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device)) for shape, dtype in specs)


def unrolled(config, kernels, device, tokens):
    graphdef, state = plan.abstract_state(config, jnp.bfloat16, None, kernels, device)
    caches = [LayerCache(*shapes(device, *cache_specs(config, layer))) for layer in range(config.num_hidden_layers)]

    def step(state, tokens, positions, caches):
        return nnx.merge(graphdef, state).extend(tokens, positions, caches)

    return step, (state, *token_inputs(device, tokens), caches)


def cache_specs(config, layer):
    slots = min(config.sliding_window, CONTEXT) if config.is_sliding(layer) else CONTEXT
    kv = (1, slots, config.num_key_value_heads, config.head_dim)
    return (kv, jnp.bfloat16), (kv, jnp.bfloat16), ((1, slots), jnp.int32)


def token_inputs(device, tokens):
    return shapes(device, ((1, tokens), jnp.int32), ((1, tokens), jnp.int32))


def scanned(config, kernels, device, tokens):
    pairs = config.num_hidden_layers // 2
    graphdef, state = plan.abstract_state(config, jnp.bfloat16, None, kernels, device)
    model = nnx.merge(graphdef, state)
    pair_graph, pair_state = nnx.split(nnx.eval_shape(lambda: nnx.List(
        [Block(config, layer, jnp.bfloat16, None, kernels.moe_tpu) for layer in (0, 1)])))
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((pairs, *a.shape), a.dtype,
                                                          sharding=SingleDeviceSharding(device)), pair_state)
    caches = tuple(LayerCache(*shapes(device, *(((pairs, *shape), dtype) for shape, dtype in cache_specs(config, i))))
                   for i in (0, 1))
    ends = shapes(device, ((config.vocab_size, config.hidden_size), jnp.bfloat16), ((config.hidden_size,), jnp.bfloat16),
                  ((config.vocab_size, config.hidden_size), jnp.bfloat16))
    eps = model.norm.eps

    def step(stacked, embedding, norm_scale, unembedding, tokens, positions, caches):
        def body(x, layer):
            blocks = nnx.merge(pair_graph, layer[0])
            x, sliding = blocks[0](x, positions, layer[1], kernels=kernels)
            x, full = blocks[1](x, positions, layer[2], kernels=kernels)
            return x, (sliding, full)

        x, caches = jax.lax.scan(body, embedding[tokens], (stacked, *caches))
        t = x.astype(F32)
        h = (t * jax.lax.rsqrt(jnp.mean(t * t, -1, keepdims=True) + eps) * norm_scale.astype(F32)).astype(x.dtype)
        return jnp.einsum("btd,vd->btv", h, unembedding, preferred_element_type=F32).astype(x.dtype), caches

    return step, (stacked, *ends, *token_inputs(device, tokens), caches)


def compile_seconds(form: str, layers: int, tokens: int) -> float:
    """Tracing, lowering and compiling one form, in this process."""
    target = plan.target_named("v5e-1")
    device = target.devices()[0]
    config = GptOssConfig.preset("gpt-oss-20b").replace(num_hidden_layers=layers)
    build = {"unrolled": unrolled, "scanned": scanned}[form]
    start = time.perf_counter()
    step, args = build(config, Kernels.auto(devices=[device]), device, tokens)
    jax.jit(step).lower(*args).compile()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64], help="tokens per step (1: decode)")
    parser.add_argument("--one", nargs=3, metavar=("FORM", "LAYERS", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        form, layers, tokens = args.one
        print(compile_seconds(form, int(layers), int(tokens)))
        return
    for tokens in args.tokens:
        for layers in args.layers:
            times = {}
            for form in ("unrolled", "scanned"):
                run = subprocess.run([sys.executable, __file__, "--one", form, str(layers), str(tokens)],
                                     capture_output=True, text=True, check=True)
                times[form] = float(run.stdout.split()[-1])
            print(f"gpt-oss-20b, {layers:2d} layers, {tokens:3d} token(s) per step, v5e-1: unrolled "
                  f"{times['unrolled']:6.1f} s, scanned over layer pairs {times['scanned']:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
