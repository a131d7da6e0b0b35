"""gpt-oss speed benchmark on random weights at the real shapes (no files; not part of CI).

    python benchmarks/bench.py --model gpt-oss-20b --kernels xla --measure decode,batch,prefill,memory
    python benchmarks/bench.py --model gpt-oss-120b --measure decode,memory --contexts 0,32768

Measures (each selectable with --measure):
  decode   batch-1 decode tokens/s at each --contexts (the cache is filled with random keys
           and values up to the context, then `generate`'s jitted decode loop runs --steps steps)
  generate decode tokens/s of `generate` itself, as the CLI runs it, batch 1 after prompts of
           each --generate-prompts length: --generate-tokens tokens in chunks of --chunk
           steps, the host streaming the tokens between chunks (timed from the first chunk's
           tokens to the last: no prefill, no compilation)
  generate_batch  the same at each --batches, prompts of --batch-context tokens
  batch    decode tokens/s at each --batches (context --batch-context)
  prefill  prefill tokens/s for each --prompts length (in --prefill-chunk pieces through extend)
  profile  where one batch-1 decode step's time goes: attention (sliding / full layer), MoE
           layer, unembedding + argmax, each timed in an on-device loop
  trace_batch    a profiler trace of decode steps at each --batches (context --batch-context)
  prefill_trace  a profiler trace of each --prompts prefill, device time by kernel
  memory   peak device memory
  ttft     time to first token of a 16-token prompt in a fresh process, cold and with the
           compilation cache
  copy     measured device copy bandwidth (read + write), used for the bandwidth limit

Prints a table and writes JSON (--json) with the device, date, commit and command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

# JAX takes 75% of the accelerator's memory by default; gpt-oss-120b needs more.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bandwidth  # noqa: E402
from flax import nnx  # noqa: E402

from gptoss_jax import mxfp4  # noqa: E402
from gptoss_jax.cli import COMPILATION_CACHE_DIR, enable_compilation_cache  # noqa: E402
from gptoss_jax.config import GptOssConfig  # noqa: E402
from gptoss_jax.engine import DEFAULT_CHUNK, decode_chunk, generate  # noqa: E402
from gptoss_jax.kernels import Kernels  # noqa: E402
from gptoss_jax.loader import random_model  # noqa: E402
from gptoss_jax.model import NO_POSITION, LayerCache  # noqa: E402


# ------------------------------------------------------------------------------- helpers
def sync(tree):
    jax.block_until_ready(tree)
    return tree


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def bytes_per_token(config: GptOssConfig, context: int, batch: int = 1) -> dict:
    """Fewest bytes one decode step must read (weights once, KV of each sequence)."""
    c = config
    d, hd = c.hidden_size, c.head_dim
    attn = (c.num_attention_heads * hd * d * 2 + 2 * c.num_key_value_heads * hd * d
            + c.num_attention_heads * hd + 2 * c.num_key_value_heads * hd + d + c.num_attention_heads + d) * 2
    fp4 = mxfp4.BYTES_PER_BLOCK + 1  # 16 bytes of values + 1 scale byte per 32 weights
    expert = (2 * c.intermediate_size * d + d * c.intermediate_size) // mxfp4.BLOCK * fp4 \
        + (2 * c.intermediate_size + d) * 2
    distinct = c.num_experts * (1 - (1 - c.experts_per_token / c.num_experts) ** batch)
    moe = distinct * expert + (c.num_experts * d + c.num_experts + d) * 2
    kv_per_pos = 2 * c.num_key_value_heads * hd * 2
    sliding = sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
    full = c.num_hidden_layers - sliding
    kv = batch * kv_per_pos * (sliding * min(context, c.sliding_window) + full * context)
    unembed = c.vocab_size * d * 2
    total = c.num_hidden_layers * (attn + moe) + unembed + kv
    return {"attention": c.num_hidden_layers * attn, "experts": c.num_hidden_layers * moe,
            "unembedding": unembed, "kv": kv, "total": total}


def on_device_repeat(fn, reps):
    """jit of a loop running fn(x) -> x `reps` times on the device (one dispatch)."""
    def run(x, *args):
        return jax.lax.fori_loop(0, reps, lambda i, x: fn(x, *args), x)
    return jax.jit(run)


def timed(fn, *args, repeats=3, warmups=1):
    for _ in range(warmups):  # the first compiles
        sync(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ----------------------------------------------------------------------- model and caches
KERNEL_FIELDS = tuple(name for name in Kernels.__dataclass_fields__ if name != "interpret")


def kernel_choice(spec: str, attention: str | None = None) -> Kernels:
    """--kernels: "xla" (none), "pallas" (every kernel for this GPU), "fastest" (what
    `--kernels auto` runs), or "moe_gemv,moe_gemm,..." (the named Kernels fields on, the others
    off); --attention pallas / xla turns both attention kernels on / off."""
    device = jax.devices()[0]
    if spec in ("xla", "pallas"):
        chosen = Kernels.auto(spec, devices=[device])
    elif spec == "fastest":
        chosen = Kernels.auto("auto", devices=[device])
    else:
        names = [n for n in spec.split(",") if n]
        unknown = [n for n in names if n not in KERNEL_FIELDS]
        if unknown:
            raise SystemExit(f"--kernels: unknown kernels {unknown} in '{spec}'; kernels: {', '.join(KERNEL_FIELDS)}")
        chosen = Kernels(**dict.fromkeys(names, True), interpret=device.platform == "cpu")
    if attention is not None:
        chosen = dataclasses.replace(chosen, decode_attention=attention == "pallas",
                                     prefill_attention=attention == "pallas")
    return chosen


def build_model(name: str, kernels: Kernels, seed: int = 0):
    config = GptOssConfig.preset(name)
    start = time.perf_counter()
    model = sync(random_model(config, dtype=jnp.bfloat16, seed=seed, kernels=kernels))
    return model, time.perf_counter() - start


def filled_caches(model, batch: int, context: int, max_len: int, seed: int = 1) -> list[LayerCache]:
    """Caches holding random keys and values for positions [0, context) of every sequence."""
    key = jax.random.key(seed)
    caches = []
    for layer, cache in enumerate(model.init_cache(batch, max_len)):
        slots = cache.positions.shape[1]
        slot = jnp.arange(slots, dtype=jnp.int32)
        if model.config.is_sliding(layer):
            # slot s holds the newest position p < context with p % slots == s
            newest = context - 1 - ((context - 1 - slot) % slots)
            positions = jnp.where((context > 0) & (newest >= 0), newest, NO_POSITION)
        else:
            positions = jnp.where(slot < context, slot, NO_POSITION)
        k1, k2, key = jax.random.split(key, 3)
        shape = cache.k.shape
        caches.append(LayerCache(jax.random.normal(k1, shape, cache.k.dtype),
                                 jax.random.normal(k2, shape, cache.v.dtype),
                                 jnp.broadcast_to(positions, (batch, slots)).astype(jnp.int32)))
    return sync(caches)


def round_up(n, m):
    return -(-n // m) * m


# -------------------------------------------------------------------------- measurements
def measure_decode(model, batch: int, context: int, steps: int, wrap_timed=None) -> dict:
    """Tokens/s of generate's jitted decode loop (greedy) from `context` cached positions."""
    graphdef, state = nnx.split(model)
    max_len = round_up(context + 3 * steps + 1, 64)
    caches = filled_caches(model, batch, context, max_len)
    vocab = model.config.vocab_size
    logits = jax.random.normal(jax.random.key(2), (batch, vocab), jnp.float32)
    kernel = partial(decode_chunk, graphdef, state, chunk=steps, greedy=True, top_k=0, use_top_p=False)

    def run(caches, logits, position):
        return kernel(caches, logits, position, jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool),
                      jnp.int32(0), jnp.full(batch, 1 << 30, jnp.int32), jnp.array([-1], jnp.int32),
                      jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0))

    position = jnp.full(batch, context, jnp.int32)
    start = time.perf_counter()
    caches, logits, position, *_ = sync(run(caches, logits, position))  # compile + warm-up
    compile_s = time.perf_counter() - start
    # The jit outputs fed back are committed to the device, fresh inputs were not: that is
    # a second signature, compiled by this second warm-up call.
    caches, logits, position, *_ = sync(run(caches, logits, position))
    start = time.perf_counter()
    if wrap_timed is None:
        caches, logits, position, count, *_ = sync(run(caches, logits, position))
    else:
        caches, logits, position, count, *_ = wrap_timed(lambda: sync(run(caches, logits, position)))  # noqa: F821 (bound above; ruff reads the later del)
    elapsed = time.perf_counter() - start
    made = int(np.asarray(count).sum())
    if made != batch * steps:
        raise RuntimeError(f"decode made {made} tokens, expected {batch * steps}")
    del caches
    return {"batch": batch, "context": context, "steps": steps, "seconds": elapsed,
            "tokens_per_s": made / elapsed, "ms_per_step": 1e3 * elapsed / steps,
            "first_call_s": compile_s}


def measure_generate(model, batch: int, prompt: int, new_tokens: int, chunk: int) -> dict:
    """Decode tokens/s of `generate` (greedy, no stop tokens) after `batch` random prompts of
    `prompt` tokens, from the first chunk's tokens to the last (no prefill, no compiling)."""
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 200000, prompt)] for _ in range(batch)]
    run = partial(generate, model, prompts, temperature=0, stop_tokens=[], chunk=chunk,
                  max_len=prompt + new_tokens)  # the same cache for the warm-up as for the timed call
    run(max_new_tokens=2 * chunk)  # compiles the prefill and the chunk
    times, counts = [], []

    def on_tokens(new):
        times.append(time.perf_counter())
        counts.append(sum(map(len, new)))

    run(max_new_tokens=new_tokens, on_tokens=on_tokens)
    made, elapsed = sum(counts[1:]), times[-1] - times[0]
    if sum(counts) != batch * new_tokens:
        raise RuntimeError(f"generate made {sum(counts)} tokens, expected {batch * new_tokens}")
    return {"batch": batch, "prompt": prompt, "chunk": chunk, "tokens": made, "seconds": elapsed,
            "tokens_per_s": made / elapsed, "ms_per_step": 1e3 * elapsed * batch / made}


TRACE_TOP = 25  # kernels listed per trace (--trace-top)


def summarize_trace(trace_dir: str, steps: int, top: int = 25) -> dict:
    """Device time per step by kernel name from a jax.profiler perfetto trace."""
    import gzip

    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        found = [str(p.relative_to(trace_dir)) for p in Path(trace_dir).rglob("*")]
        raise RuntimeError(f"no *.trace.json.gz under the trace folder; found {found[:20]}")
    events = json.loads(gzip.open(files[-1]).read())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if "GPU" in name or "TPU" in name or "device" in name.lower()}
    totals: dict[str, list] = {}
    hlo_ops: dict[str, str] = {}  # kernel name -> the HLO instruction it ran for (XLA names it in args)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
            entry = totals.setdefault(e["name"], [0.0, 0])
            entry[0] += e["dur"]
            entry[1] += 1
            op = e.get("args", {}).get("hlo_op")
            if op and e["name"] not in hlo_ops:
                hlo_ops[e["name"]] = str(op)[:120]
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    busy = sum(v[0] for v in totals.values())
    return {"device_busy_ms_per_step": busy / 1e3 / steps, "kernels_per_step": sum(v[1] for v in totals.values()) / steps,
            "device_processes": sorted(names[p] for p in device_pids),
            "top": [{"name": n[:120], "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps,
                     **({"hlo_op": hlo_ops[n]} if n in hlo_ops else {})} for n, v in ranked[:top]]}


def traced(measure, per: int, **kwargs) -> dict:
    """measure(..., wrap_timed=...) with its timed run under jax.profiler; the trace summed
    by kernel and divided by `per` (steps, or 1 for a whole prompt)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        def wrap(run):
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            try:
                return run()
            finally:
                jax.profiler.stop_trace()
        result = measure(wrap_timed=wrap, **kwargs)
        result["trace"] = summarize_trace(trace_dir, per, TRACE_TOP)
    return result


def measure_trace(model, context: int, steps: int, batch: int = 1) -> dict:
    """A jax.profiler trace of `steps` decode steps, summarised by kernel."""
    return traced(partial(measure_decode, model, batch, context, steps), steps)


def measure_prefill(model, length: int, chunk: int, wrap_timed=None) -> dict:
    graphdef, state = nnx.split(model)
    chunk = min(chunk, length)
    if length % chunk:
        raise ValueError(f"--prefill-chunk {chunk} must divide the prompt length {length}")

    @partial(jax.jit, donate_argnums=3)
    def extend(state, tokens, positions, caches):
        logits, caches = nnx.merge(graphdef, state).extend(tokens, positions, caches)
        return logits[:, -1].astype(jnp.float32), caches

    tokens = jax.random.randint(jax.random.key(3), (1, length), 0, model.config.vocab_size, jnp.int32)

    def run():
        caches = model.init_cache(1, length)
        out = None
        for start in range(0, length, chunk):
            positions = jnp.arange(start, start + chunk, dtype=jnp.int32)[None]
            out, caches = extend(state, tokens[:, start:start + chunk], positions, caches)
        return sync(out)

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run() if wrap_timed is None else wrap_timed(run)
    elapsed = time.perf_counter() - start
    return {"prompt": length, "chunk": chunk, "seconds": elapsed, "tokens_per_s": length / elapsed,
            "first_call_s": first}


def measure_profile(model, context: int, reps: int = 32) -> dict:
    """Batch-1 decode step split into its parts, each run `reps` times in one on-device loop."""
    c = model.config
    dt = model.dtype
    x = (jax.random.normal(jax.random.key(4), (1, 1, c.hidden_size), jnp.float32)).astype(dt)
    pos = jnp.full((1, 1), context, jnp.int32)
    caches = filled_caches(model, 1, context, round_up(context + 64, 64))
    out = {}
    for layer in (0, 1):
        block = model.blocks[layer]
        graphdef, state = nnx.split(block.attn)

        def attn_step(x, state, cache):
            y, _ = nnx.merge(graphdef, state)(x, pos, cache)
            return x + 1e-3 * y
        t = timed(on_device_repeat(attn_step, reps), x, state, caches[layer])
        out[f"attention_{'sliding' if c.is_sliding(layer) else 'full'}_us"] = 1e6 * t / reps
    graphdef, state = nnx.split(model.blocks[0].mlp)

    def moe_step(x, state):
        return x + 1e-3 * nnx.merge(graphdef, state)(x)
    out["moe_us"] = 1e6 * timed(on_device_repeat(moe_step, reps), x, state) / reps

    def router_step(x, state):
        mlp = nnx.merge(graphdef, state)
        experts, weights = mlp.route(mlp.norm(x).reshape(1, -1))
        return x + 1e-3 * (weights.sum() + experts.sum()).astype(dt)
    out["router_us"] = 1e6 * timed(on_device_repeat(router_step, reps), x, state) / reps
    head_def, head_state = nnx.split((model.norm, model.unembedding))

    def head_step(x, head_state):
        norm, unembedding = nnx.merge(head_def, head_state)
        logits = jnp.einsum("btd,vd->btv", norm(x), unembedding[...], preferred_element_type=jnp.float32)
        return x + 1e-9 * jnp.argmax(logits, axis=-1)[..., None].astype(dt)
    out["unembedding_argmax_us"] = 1e6 * timed(on_device_repeat(head_step, reps), x, head_state) / reps
    sliding = sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
    out["sum_of_parts_ms"] = 1e-3 * (sliding * out["attention_sliding_us"]
                                     + (c.num_hidden_layers - sliding) * out["attention_full_us"]
                                     + c.num_hidden_layers * out["moe_us"] + out["unembedding_argmax_us"])
    out["context"] = context
    return out


def measure_copy() -> dict:
    """Copy bandwidth the device sustains (benchmarks/bandwidth.py: a donated 4 GiB x + 1, calls
    queued back to back; torch's device-to-device copy where torch is installed)."""
    out = {"jax_donated": bandwidth.jax_donated(4096)}
    torch_result = bandwidth.torch_copy(4096)
    if torch_result is not None:
        out["torch_copy"] = torch_result
    return out


def measure_ttft(args) -> dict:
    """Two fresh processes sharing a fresh compilation cache: cold, then cached."""
    out = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for label in ("cold", "cached"):
            cmd = [sys.executable, __file__, "--ttft-child", "--model", args.model, "--kernels",
                   args.kernels.split(";")[0]] + ([] if args.attention is None else ["--attention", args.attention])
            env = dict(os.environ, GPTOSS_JAX_CACHE_DIR=cache_dir)
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            if proc.returncode:
                raise RuntimeError(f"ttft child failed: {proc.stderr[-2000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            out[label] = dict(child, process_wall_s=wall)
    return out


def ttft_child(args) -> None:
    process_start = time.perf_counter()
    enable_compilation_cache(Path(os.environ.get("GPTOSS_JAX_CACHE_DIR", COMPILATION_CACHE_DIR)))
    model, build_s = build_model(args.model, kernel_choice(args.kernels.split(";")[0], args.attention))
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 200000, 16)]
    start = time.perf_counter()
    generate(model, [prompt], max_new_tokens=1, temperature=0.0, stop_tokens=[])
    ttft = time.perf_counter() - start
    print(json.dumps({"device": jax.devices()[0].device_kind, "ttft_s": ttft, "model_build_s": build_s,
                      "process_to_first_token_s": time.perf_counter() - process_start}))


# ------------------------------------------------------------------------------------ main
def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-oss-20b", choices=["gpt-oss-20b", "gpt-oss-120b", "tiny"])
    parser.add_argument("--kernels", default="xla",
                        help='"xla", "pallas" (every kernel), "fastest" (what --kernels auto runs) or '
                             '"moe_gemv,moe_gemm,projection" (the named kernels on, the others off); several '
                             'configurations separated by ";" are measured in turn')
    parser.add_argument("--attention", choices=["xla", "pallas"], help="overrides both attention kernels")
    parser.add_argument("--measure", default="copy,decode,batch,prefill,profile,memory")
    parser.add_argument("--contexts", default="0,4096,32768")
    parser.add_argument("--batches", default="8,64")
    parser.add_argument("--batch-context", type=int, default=1024)
    parser.add_argument("--prompts", default="2048,8192,32768")
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--generate-tokens", type=int, default=256)
    parser.add_argument("--generate-prompts", default="16")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="generate's chunk (--measure generate)")
    parser.add_argument("--profile-context", type=int, default=4096)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--trace-top", type=int, default=25, help="kernels listed per trace")
    parser.add_argument("--ttft-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global TRACE_TOP
    TRACE_TOP = args.trace_top
    if args.ttft_child:
        ttft_child(args)
        return 0

    measures = set(args.measure.split(","))
    report = {"model": args.model, "kernels": args.kernels, "attention": args.attention,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit(), "host": platform.node(),
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "results": {}}
    results = report["results"]

    def record(name, fn):
        try:
            results[name] = fn()
        except Exception as e:  # a failed measurement (e.g. out of memory) is a result too
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    # First, before this process takes the accelerator's memory: the children need it.
    if "ttft" in measures:
        record("ttft", lambda: measure_ttft(args))
    device = jax.devices()[0]
    config = GptOssConfig.preset(args.model)
    report.update(device=device.device_kind, platform=device.platform, jax=jax.__version__)
    if not measures - {"ttft"}:
        measures = set()

    if "copy" in measures:
        record("copy", measure_copy)
    configs = [kernel_choice(spec, args.attention) for spec in args.kernels.split(";")]
    model = None
    for kernels in configs:
        if not measures - {"copy", "memory"}:
            break
        if model is None:
            model, build_s = build_model(args.model, kernels)
            results["model_build_s"] = build_s
        model = model.with_kernels(kernels)
        # One configuration: plain names; several: each name gets the configuration.
        tag = "" if len(configs) == 1 else "[" + ",".join(kernels.names()) + "]"
        if "decode" in measures:
            for context in parse_ints(args.contexts):
                record(f"decode_b1_ctx{context}{tag}", lambda: dict(measure_decode(model, 1, context, args.steps),
                                                                   bytes_per_token=bytes_per_token(config, context)))
        if "generate" in measures:
            for prompt in parse_ints(args.generate_prompts):
                record(f"generate_b1_prompt{prompt}{tag}",
                       lambda: measure_generate(model, 1, prompt, args.generate_tokens, args.chunk))
        if "generate_batch" in measures:
            for batch in parse_ints(args.batches):
                record(f"generate_b{batch}_prompt{args.batch_context}{tag}",
                       lambda: measure_generate(model, batch, args.batch_context, args.generate_tokens, args.chunk))
        if "batch" in measures:
            for batch in parse_ints(args.batches):
                record(f"decode_b{batch}_ctx{args.batch_context}{tag}",
                       lambda: measure_decode(model, batch, args.batch_context, args.steps))
        if "trace" in measures:
            record(f"trace_ctx{args.profile_context}{tag}", lambda: measure_trace(model, args.profile_context, 8))
        if "trace_batch" in measures:  # where a batched decode step's time goes, by kernel
            for batch in parse_ints(args.batches):
                record(f"trace_b{batch}_ctx{args.batch_context}{tag}",
                       lambda: measure_trace(model, args.batch_context, 8, batch))
        if "profile" in measures:
            record(f"profile_ctx{args.profile_context}{tag}", lambda: measure_profile(model, args.profile_context))
        if "prefill" in measures:
            for length in parse_ints(args.prompts):
                record(f"prefill_{length}{tag}", lambda: measure_prefill(model, length, args.prefill_chunk))
        if "prefill_trace" in measures:  # where one prompt's prefill time goes, by kernel
            for length in parse_ints(args.prompts):
                record(f"prefill_trace_{length}{tag}",
                       lambda: traced(partial(measure_prefill, model, length, args.prefill_chunk), 1))
    if "memory" in measures:
        stats = device.memory_stats() or {}
        record("memory", lambda: {"peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
                                  "in_use_gib": stats.get("bytes_in_use", 0) / 2**30,
                                  "limit_gib": stats.get("bytes_limit", 0) / 2**30})

    copy = results.get("copy", {})
    copy_tb = copy.get("torch_copy", copy.get("jax_donated", {})).get("tb_per_s")
    print(f"\n{args.model}  kernels={args.kernels}  {device.device_kind}  {report['date']}  {report['commit']}")
    print(f"{'measurement':32s} {'tokens/s':>10s} {'ms/step':>9s} {'limit tok/s':>12s}")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        if "tokens_per_s" in r:
            limit = ""
            if copy_tb and "bytes_per_token" in r:
                limit = f"{copy_tb * 1e12 / r['bytes_per_token']['total']:.0f}"
            print(f"{name:32s} {r['tokens_per_s']:10.1f} {r.get('ms_per_step', float('nan')):9.3f} {limit:>12s}")
        else:
            print(f"{name:32s} {json.dumps(r)[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
