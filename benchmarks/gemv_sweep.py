"""Why is the batch-1 GEMV below bandwidth? A sweep of tilings for the fused MXFP4 expert
GEMV and for a plain bf16 GEMV (the attention projections), timed by device kernel time
from a jax.profiler trace (not part of CI; run on a GPU).

    python benchmarks/gemv_sweep.py --json sweep.json [--quick]
    python benchmarks/gemv_sweep.py --pipeline --json pipeline.json
        # loop options (--loops) and mlp2-sums-k; --quick: the default tiling

Each timed call reads bytes no earlier call read (rotating experts / 8 weight copies), so
L2 (50 MB on an H100) does not flatter the numbers. Prints us per call and GB/s.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import summarize_trace  # noqa: E402

from gptoss_jax import mxfp4  # noqa: E402
from gptoss_jax.kernels import moe  # noqa: E402

F32 = jnp.float32
CALLS = 8


def kernel_us(fn, args_per_call, name_part: str) -> float:
    """Median device time (us) of the kernels whose name contains name_part, over CALLS calls
    of fn, each on its own arguments."""
    run = jax.jit(lambda all_args: [fn(*a) for a in all_args])
    jax.block_until_ready(run(args_per_call))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        try:
            jax.block_until_ready(run(args_per_call))
        finally:
            jax.profiler.stop_trace()
        summary = summarize_trace(trace_dir, 1, top=200)
    hits = [t for t in summary["top"] if name_part in t["name"]]
    if not hits:
        raise RuntimeError(f"no kernel named like {name_part!r}: {[t['name'] for t in summary['top'][:8]]}")
    return sum(t["us_per_step"] for t in hits) / sum(t["calls_per_step"] for t in hits)


# ------------------------------------------------------------------ a plain bf16 GEMV (Triton)
def _dense_kernel(x_ref, w_ref, b_ref, o_ref, *, rows, bk, k_total):
    from jax.experimental.pallas import triton as plgpu

    r = pl.program_id(0)
    steps = -(-k_total // bk)

    def step(i, acc):
        cols = i * bk + jnp.arange(bk)
        inside = cols < k_total
        x = plgpu.load(x_ref.at[pl.ds(i * bk, bk)], mask=inside, other=0).astype(F32)
        w = plgpu.load(w_ref.at[pl.ds(r * rows, rows), pl.ds(i * bk, bk)], mask=inside[None, :], other=0)
        return acc + jnp.sum(w.astype(F32) * x[None, :], axis=1)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((rows,), F32))
    o_ref[...] = (acc.astype(o_ref.dtype).astype(F32) + b_ref[...].astype(F32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rows", "bk", "num_warps", "num_stages", "interpret"))
def dense_gemv(x, w, b, *, rows=8, bk=256, num_warps=4, num_stages=3, interpret=False):
    """x [1, K] @ w[N, K]^T + b -> [1, N] (rounded like the model's projection)."""
    from jax.experimental.pallas import triton as plgpu

    n, k = w.shape
    return pl.pallas_call(
        functools.partial(_dense_kernel, rows=rows, bk=bk, k_total=k),
        out_shape=jax.ShapeDtypeStruct((1, n), x.dtype),
        grid=(n // rows,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY),
                  pl.BlockSpec((rows,), lambda r: (r,))],
        out_specs=pl.BlockSpec((None, rows), lambda r: (0, r)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="dense_gemv",
        interpret=interpret,
    )(x.reshape(k), w, b)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ncu", action="store_true", help="one call of the default tilings (run under ncu)")
    parser.add_argument("--pipeline", action="store_true",
                        help="the GEMVs as the model calls them (mlp2 per pair and summing the k experts), with --loops")
    parser.add_argument("--projection", action="store_true",
                        help="only the one-token projection kernels (kernels/projection.py), with --tilings")
    parser.add_argument("--router", action="store_true",
                        help="only the router logits kernel (kernels/router.py), with --tilings")
    parser.add_argument("--tokens", help="only projection.tokens_linear against XLA at these token counts, "
                        "e.g. 8,64, with --tilings ({bn, bk, num_warps, num_stages})")
    parser.add_argument("--loops", type=json.loads, help='--pipeline: GEMV loop options, e.g. [{}, {"use_ptx": false}]')
    parser.add_argument("--tilings", type=json.loads, help='--pipeline: e.g. [{"rows": 8, "num_warps": 8}]')
    parser.add_argument("--cases", help="--pipeline: comma-separated subset of mlp1+swiglu,mlp2,mlp2_sum4")
    args = parser.parse_args()
    global LOOPS, TILINGS, CASES
    LOOPS = LOOPS if args.loops is None else args.loops
    TILINGS = args.tilings
    CASES = None if args.cases is None else args.cases.split(",")
    if args.ncu:
        raw = jnp.zeros((32, 5760, 90, 16), jnp.uint8) + 0x35
        scales = jnp.full((32, 5760, 90), 127, jnp.uint8)
        bias = jnp.zeros((32, 5760), jnp.bfloat16)
        x = jnp.ones((1, 2880), jnp.bfloat16)
        pe = jnp.arange(4, dtype=jnp.int32)
        for loop in ({}, dict(use_ptx=False)):  # in this order in ncu's report
            jax.block_until_ready(moe.expert_gemv(x, pe, raw, scales, bias, pairs_per_x=4, swiglu_params=(7.0, 1.702),
                                                  **loop))
        w = jnp.ones((5120, 2880), jnp.bfloat16)
        jax.block_until_ready(dense_gemv(x, w, w[0]))
        return
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "results": []}

    def record(row):
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    key = jax.random.key(0)
    experts = 32
    if args.pipeline:
        return pipeline_sweep(key, experts, record, report["results"], args.quick)
    if args.projection:
        return projection_sweep(key, record)
    if args.router:
        return router_sweep(key, record)
    if args.tokens:
        return tokens_sweep(key, record, [int(t) for t in args.tokens.split(",")])
    # ---- fused MXFP4 expert GEMV, 4 pairs (batch 1, top-4)
    grid = [dict(rows=r, blocks_per_step=b, num_warps=w, num_stages=s)
            for (r, b), w, s in itertools.product(
                [(4, 32), (8, 16), (8, 32), (8, 128), (16, 8), (16, 16), (16, 32), (32, 8), (32, 16), (64, 8)],
                [4, 8], [1, 3])]
    if args.quick:
        grid = grid[:4]
    for name, (out_rows, features, swiglu) in {"mlp1+swiglu": (5760, 2880, (7.0, 1.702)),
                                               "mlp2": (2880, 2880, None)}.items():
        k1, k2, k3, key = jax.random.split(key, 4)
        raw = jax.random.randint(k1, (experts, out_rows, features // 32, 16), 0, 256, jnp.int32).astype(jnp.uint8)
        scales = jax.random.randint(k2, (experts, out_rows, features // 32), 118, 134, jnp.int32).astype(jnp.uint8)
        bias = jax.random.normal(k3, (experts, out_rows), F32).astype(jnp.bfloat16)
        x = jax.random.normal(k3, (1, features), F32).astype(jnp.bfloat16)
        calls = [(x, jnp.arange(4 * i, 4 * i + 4, dtype=jnp.int32) % experts) for i in range(CALLS)]
        fp4 = mxfp4.blocks_to_fp4(raw[:4])
        ref = jnp.einsum("d,pod->po", x[0].astype(F32), mxfp4.dequantize(fp4, mxfp4.scales_to_e8m0(scales[:4]), F32),
                         precision=jax.lax.Precision.HIGHEST)
        ref = ref.astype(jnp.bfloat16) + bias[:4]
        if swiglu:
            ref = moe.swiglu_pair(ref[:, 0::2], ref[:, 1::2], *swiglu, jnp.bfloat16)
        ref = np.asarray(ref.astype(F32))
        nbytes = 4 * out_rows * features // 32 * 17
        variants = grid if name.startswith("mlp1") else grid[:: max(1, len(grid) // 12)]
        for v in variants:
            row = {"matrix": name, **v}
            try:
                fn = lambda x, pe, v=v: moe.expert_gemv(x, pe, raw, scales, bias, pairs_per_x=4,
                                                        swiglu_params=swiglu, **v)
                out = np.asarray(fn(*calls[0]).astype(F32))
                row["max_rel_err"] = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                us = kernel_us(fn, calls, "mxfp4_expert_gemv")
                row.update(us=us, gb_per_s=nbytes / us / 1e3)
            except Exception as e:  # a tiling Triton rejects: record it and go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            record(row)

    # ---- bf16 GEMV at the attention projection shapes (q/k/v fused = 5120 x 2880, o = 2880 x 4096)
    for name, (n, k) in {"qkv": (5120, 2880), "o": (2880, 4096)}.items():
        kw, kb, key = jax.random.split(key, 3)
        ws = [jax.random.normal(jax.random.fold_in(kw, i), (n, k), F32).astype(jnp.bfloat16) for i in range(CALLS)]
        b = jax.random.normal(kb, (n,), F32).astype(jnp.bfloat16)
        x = jax.random.normal(kb, (1, k), F32).astype(jnp.bfloat16)
        calls = [(x, w, b) for w in ws]
        nbytes = n * k * 2
        xla = lambda x, w, b: (jnp.einsum("bd,nd->bn", x, w, preferred_element_type=F32).astype(x.dtype)
                               .astype(F32) + b.astype(F32)).astype(x.dtype)
        ref = np.asarray(xla(x, ws[0], b).astype(F32))
        try:
            run = jax.jit(lambda all_args: [xla(*a) for a in all_args])
            jax.block_until_ready(run(calls))
            with tempfile.TemporaryDirectory() as trace_dir:
                jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
                jax.block_until_ready(run(calls))
                jax.profiler.stop_trace()
                top = summarize_trace(trace_dir, 1, top=10)["top"]
            record({"matrix": name, "variant": "xla", "kernels": top[:4],
                    "gb_per_s_top": nbytes * CALLS / top[0]["us_per_step"] / 1e3})
        except Exception as e:
            record({"matrix": name, "variant": "xla", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        dense_grid = [dict(rows=r, bk=bk, num_warps=w, num_stages=s)
                      for r, bk, w, s in itertools.product([4, 8, 16], [256, 512], [4], [1, 3])]
        if args.quick:
            dense_grid = dense_grid[:3]
        for v in dense_grid:
            row = {"matrix": name, "variant": "pallas_dense", **v}
            try:
                fn = lambda x, w, b, v=v: dense_gemv(x, w, b, **v)
                out = np.asarray(fn(*calls[0]).astype(F32))
                row["max_rel_err"] = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                us = kernel_us(fn, calls, "dense_gemv")
                row.update(us=us, gb_per_s=nbytes / us / 1e3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            record(row)

    print("\nbest per matrix:")
    for m in ("mlp1+swiglu", "mlp2", "qkv", "o"):
        ok = [r for r in report["results"] if r.get("matrix") == m and "us" in r]
        for r in sorted(ok, key=lambda r: r["us"])[:5]:
            print(m, {k: r[k] for k in r if k not in ("matrix",)})


def random_experts(key, experts, out_rows, features):
    k1, k2, k3 = jax.random.split(key, 3)
    raw = jax.random.randint(k1, (experts, out_rows, features // 32, 16), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.randint(k2, (experts, out_rows, features // 32), 118, 134, jnp.int32).astype(jnp.uint8)
    bias = jax.random.normal(k3, (experts, out_rows), F32).astype(jnp.bfloat16)
    return raw, scales, bias


def projection_sweep(key, record):
    """The one-token projection kernels at the gpt-oss-20b shape, one call per weight copy,
    per entry of --tilings: {"kernel": "norm_qkv" (default) or "output_residual", and its
    rows, bk, num_warps, num_stages}. norm_qkv: RMSNorm + q/k/v (64 + 8 + 8
    heads of 64 over 2880 features); output_residual: 2880 outputs over 64 x 64 attention
    values + the residual. Outputs are compared with the first entry of the same kernel."""
    from gptoss_jax.kernels.projection import norm_qkv, output_residual

    heads = {"q": 64, "k": 8, "v": 8}
    qkv_copies, o_copies = [], []
    for i in range(CALLS):
        keys = jax.random.split(jax.random.fold_in(key, i), 7)
        qkv_copies.append([(jax.random.normal(keys[j], (n, 64, 2880), F32) * 0.02).astype(jnp.bfloat16)
                           for j, n in enumerate(heads.values())])
        o_copies.append([(jax.random.normal(keys[6], (2880, 64, 64), F32) * 0.02).astype(jnp.bfloat16)])
    x = jax.random.normal(key, (2880,), F32).astype(jnp.bfloat16)
    attn = jax.random.normal(jax.random.fold_in(key, 99), (64, 64), F32).astype(jnp.bfloat16)
    gain = jnp.ones((2880,), jnp.bfloat16)
    biases = [jnp.zeros((n, 64), jnp.bfloat16) for n in heads.values()]
    bo = jnp.zeros((2880,), jnp.bfloat16)
    cases = {
        "norm_qkv": (lambda v: lambda wq, wk, wv: norm_qkv(x, gain, wq, biases[0], wk, biases[1], wv, biases[2],
                                                           eps=1e-5, **v), qkv_copies, 80 * 64 * 2880 * 2),
        "output_residual": (lambda v: lambda wo: output_residual(attn, wo, bo, x, **v), o_copies, 2880 * 4096 * 2),
    }
    base = {}
    for entry in TILINGS or [dict(rows=8, bk=512, num_warps=8, num_stages=1)]:
        v = dict(entry)
        kernel = v.pop("kernel", "norm_qkv")
        make, copies, nbytes = cases[kernel]
        row = {"matrix": kernel, **v}
        try:
            fn = make(v)
            got = fn(*copies[0])
            out = np.concatenate([np.asarray(a, np.float32).ravel() for a in (got if isinstance(got, (tuple, list)) else [got])])
            base.setdefault(kernel, out)
            row["max_abs_diff_vs_first"] = float(np.max(np.abs(out - base[kernel])))
            us = kernel_us(fn, copies, "norm_qkv" if kernel == "norm_qkv" else "output_residual")
            row.update(us=us, gb_per_s=nbytes / us / 1e3)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        record(row)


def router_sweep(key, record):
    """norm_router_logits at the 20b (32 experts) and 120b (128) router shapes, one call per
    weight copy, per entry of --tilings ({"experts": 32 or 128, experts_per_program,
    num_warps}); the top-k kernel once per shape for comparison."""
    from gptoss_jax.kernels.router import norm_router_logits, top_k_softmax

    x = jax.random.normal(key, (1, 2880), F32).astype(jnp.bfloat16)
    gain = jnp.ones((2880,), jnp.bfloat16)
    copies = {e: [((jax.random.normal(jax.random.fold_in(key, 10 * e + i), (e, 2880), F32) * 0.02).astype(jnp.bfloat16),
                   jnp.zeros((e,), jnp.bfloat16)) for i in range(CALLS)] for e in (32, 128)}
    for e in (32, 128):
        logits = norm_router_logits(x, gain, *copies[e][0], eps=1e-5)[1]
        us = kernel_us(lambda lg: top_k_softmax(lg, k=4), [(logits,)] * CALLS, "router_top_k")
        record({"kernel": "router_top_k_softmax", "experts": e, "us": us})
    base = {}
    for entry in TILINGS or [dict(experts=32, experts_per_program=1, num_warps=4)]:
        v = dict(entry)
        e = v.pop("experts", 32)
        row = {"kernel": "norm_router_logits", "experts": e, **v}
        try:
            fn = lambda w, b, v=v: norm_router_logits(x, gain, w, b, eps=1e-5, **v)
            out = np.asarray(fn(*copies[e][0])[1], np.float32)
            base.setdefault(e, out)
            row["max_abs_diff_vs_first"] = float(np.max(np.abs(out - base[e])))
            row["us"] = kernel_us(fn, copies[e], "norm_router_logits")
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        record(row)


def tokens_sweep(key, record, token_counts):
    """projection.tokens_linear at the 20b attention shapes (q/k/v in one kernel; the output
    projection with the residual add), one call per weight copy, against the XLA einsums
    with the same roundings (Attention.project / Attention.output + the residual add)."""
    from gptoss_jax.kernels.projection import tokens_linear

    bf16 = jnp.bfloat16
    copies = []
    for i in range(CALLS):
        ks = jax.random.split(jax.random.fold_in(key, i), 4)
        copies.append(([(jax.random.normal(ks[j], (rows, 2880), F32) * 0.02).astype(bf16)
                        for j, rows in enumerate((4096, 512, 512))],
                       (jax.random.normal(ks[3], (2880, 4096), F32) * 0.02).astype(bf16)))
    qkv_b = [jnp.zeros((r,), bf16) for r in (4096, 512, 512)]
    o_b = jnp.zeros((2880,), bf16)

    def xla_qkv(h, wq, wk, wv):
        return [(jnp.einsum("nd,od->no", h, w, preferred_element_type=F32) + b.astype(F32)).astype(bf16)
                for w, b in zip((wq, wk, wv), qkv_b)]

    def xla_out(a, x, wo):
        proj = (jnp.einsum("nd,od->no", a, wo, preferred_element_type=F32) + o_b.astype(F32)).astype(bf16)
        return x + proj

    for n in token_counts:
        h = jax.random.normal(jax.random.fold_in(key, 100 + n), (n, 2880), F32).astype(bf16)
        a = jax.random.normal(jax.random.fold_in(key, 200 + n), (n, 4096), F32).astype(bf16)
        qkv_calls = [(h, *ws) for ws, _ in copies]
        o_calls = [(a, h, wo) for _, wo in copies]
        want_qkv = np.concatenate([np.asarray(t, np.float32).ravel() for t in xla_qkv(*qkv_calls[0])])
        want_o = np.asarray(xla_out(*o_calls[0]), np.float32)
        for name, fn, calls in (("qkv", xla_qkv, qkv_calls), ("output_residual", xla_out, o_calls)):
            run = jax.jit(lambda all_args, fn=fn: [fn(*c) for c in all_args])
            jax.block_until_ready(run(calls))
            with tempfile.TemporaryDirectory() as trace_dir:
                jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
                jax.block_until_ready(run(calls))
                jax.profiler.stop_trace()
                summary = summarize_trace(trace_dir, CALLS, top=12)
            record({"matrix": name, "tokens": n, "variant": "xla", "us_per_call": summary["device_busy_ms_per_step"] * 1e3,
                    "kernels": [(t["name"], round(t["us_per_step"], 2)) for t in summary["top"]]})
        for v in TILINGS or [dict(bn=32, bk=128, num_warps=4, num_stages=3)]:
            for name in ("qkv", "output_residual"):
                row = {"matrix": name, "tokens": n, "variant": "tokens_linear", **v}
                try:
                    if name == "qkv":
                        fn = lambda h, wq, wk, wv, v=v: tokens_linear(h, (wq, wk, wv), qkv_b, **v)
                        calls, want = qkv_calls, want_qkv
                    else:
                        fn = lambda a, x, wo, v=v: tokens_linear(a, (wo,), (o_b,), x, **v)[0]
                        calls, want = o_calls, want_o
                    got = fn(*calls[0])
                    got = np.concatenate([np.asarray(t, np.float32).ravel() for t in (got if isinstance(got, tuple) else [got])])
                    row["bit_equal_fraction"] = float(np.mean(got.ravel() == want.ravel()))
                    row["max_abs_diff"] = float(np.max(np.abs(got.ravel() - want.ravel())))
                    row["us_per_call"] = kernel_us(fn, calls, "tokens_linear")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                record(row)


LOOPS = [{}, dict(use_ptx=False)]  # --loops
TILINGS = None  # --tilings
CASES = None  # --cases


def pipeline_sweep(key, experts, record, results, quick):
    """The two batch-1 GEMVs as the model calls them: mlp1 + SwiGLU over 4 pairs, and mlp2
    either per pair (then an XLA weighted sum) or summing the 4 experts in the kernel; each
    with and without hand-pipelined loads. Errors against the plain loop are recorded."""
    features = 2880
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w1 = random_experts(k1, experts, 2 * features, features)
    w2 = random_experts(k2, experts, features, features)
    x = jax.random.normal(k3, (1, features), F32).astype(jnp.bfloat16)
    a = jax.random.normal(k4, (4, features), F32).astype(jnp.bfloat16)
    weights = jnp.asarray([0.4, 0.3, 0.2, 0.1], jnp.bfloat16)
    ids = [jnp.arange(4 * i, 4 * i + 4, dtype=jnp.int32) % experts for i in range(CALLS)]
    tilings = TILINGS or ([dict(rows=8, blocks_per_step=32, num_warps=4)] if quick else [
        dict(rows=r, blocks_per_step=b, num_warps=w) for r, b, w in itertools.product([2, 4, 8], [16, 32], [4, 8])])
    loops = LOOPS
    cases = {
        "mlp1+swiglu": (lambda pe, **v: moe.expert_gemv(x, pe, *w1, pairs_per_x=4, swiglu_params=(7.0, 1.702), **v),
                        4 * 2 * features * features // 32 * 17),
        "mlp2": (lambda pe, **v: moe.expert_gemv(a, pe, *w2, **v), 4 * features * features // 32 * 17),
        "mlp2_sum4": (lambda pe, **v: moe.expert_gemv(a, pe, *w2, weights, pairs_per_program=4, **v),
                      4 * features * features // 32 * 17),
    }
    # The same GEMVs with the integer nibble decode (no PTX): every variant must match it.
    cases = {name: case for name, case in cases.items() if CASES is None or name in CASES}
    for name, (call, nbytes) in cases.items():
        base = np.asarray(call(ids[0], use_ptx=False).astype(F32))
        for v, loop in itertools.product(tilings, loops):
            row = {"matrix": name, **v, **loop}
            if name == "mlp2" and (any(loop.values()) or v["num_warps"] == 8):
                continue  # mlp2 per pair is the baseline only
            try:
                fn = lambda pe, v=v, loop=loop: call(pe, **loop, **v)
                out = np.asarray(fn(ids[0]).astype(F32))
                row["max_rel_err_vs_integer_decode"] = float(np.max(np.abs(out - base)) / np.max(np.abs(base)))
                us = kernel_us(fn, [(pe,) for pe in ids], "mxfp4_expert_gemv")
                row.update(us=us, gb_per_s=nbytes / us / 1e3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            record(row)
    print("\nbest per matrix:")
    for m in cases:
        ok = [r for r in results if r.get("matrix") == m and "us" in r]
        for r in sorted(ok, key=lambda r: r["us"])[:5]:
            print(m, r)


if __name__ == "__main__":
    main()
