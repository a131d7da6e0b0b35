"""Checks and times the Pallas kernels on an accelerator at the real shapes.

    python benchmarks/kernel_check.py --json kernels.json               # MXFP4 grouped GEMV (decode)
    python benchmarks/kernel_check.py --gemm --json gemm.json           # MXFP4 grouped GEMM (batches, prefill)
    python benchmarks/kernel_check.py --attention --json attention.json # decode attention
    python benchmarks/kernel_check.py --flash --json flash.json         # prefill attention

Experts: for each variant, the error against the XLA reference (dequantize the routed
experts, fp32 einsum) on fresh random data, and the time per call inside an on-device loop
whose expert ids rotate, so that successive calls read different experts (no L2 reuse).

Attention (gpt-oss-20b layer shapes, one new token per sequence): the XLA reference (the
model's cache concatenation + Attention.attend) and kernel variants, each timed in an
on-device loop over enough distinct caches that they do not stay in L2, and their error
against the reference.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4  # noqa: E402
from gptoss_jax.config import GptOssConfig  # noqa: E402
from gptoss_jax.kernels import (  # noqa: E402
    attention,
    common,  # noqa: E402
    moe,
    moe_gemm,  # noqa: E402
)
from gptoss_jax.model import NO_POSITION, Attention  # noqa: E402

REPS = 64


def random_experts(key, experts, rows, features):
    k1, k2 = jax.random.split(key)
    blocks = jax.random.randint(k1, (experts, rows, features // 32, 16), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.randint(k2, (experts, rows, features // 32), 118, 126, jnp.int32).astype(jnp.uint8)
    return mxfp4.blocks_to_fp4(blocks), mxfp4.scales_to_e8m0(scales)


def reference(x, pair_expert, fp4, scales, bias, swiglu_params):
    """The model's numerics: fp32 dot, round, add the bias, then SwiGLU (mlp1)."""
    w = mxfp4.dequantize(fp4[pair_expert], scales[pair_expert], jnp.float32)
    u = jnp.einsum("pd,pod->po", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    u = u.astype(x.dtype) + bias[pair_expert]
    if swiglu_params is None:
        return u
    return moe.swiglu_pair(u[:, 0::2], u[:, 1::2], *swiglu_params, x.dtype)


def loop_time(step, x, pair_expert, num_experts):
    """Seconds per step(x, pair_expert) call, in an on-device loop rotating the experts."""
    pairs = pair_expert.shape[0]

    @jax.jit
    def run(x):
        def body(i, x):
            pe = (pair_expert + i * pairs) % num_experts
            out = step(x, pe)
            return x + (1e-30 * out[:, : x.shape[1]]).astype(x.dtype)
        return jax.lax.fori_loop(0, REPS, body, x)

    jax.block_until_ready(run(x))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / REPS


# ------------------------------------------------------------------ prefill attention (--flash)
FLASH_VARIANTS = [dict(block_m=bm, block_k=bk, num_warps=w, num_stages=st) for bm, bk, w, st in [
    (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 4, 2),
    (256, 64, 8, 2), (256, 32, 8, 2), (128, 32, 4, 2)]]


def flash_case(config, sliding: bool, keys: int, chunk: int, dtype, key):
    """The last `chunk` tokens of a `keys`-token prompt against its cache, as bench.py's prefill
    runs them: a full layer's cache holds `keys` slots (positions 0..keys-chunk-1, the rest
    empty), a sliding layer's a ring of `window` slots. Returns the kernel's and attend's
    arguments and the useful FLOPs (4 * head_dim per visible (query head, key) pair)."""
    from gptoss_jax.model import NO_POSITION

    window = config.sliding_window
    start = keys - chunk
    slots = window if sliding else keys
    slot = np.arange(slots)
    if sliding:
        cached = start - 1 - ((start - 1 - slot) % slots)
        cached = np.where(cached >= 0, cached, NO_POSITION)
    else:
        cached = np.where(slot < start, slot, NO_POSITION)
    q_pos = np.arange(start, keys, dtype=np.int32)[None]
    k_pos = np.concatenate([cached.astype(np.int32)[None], q_pos], axis=1)
    kq, kk, kv = jax.random.split(key, 3)
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = jax.random.normal(kq, (1, chunk, heads, hd), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (1, k_pos.shape[1], kv_heads, hd), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (1, k_pos.shape[1], kv_heads, hd), jnp.float32).astype(dtype)
    visible = np.minimum(q_pos + 1, window) if sliding else q_pos + 1
    flops = 4 * hd * heads * float(visible.sum())
    return q, k, v, jnp.asarray(q_pos), jnp.asarray(k_pos), flops


def flash_loop_time(step, q, reps: int):
    """Seconds per step(q) call in an on-device loop (each call depends on the previous)."""
    @jax.jit
    def run(q):
        return jax.lax.fori_loop(0, reps, lambda i, q: q + (1e-30 * step(q)).astype(q.dtype), q)

    jax.block_until_ready(run(q))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(q))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / reps


def check_flash(args, report, save):
    """Times Attention.attend (the XLA reference) and prefill_attention variants at
    gpt-oss-20b shapes: full and sliding layers, a 2048-token prompt chunk against prompts
    of 2k/8k/32k keys. Errors are against attend on the chunk's last 256 queries (they see
    the most keys), so that they can be measured even where attend on the chunk runs out of memory."""
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.kernels.flash import prefill_attention
    from gptoss_jax.model import Attention

    config = GptOssConfig.preset("gpt-oss-20b")
    dtype, chunk, reps = jnp.bfloat16, 2048, 8
    variants = FLASH_VARIANTS[:2] if args.quick else FLASH_VARIANTS
    key = jax.random.key(0)
    for sliding in (False, True):
        attn = Attention(config, 0 if sliding else 1, dtype)
        assert attn.sliding == sliding
        key, ks = jax.random.split(key)
        attn.sinks[...] = jax.random.normal(ks, (config.num_attention_heads,), jnp.float32).astype(dtype)
        sinks, window = attn.sinks[...], config.sliding_window if sliding else None
        for keys in (2048,) if args.quick else (2048, 8192, 32768):
            key, kc = jax.random.split(key)
            q, k, v, q_pos, k_pos, flops = flash_case(config, sliding, keys, chunk, dtype, kc)
            ref = jax.jit(attn.attend)(q[:, -256:], k, v, q_pos[:, -256:], k_pos).astype(jnp.float32)
            base = {"layer": "sliding" if sliding else "full", "chunk": chunk, "keys": keys,
                    "gflop": flops / 1e9}
            rows = [("xla_attend", lambda q: attn.attend(q, k, v, q_pos, k_pos))]
            rows += [(variant, functools.partial(
                lambda q, variant: prefill_attention(q, k, v, q_pos, k_pos, sinks, window=window, **variant),
                variant=variant)) for variant in variants]
            for variant, step in rows:
                row = dict(base, variant=variant)
                try:
                    out = jax.jit(step)(q)[:, -256:].astype(jnp.float32)
                    row["rel_err"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                    row["max_abs_err"] = float(jnp.max(jnp.abs(out - ref)))
                    t = flash_loop_time(step, q, reps)
                    row.update(us=1e6 * t, tflop_per_s=flops / t / 1e12)
                except Exception as e:  # e.g. attend's [64, 2048, 34k] scores running out of memory
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                report["results"].append(row)
                print(json.dumps(row), flush=True)
                save()
    print("\nlayer   keys variant" + " " * 54 + "rel_err        us  TFLOP/s")
    for r in report["results"]:
        print(f"{r['layer']:7s} {r['keys']:6d} {str(r['variant'])[:60]:60s} {r.get('rel_err', float('nan')):8.1e} "
              f"{r.get('us', float('nan')):9.1f} {r.get('tflop_per_s', float('nan')):8.1f} {r.get('error', '')[:80]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--flash", action="store_true", help="prefill attention kernel instead of the MoE kernels")
    parser.add_argument("--attention", action="store_true", help="time the decode attention kernel instead")
    parser.add_argument("--gemm", action="store_true", help="time the grouped GEMM (moe_gemm) instead")
    parser.add_argument("--pairs", type=int, nargs="*", default=[256, 32768], help="--gemm: pair counts")
    parser.add_argument("--attention-variants", type=json.loads,
                        help='--attention: these variants instead of the table, e.g. [{}, {"block": 128}]')
    parser.add_argument("--attention-cases", help="--attention: comma-separated case names (default: all)")
    parser.add_argument("--gemm-tunings", type=json.loads,
                        help='--gemm: these tunings instead of the table, e.g. [{"block_m": 16, "swap_ab": true}]')
    args = parser.parse_args()
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "results": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    if args.flash:
        return check_flash(args, report, save)
    if args.attention:
        attention_check(report, save, quick=args.quick, variants=args.attention_variants,
                        cases=None if args.attention_cases is None else args.attention_cases.split(","))
        return
    if args.gemm:
        gemm_section(args, report, save)
        return
    key = jax.random.key(0)
    shapes = {"mlp1+swiglu": (5760, 2880, (7.0, 1.702)), "mlp2": (2880, 2880, None)}
    variants = [dict(use_ptx=True, rows=r, blocks_per_step=b, num_warps=w, num_stages=st)
                for r, b, w, st in [(4, 32, 4, 1), (4, 32, 2, 1), (4, 32, 1, 1), (2, 32, 1, 1), (4, 16, 2, 1),
                                    (4, 64, 4, 1), (16, 32, 4, 3)]]
    if args.quick:
        variants = variants[:2]
    for name, (rows, features, swiglu_params) in shapes.items():
        key, kw, kx, kb = jax.random.split(key, 4)
        fp4, scales = random_experts(kw, args.experts, rows, features)
        bias = (jax.random.normal(kb, (args.experts, rows), jnp.float32) * 0.5).astype(jnp.bfloat16)
        w_bytes, w_scales = jax.block_until_ready(moe.packed_bytes(fp4)), mxfp4.e8m0_to_scales(scales)
        bytes_per_expert = rows * features // 32 * 17
        for pairs in (4,) if args.quick else (4, 32, 256):
            x = (jax.random.normal(kx, (pairs, features), jnp.float32) * 2).astype(jnp.bfloat16)
            pe = jax.random.randint(jax.random.fold_in(kx, 1), (pairs,), 0, args.experts, jnp.int32)
            ref = None
            if pairs <= 32:  # the reference dequantizes every pair's expert to fp32 in memory
                ref = reference(x, pe, fp4, scales, bias, swiglu_params).astype(jnp.float32)
                t_ref = loop_time(lambda x, pe: reference(x, pe, fp4, scales, bias, swiglu_params), x, pe, args.experts)
                row = {"matrix": name, "pairs": pairs, "variant": "xla_reference", "us": 1e6 * t_ref}
                report["results"].append(row)
                print(json.dumps(row), flush=True)
            for v in variants:
                if pairs > 4 and v is not variants[0]:
                    continue
                row = {"matrix": name, "pairs": pairs, "variant": v}
                try:
                    run = lambda x, pe: moe.expert_gemv(x, pe, w_bytes, w_scales, bias, swiglu_params=swiglu_params, **v)
                    out = run(x, pe).astype(jnp.float32)
                    if ref is not None:
                        row["rel_err"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                        row["max_abs_err"] = float(jnp.max(jnp.abs(out - ref)))
                    t = loop_time(run, x, pe, args.experts)
                    row.update(us=1e6 * t, gb_per_s=pairs * bytes_per_expert / t / 1e9,
                               note="GB/s counts each pair's expert bytes once per pair")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                report["results"].append(row)
                print(json.dumps(row), flush=True)
                save()
        save()
    print("\nmatrix pairs variant                                              rel_err     us    GB/s")
    for r in report["results"]:
        print(f"{r['matrix']:6s} {r['pairs']:5d} {str(r['variant'])[:60]:60s} {r.get('rel_err', float('nan')):8.1e} "
              f"{r.get('us', float('nan')):7.1f} {r.get('gb_per_s', float('nan')):6.0f} {r.get('error', '')[:80]}")


# ------------------------------------------------------------------------------ attention
L2_BYTES = 100 * 2**20  # more than an H100's (50 MB) or H200's L2: caches cycled per loop step
ATTENTION_CASES = [  # name, batch, cache slots, query position (= keys in the cache), sliding
    ("full b1 ctx0", 1, 4224, 0, False),
    ("full b1 ctx4096", 1, 4224, 4096, False),
    ("full b1 ctx32768", 1, 32896, 32768, False),
    ("sliding b1 ctx4096", 1, 128, 4096, True),
    ("full b64 ctx1024", 64, 1152, 1024, False),
    ("sliding b64 ctx1024", 64, 128, 1024, True),
]


def attention_variants(batch, slots, sliding, quick):
    """Kernel knobs to time: the defaults, then block / splits / warps / stages around them."""
    window = 128 if sliding else None
    splits = attention.default_splits(batch, 8, slots, 64, window)
    variants = [{}, dict(block=32), dict(block=128), dict(num_warps=2), dict(num_warps=8), dict(num_stages=3),
                dict(splits=splits * 2), dict(splits=splits * 4)]
    if splits > 1:
        variants += [dict(splits=splits // 2), dict(splits=splits // 2, block=128)]
    return variants[:2] if quick else variants


def attention_loop_time(step, q, caches):
    """Seconds per step(q, *cache) call: an on-device loop, each iteration calling it once
    per cache in `caches` (distinct buffers, together larger than L2)."""
    @jax.jit
    def run(q, caches):
        def body(i, q):
            for cache in caches:
                q = q + (1e-30 * step(q, *cache)).astype(q.dtype)
            return q
        return jax.lax.fori_loop(0, REPS, body, q)

    jax.block_until_ready(run(q, caches))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(run(q, caches))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / (REPS * len(caches))


def attention_case(config, key, batch, slots, position, sliding):
    """A 20b attention layer with random sinks and `copies` random caches holding positions
    0..position-1 (sliding: the ring's newest), then the step's q, k, v at `position`."""
    attn = Attention(config, 0 if sliding else 1, jnp.bfloat16)
    assert attn.sliding == sliding
    ks = jax.random.split(key, 4)
    attn.sinks.set_value(jax.random.normal(ks[0], (config.num_attention_heads,)).astype(jnp.bfloat16))
    kv, hd = config.num_key_value_heads, config.head_dim
    q = jax.random.normal(ks[1], (batch, 1, config.num_attention_heads, hd)).astype(jnp.bfloat16)
    k_new, v_new = (jax.random.normal(k, (batch, 1, kv, hd)).astype(jnp.bfloat16) for k in jax.random.split(ks[2]))
    slot = jnp.arange(slots)
    if sliding:
        held = position - 1 - ((position - 1 - slot) % slots)
        held = jnp.where(held >= 0, held, NO_POSITION)
    else:
        held = jnp.where(slot < position, slot, NO_POSITION)
    cache_positions = jnp.broadcast_to(held.astype(jnp.int32), (batch, slots))
    kv_bytes = 2 * batch * slots * kv * hd * 2
    copies = int(min(16, max(1, -(-L2_BYTES // kv_bytes))))
    caches = []
    for c in range(copies):
        kc, vc = jax.random.split(jax.random.fold_in(ks[3], c))
        caches.append((k_new, v_new, jnp.full((batch, 1), position, jnp.int32),
                       jax.random.normal(kc, (batch, slots, kv, hd)).astype(jnp.bfloat16),
                       jax.random.normal(vc, (batch, slots, kv, hd)).astype(jnp.bfloat16), cache_positions))
    return attn, q, caches


def attention_check(report, save, quick=False, variants=None, cases=None):
    config = GptOssConfig.preset("gpt-oss-20b")
    key = jax.random.key(1)
    chosen = [c for c in ATTENTION_CASES if cases is None or c[0] in cases]
    if cases is not None and len(chosen) != len(cases):
        raise SystemExit(f"--attention-cases: unknown case in {cases}; known: {[c[0] for c in ATTENTION_CASES]}")
    for name, batch, slots, position, sliding in chosen[:2] if quick else chosen:
        key, sub = jax.random.split(key)
        attn, q, caches = attention_case(config, sub, batch, slots, position, sliding)
        sinks = attn.sinks[...]

        def xla(q, k_new, v_new, positions, cache_k, cache_v, cache_positions):
            return attn.attend(q, jnp.concatenate([cache_k, k_new], 1), jnp.concatenate([cache_v, v_new], 1),
                               positions, jnp.concatenate([cache_positions, positions], 1))

        visible = min(slots, position)
        read_bytes = 2 * batch * visible * config.num_key_value_heads * config.head_dim * 2
        ref = jax.jit(xla)(q, *caches[0]).astype(jnp.float32)
        base = {"case": name, "batch": batch, "slots": slots, "position": position, "copies": len(caches)}
        runs = [("xla_reference", xla)]
        for v in variants if variants is not None else attention_variants(batch, slots, sliding, quick):
            runs.append((v, functools.partial(attention.decode_attention, sinks=sinks,
                                              window=config.sliding_window if sliding else None, **v)))
        for variant, step in runs:
            row = dict(base, variant=variant)
            try:
                out = jax.jit(step)(q, *caches[0]).astype(jnp.float32)
                row["rel_err"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                row["max_abs_err"] = float(jnp.max(jnp.abs(out - ref)))
                t = attention_loop_time(step, q, caches)
                row.update(us=1e6 * t, kv_gb_per_s=read_bytes / t / 1e9)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            save()
    print("\ncase                 variant                                   rel_err  max_abs      us  KV GB/s")
    for r in report["results"]:
        print(f"{r['case']:20s} {str(r['variant'])[:40]:40s} {r.get('rel_err', float('nan')):8.1e} "
              f"{r.get('max_abs_err', float('nan')):8.1e} {r.get('us', float('nan')):7.1f} "
              f"{r.get('kv_gb_per_s', float('nan')):8.0f} {r.get('error', '')[:80]}")
# --------------------------------------------------------------------------- grouped GEMM
# (block_m, block_n, blocks_per_step, num_warps, num_stages) with swap_ab=False, timed after the defaults
# (moe_gemm.default_tuning); --quick times the defaults and the first row only.
GEMM_VARIANTS = {
    "decode": [(16, 64, 2, 4, 3), (16, 128, 2, 4, 3), (16, 64, 4, 4, 3), (32, 64, 2, 4, 3), (16, 32, 4, 4, 4),
               (16, 64, 2, 8, 3), (16, 128, 4, 8, 3), (16, 64, 2, 4, 2)],
    "prefill": [(64, 64, 2, 4, 3), (128, 64, 2, 4, 3), (128, 128, 2, 8, 3), (128, 128, 4, 8, 3), (64, 128, 2, 4, 4),
                (128, 64, 4, 4, 4), (128, 128, 2, 8, 4), (64, 64, 4, 4, 2), (128, 256, 2, 8, 3)],
}


def gemm_variants(pairs: int, quick: bool = False):
    """Tuning dicts for moe_gemm.experts_grouped_kernel at `pairs` (token, expert) pairs."""
    table = GEMM_VARIANTS["decode" if pairs <= 2048 else "prefill"]
    rows = [dict(block_m=m, block_n=n, blocks_per_step=b, num_warps=w, num_stages=st, swap_ab=False)
            for m, n, b, w, st in table]
    rows += [dict(r, swap_ab=True) for r in rows[:3]]
    if pairs <= 2048:
        rows.append(dict(rows[0], use_ptx=False))
    return [{}] + (rows[:1] if quick else rows)  # {}: moe_gemm.default_tuning


def call_time(f, *args, reps):
    """Seconds per f(*args) call, in an on-device loop whose input depends on the last output."""
    @jax.jit
    def run(h, *rest):
        def body(_, h):
            out = f(h, *rest).reshape(-1)
            m = min(out.size, h.size)
            return h.reshape(-1).at[:m].add((1e-30 * out[:m]).astype(h.dtype)).reshape(h.shape)
        return jax.lax.fori_loop(0, reps, body, h)

    jax.block_until_ready(run(*args))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / reps


def gemm_section(args, report, save):
    """The grouped GEMM at the 20b shapes (or --experts): the whole experts computation
    (sort, mlp1 + SwiGLU, mlp2, unsort) against MoE.experts_grouped (XLA: dequantize every
    expert, ragged_dot), and each projection's kernel alone, per tiling."""
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.model import MoE

    config = GptOssConfig.preset("gpt-oss-20b").replace(num_experts=args.experts)
    d, i, k, num_experts = config.hidden_size, config.intermediate_size, config.experts_per_token, args.experts
    mlp = MoE(config, jnp.bfloat16)
    key = jax.random.key(0)
    for name, rows, features in (("mlp1", 2 * i, d), ("mlp2", d, i)):
        key, kw, kb = jax.random.split(key, 3)
        fp4, scales = random_experts(kw, num_experts, rows, features)
        getattr(mlp, f"{name}_fp4")[...] = fp4
        getattr(mlp, f"{name}_scales")[...] = scales
        getattr(mlp, f"{name}_bias")[...] = (jax.random.normal(kb, (num_experts, rows)) * 0.5).astype(jnp.bfloat16)
    w = mlp.expert_weights()
    packed = (moe.packed_bytes(w.mlp1_fp4), mxfp4.e8m0_to_scales(w.mlp1_scales), w.mlp1_bias,
              moe.packed_bytes(w.mlp2_fp4), mxfp4.e8m0_to_scales(w.mlp2_scales), w.mlp2_bias)
    packed = jax.block_until_ready(packed)
    bytes_per_expert = (2 * i * d + d * i) // 32 * 17
    swiglu = (float(config.swiglu_limit), float(config.swiglu_alpha))

    def log(row):
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        save()

    for pairs in args.pairs:
        n = pairs // k
        key, kh, ke = jax.random.split(key, 3)
        h = jax.random.normal(kh, (n, d), jnp.float32).astype(jnp.bfloat16)
        experts = jax.lax.top_k(jax.random.normal(ke, (n, num_experts)), k)[1]  # k distinct experts per token
        flops = 2 * n * k * (2 * i * d + d * i)
        touched = int(jnp.unique(experts).size)
        reps = 32 if pairs <= 2048 else 4

        def rates(t, flop_count=flops, byte_count=touched * bytes_per_expert):
            return dict(us=1e6 * t, tflop_per_s=flop_count / t / 1e12, gb_per_s=byte_count / t / 1e9)

        # The weights travel as arguments: closed over, they would be compiled in as constants.
        ref = jax.jit(lambda h, e, w: mlp.experts_grouped(h, e, w))(h, experts, w).astype(jnp.float32)
        log({"section": "gemm", "pairs": pairs, "variant": "xla_experts_grouped",
             **rates(call_time(lambda h, e, w: mlp.experts_grouped(h, e, w), h, experts, w, reps=reps))})
        for tuning in args.gemm_tunings or gemm_variants(pairs, args.quick):
            row = {"section": "gemm", "pairs": pairs, "variant": tuning}
            try:
                run = jax.jit(lambda h, e, p, t=tuning: moe_gemm.experts_grouped_kernel(
                    h, e, *p, limit=swiglu[0], alpha=swiglu[1], **t))
                out = run(h, experts, packed).astype(jnp.float32)
                row["rel_err"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                row["max_abs_err"] = float(jnp.max(jnp.abs(out - ref)))
                row.update(rates(call_time(run, h, experts, packed, reps=reps)))
                # each projection alone, on the same schedule
                one = dict(moe_gemm.default_tuning(pairs, num_experts), **tuning,
                           interpret=jax.default_backend() == "cpu")
                sched = common.tile_schedule(experts.reshape(-1), num_experts, one["block_m"])
                x = moe_gemm.parity_planes(h[sched.order // k])
                t1 = call_time(lambda x, s, p: moe_gemm.grouped_gemm(x, s, *p, swiglu_params=swiglu, **one),
                               x, sched, packed[:3], reps=reps)
                a = moe_gemm.grouped_gemm(x, sched, *packed[:3], swiglu_params=swiglu, **one)
                t2 = call_time(lambda a, s, p: moe_gemm.grouped_gemm(a, s, *p, **one), a, sched, packed[3:], reps=reps)
                row.update(mlp1_us=1e6 * t1, mlp2_us=1e6 * t2,
                           mlp1_tflop_per_s=2 * pairs * 2 * i * d / t1 / 1e12,
                           mlp2_tflop_per_s=2 * pairs * d * i / t2 / 1e12)
            except Exception as e:  # a tiling Triton refuses (shared memory, registers): record, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            log(row)
    print("\npairs variant                                                           rel_err      us  TFLOP/s   GB/s"
          "  mlp1_us  mlp2_us")
    for r in report["results"]:
        print(f"{r['pairs']:6d} {str(r['variant'])[:64]:64s} {r.get('rel_err', float('nan')):8.1e} "
              f"{r.get('us', float('nan')):8.1f} {r.get('tflop_per_s', float('nan')):7.1f} "
              f"{r.get('gb_per_s', float('nan')):6.0f} {r.get('mlp1_us', float('nan')):8.1f} "
              f"{r.get('mlp2_us', float('nan')):8.1f} {r.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
