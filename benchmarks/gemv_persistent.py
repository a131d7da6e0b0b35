"""A persistent-grid variant of the batch-1 MXFP4 expert GEMV (`kernels.moe.expert_gemv`),
checked bit-for-bit against it and timed at the gpt-oss-20b shapes (GPU; not part of CI).

    python benchmarks/gemv_persistent.py --json gemv.json          # GPU, ~3-4 min on an H100
    python benchmarks/gemv_persistent.py --interpret --small        # CPU: exactness only
    python benchmarks/gemv_persistent.py --lower                    # CPU: the GPU variants lower for cuda

The variant (`persistent_gemv`, same arguments and results as `expert_gemv`):
- a fixed grid of `programs` programs (e.g. a multiple of the 132 SMs) instead of one
  program per (pair group, row tile): program g does tasks g, g + programs, ... of the
  (pair group, row tile) list, row tiles minor, so programs running at once read adjacent rows;
- the task loop and the contraction loop flattened into one loop over (task, step), so that
  with `loop_stages` Triton's software pipeliner (the loop marked with `tt.num_stages`, which
  also pipelines loads that feed no dot) keeps the next steps' loads in flight across task
  boundaries instead of ramping per program. Each iteration computes the epilogue (bias,
  SwiGLU, the weighted sum over a token's experts, the residual) of its accumulators and stores
  it masked to the task's last step; the accumulators restart at zero after it. With
  `unroll_steps` the loop is over tasks and a task's steps are unrolled, so that all its
  loads can be issued before the first is consumed (and `loop_stages` pipelines whole tasks);
- optionally (`x_prepared`) x converted to fp32 and split into even and odd feature planes
  [X, 2, D/2] once, outside the kernel, so that each step loads two contiguous fp32 rows
  (exact: bf16 -> fp32 is exact and the products and sums are the same).
The per-step loads, the FP4 decode, the fp32 dot per pair, its rounding, the bias and the
SwiGLU are those of `_gemv_kernel`, in the same order, so the outputs should be identical.

Timing: device kernel time from a jax.profiler trace (as benchmarks/gemv_sweep.py), of 8
calls that each read 4 experts no earlier call read (32 experts: 282 MB for mlp1, beyond
the 50 MB L2), or wall time of the jitted 8 calls where the trace has no such kernel.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gptoss_jax import mxfp4  # noqa: E402
from gptoss_jax.kernels import moe  # noqa: E402
from gptoss_jax.kernels.common import (  # noqa: E402
    F32,
    block_scale,
    decode_nibbles,
    decode_nibbles_ptx,
    next_power_of_2,
    round_to,
    swiglu_pair,
)

SMS = 132  # H100 SXM
SWIGLU = (7.0, 1.702)
MLP1, MLP2 = "mlp1+swiglu", "mlp2_sum4+residual"


# ------------------------------------------------------------------ tt.num_stages on a loop
@functools.cache
def _stages_primitive():
    """A primitive that, lowered inside a fori_loop body of a Pallas Triton kernel, sets
    `tt.num_stages` on the enclosing scf.for (docs/performance-log.md entry 48)."""
    from jax._src import core as jax_core
    from jax._src import effects
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    class LoopHint(jax_core.Effect):
        """Keeps the hint from being removed as dead code: it has no result."""

    effect = LoopHint()
    effects.control_flow_allowed_effects.add_type(LoopHint)
    prim = jax_core.Primitive("pipeline_loop_hint")
    prim.multiple_results = True

    @prim.def_effectful_abstract_eval
    def _abstract_eval(*, stages):
        del stages
        return [], {effect}

    @lowering.register_lowering(prim)
    def _lower(ctx, *, stages):
        del ctx
        loop = ir.InsertionPoint.current.block.owner
        if loop.name != "scf.for":
            raise ValueError(f"pipeline_loop: call it inside a fori_loop body, not in {loop.name}")
        loop.attributes["tt.num_stages"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), stages)
        return []

    return prim


# ------------------------------------------------------------------ the persistent GEMV
def _persistent_kernel(expert_ref, weight_ref, x_ref, w_ref, s_ref, bias_ref, residual_ref, out_ref, *, rows: int,
                       blocks_per_step: int, num_blocks: int, pairs_per_x: int, pairs_per_program: int, use_ptx: bool,
                       swiglu_params, add_residual: bool, num_tasks: int, row_blocks: int, programs: int,
                       tasks_per_program: int, x_prepared: bool, dt, loop_stages: int, unroll_steps: bool):
    """Program g: tasks g, g + programs, ... (task t = row tile t % row_blocks of pair group
    t // row_blocks). Per task the same work as one program of moe._gemv_kernel. One loop:
    over (task, contraction step), or with unroll_steps over tasks, the steps unrolled."""
    pid = pl.program_id(0)
    num_experts = w_ref.shape[0]
    steps = -(-num_blocks // blocks_per_step)
    half = blocks_per_step * 16

    def task_of(k):
        """The program's k-th task: validity, pair group, row tile, per pair its expert and
        liveness, and the row slices of its accumulators (as in _gemv_kernel)."""
        task = pid + k * programs
        valid = task < num_tasks
        task = jnp.minimum(task, num_tasks - 1)
        program, row_block = jax.lax.div(task, row_blocks), jax.lax.rem(task, row_blocks)  # non-negative
        pairs = [program * pairs_per_program + j for j in range(pairs_per_program)]
        experts = [expert_ref[p] for p in pairs]
        live = [valid & (e >= 0) & (e < num_experts) for e in experts]
        experts = [jnp.clip(e, 0, num_experts - 1) for e in experts]
        if swiglu_params is None:
            row_slices = [(pl.ds(row_block * rows // 2, rows // 2), pl.ds(0, 2))]
        else:
            row_slices = [(pl.ds(row_block * rows, rows), pl.ds(0, 1)), (pl.ds(row_block * rows, rows), pl.ds(1, 1))]
        streams = [(j, sl) for j in range(pairs_per_program) for sl in row_slices]
        return dict(valid=valid, program=program, row_block=row_block, pairs=pairs, experts=experts, live=live,
                    streams=streams)

    def accumulate(t, step, accs):
        """The step's loads and products (as _gemv_kernel's load(i) and accumulate)."""
        start = jnp.asarray(step * blocks_per_step, jnp.int32)  # (a static start would be bounds-checked)
        in_range = start + jnp.arange(blocks_per_step) < num_blocks
        xs = []
        for j in range(pairs_per_program):
            x_row = t["pairs"][j] // pairs_per_x
            if x_prepared:
                x_mask = jnp.broadcast_to(in_range[None, :, None], (1, blocks_per_step, 16)).reshape(1, half)
                xs += [plgpu.load(x_ref.at[x_row, pl.ds(parity, 1), pl.ds(start * 16, half)], mask=x_mask, other=0)
                       for parity in (0, 1)]
            else:
                x_mask = jnp.broadcast_to(in_range[:, None, None], (blocks_per_step, 16, 1)).reshape(half, 1)
                xs += [plgpu.load(x_ref.at[x_row, pl.ds(start * 16, half), pl.ds(parity, 1)], mask=x_mask, other=0)
                       for parity in (0, 1)]
        weights = []
        for j, (pair_slice, half_slice) in t["streams"]:
            ok = in_range & t["live"][j]
            w_mask = jnp.broadcast_to(ok[None, None, :, None], (pair_slice.size, half_slice.size, blocks_per_step, 16))
            s_mask = jnp.broadcast_to(ok[None, None, :], (pair_slice.size, half_slice.size, blocks_per_step))
            blocks = pl.ds(start, blocks_per_step)
            w = plgpu.load(w_ref.at[t["experts"][j], pair_slice, half_slice, blocks, :], mask=w_mask, other=0)
            s_ = plgpu.load(s_ref.at[t["experts"][j], pair_slice, half_slice, blocks], mask=s_mask, other=0)
            weights += [w.reshape(rows, blocks_per_step, 16), s_.reshape(rows, blocks_per_step)]
        new = []
        for m, (acc, (j, _)) in enumerate(zip(accs, t["streams"])):
            xe = xs[2 * j].astype(F32).reshape(blocks_per_step, 16)[None]
            xo = xs[2 * j + 1].astype(F32).reshape(blocks_per_step, 16)[None]
            w, s_ = weights[2 * m], weights[2 * m + 1]
            scale = block_scale(s_)
            low, high = decode_nibbles_ptx(w) if use_ptx else decode_nibbles(w.astype(jnp.int32))
            pair_sums = moe._fma(high, xo, low * xe) if use_ptx else low * xe + high * xo
            new.append(acc + jnp.sum(jnp.sum(pair_sums, axis=2) * scale, axis=1))
        return tuple(new)

    def finish(t, accs, store):
        """The epilogue of _gemv_kernel, stored where `store` (a scalar bool)."""
        outs = [round_to(round_to(a, dt) + bias_ref[t["experts"][j], pair_slice, half_slice].reshape(rows).astype(F32),
                         dt)
                for a, (j, (pair_slice, half_slice)) in zip(accs, t["streams"])]
        if swiglu_params is not None:
            outs = [swiglu_pair(outs[2 * j], outs[2 * j + 1], *swiglu_params, dt).astype(F32)
                    for j in range(pairs_per_program)]
        if pairs_per_program == 1:
            result = outs[0]
        else:  # the weighted sum over the token's experts, in fp32 in slot order
            result = jnp.zeros((rows,), F32)
            for j, y in enumerate(outs):
                result = result + jnp.where(t["live"][j], weight_ref[t["pairs"][j]].astype(F32) * y, 0.0)
            if add_residual:
                residual = plgpu.load(residual_ref.at[t["program"], pl.ds(t["row_block"] * rows, rows)]).astype(F32)
                result = round_to(result, out_ref.dtype) + residual
        plgpu.store(out_ref.at[t["program"], pl.ds(t["row_block"] * rows, rows)], result.astype(out_ref.dtype),
                    mask=jnp.broadcast_to(store, (rows,)))

    zeros = tuple(jnp.zeros((rows,), F32) for _ in range(pairs_per_program * (1 if swiglu_params is None else 2)))
    if unroll_steps:
        def task_body(k, carry):
            if loop_stages:
                _stages_primitive().bind(stages=loop_stages)
            t = task_of(k)
            accs = zeros
            for step in range(steps):
                accs = accumulate(t, step, accs)
            finish(t, accs, t["valid"])
            return carry

        jax.lax.fori_loop(0, tasks_per_program, task_body, jnp.int32(0))
    else:
        def step_body(n, accs):
            if loop_stages:
                _stages_primitive().bind(stages=loop_stages)
            t = task_of(jax.lax.div(n, steps))
            step = jax.lax.rem(n, steps)
            accs = accumulate(t, step, accs)
            last = step == steps - 1
            finish(t, accs, last & t["valid"])
            return tuple(jnp.where(last, 0.0, a) for a in accs)

        jax.lax.fori_loop(0, tasks_per_program * steps, step_body, zeros)


def prepare_x(x):
    """x [X, D] -> fp32 [X, 2, D/2]: the even features, then the odd ones (exact)."""
    return x.astype(F32).reshape(x.shape[0], x.shape[1] // 2, 2).transpose(0, 2, 1)


@functools.partial(jax.jit, static_argnames=("pairs_per_x", "pairs_per_program", "swiglu_params", "rows",
                                             "blocks_per_step", "num_warps", "num_stages", "programs",
                                             "loop_stages", "x_prepared", "unroll_steps", "use_ptx",
                                             "interpret"))
def persistent_gemv(x, pair_expert, w_bytes, w_scales, bias, pair_weight=None, residual=None, *, pairs_per_x=1,
                    pairs_per_program=1, swiglu_params=None, rows=8, blocks_per_step=32, num_warps=4, num_stages=1,
                    programs=4 * SMS, loop_stages=0, x_prepared=False, unroll_steps=False, use_ptx=True,
                    interpret=False):
    """moe.expert_gemv's arguments and results, on a grid of `programs` programs (at most one
    per task). x_prepared: x is converted by `prepare_x` here, before the kernel."""
    d = x.shape[1]
    num_pairs = pair_expert.shape[0]
    _, out_rows, num_blocks, _ = w_bytes.shape
    if d != num_blocks * mxfp4.BLOCK:
        raise ValueError(f"persistent_gemv: x has {d} features but the weights hold {num_blocks} blocks of 32")
    if num_pairs % pairs_per_program or (pairs_per_program > 1) != (pair_weight is not None):
        raise ValueError(f"persistent_gemv: {num_pairs} pairs in groups of {pairs_per_program} need "
                         f"{'pair_weight' if pairs_per_program > 1 else 'no pair_weight'}")
    outputs = out_rows if swiglu_params is None else out_rows // 2
    groups = num_pairs // pairs_per_program
    rows = max(2, min(rows, next_power_of_2(outputs)))
    if outputs % rows:
        raise ValueError(f"persistent_gemv: {outputs} outputs are not a multiple of the row tile {rows}")
    blocks_per_step = min(blocks_per_step, next_power_of_2(num_blocks))
    row_blocks = outputs // rows
    num_tasks = groups * row_blocks
    programs = max(1, min(programs, num_tasks))
    tasks_per_program = -(-num_tasks // programs)
    kernel = functools.partial(
        _persistent_kernel, rows=rows, blocks_per_step=blocks_per_step, num_blocks=num_blocks, pairs_per_x=pairs_per_x,
        pairs_per_program=pairs_per_program, use_ptx=use_ptx and not interpret, swiglu_params=swiglu_params,
        add_residual=residual is not None, num_tasks=num_tasks, row_blocks=row_blocks, programs=programs,
        tasks_per_program=tasks_per_program, x_prepared=x_prepared, dt=x.dtype,
        loop_stages=0 if interpret else loop_stages, unroll_steps=unroll_steps)
    if pair_weight is None:
        pair_weight = jnp.zeros((num_pairs,), x.dtype)
    out_dtype = x.dtype if pairs_per_program == 1 else F32 if residual is None else residual.dtype
    if residual is None:
        residual = jnp.zeros((1, 1), x.dtype)
    x_view = prepare_x(x) if x_prepared else x.reshape(x.shape[0], d // 2, 2)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, outputs), out_dtype),
        grid=(programs,),
        in_specs=[anywhere] * 7,
        out_specs=anywhere,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="persistent_gemv" if swiglu_params is None else "persistent_gemv_swiglu",
    )(pair_expert.astype(jnp.int32), pair_weight, x_view,
      w_bytes.reshape(-1, out_rows // 2, 2, num_blocks, 16),
      jax.lax.bitcast_convert_type(w_scales, jnp.uint8).reshape(-1, out_rows // 2, 2, num_blocks),
      bias.reshape(-1, out_rows // 2, 2), residual)


# ------------------------------------------------------------------ inputs, checks, timing
def make_inputs(key, experts, features, hidden, calls, dead_ids=False):
    """Random MXFP4 experts (all 256 byte values, scales 2^-11..2^-2 as E8M0 116..125: outputs of order 1), x, and per
    call 4 expert ids (rotating, so successive calls read other experts; with dead_ids one
    id per call is -1: another device's expert)."""
    ks = jax.random.split(key, 10)

    def matrix(k, out_rows, d):
        k1, k2, k3 = jax.random.split(k, 3)
        raw = jax.random.randint(k1, (experts, out_rows, d // 32, 16), 0, 256, jnp.int32).astype(jnp.uint8)
        scales = jax.random.randint(k2, (experts, out_rows, d // 32), 116, 126, jnp.int32).astype(jnp.uint8)
        bias = (jax.random.normal(k3, (experts, out_rows), F32) * 0.5).astype(jnp.bfloat16)
        return raw, scales, bias

    w1 = matrix(ks[0], 2 * hidden, features)
    w2 = matrix(ks[1], features, hidden)
    x = jax.random.normal(ks[2], (1, features), F32).astype(jnp.bfloat16)
    ids = [jnp.arange(4 * i, 4 * i + 4, dtype=jnp.int32) % experts for i in range(calls)]
    if dead_ids:
        ids = [pe.at[i % 4].set(-1) for i, pe in enumerate(ids)]
    routing = jax.nn.softmax(jax.random.normal(ks[3], (4,), F32)).astype(jnp.bfloat16)
    residual = jax.random.normal(ks[4], (1, features), F32).astype(jnp.bfloat16)
    return w1, w2, x, ids, routing, residual


def kernel_us(run, args, name_part):
    """Mean device time (us) per kernel whose name contains name_part, from a
    profiler trace of one run(args) (after a warm-up); falls back to wall time / calls."""
    from bench import summarize_trace

    jax.block_until_ready(run(args))
    try:
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            try:
                jax.block_until_ready(run(args))
            finally:
                jax.profiler.stop_trace()
            summary = summarize_trace(trace_dir, 1, top=200)
        hits = [t for t in summary["top"] if name_part in t["name"]]
        if hits:
            return sum(t["us_per_step"] for t in hits) / sum(t["calls_per_step"] for t in hits), "trace"
    except Exception:  # no trace: wall time below
        traceback.print_exc()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(run(args))
        best = min(best, time.perf_counter() - t0)
    return best * 1e6 / len(args), "wall"


def compare(got, want):
    got, want = np.asarray(jnp.asarray(got).astype(F32)), np.asarray(jnp.asarray(want).astype(F32))
    differ = got != want
    both_nan = np.isnan(got) & np.isnan(want)
    differ &= ~both_nan
    return {"elements": int(got.size), "differ": int(differ.sum()),
            "max_abs_diff": float(np.max(np.abs(np.where(differ, got - want, 0)))) if differ.any() else 0.0}


def cases(w1, w2, x, routing, residual):
    """name -> (baseline fn(pe[, a], **options), variant fn(pe[, a], **options), weight bytes per call)."""
    def mlp1_base(pe, **v):
        return moe.expert_gemv(x, pe, *w1, pairs_per_x=4, swiglu_params=SWIGLU, **v)

    def mlp1_var(pe, **v):
        return persistent_gemv(x, pe, *w1, pairs_per_x=4, swiglu_params=SWIGLU, **v)

    def mlp2_base(pe, a, **v):
        return moe.expert_gemv(a, pe, *w2, routing, residual, pairs_per_program=4, **v)

    def mlp2_var(pe, a, **v):
        return persistent_gemv(a, pe, *w2, routing, residual, pairs_per_program=4, **v)

    b1 = w1[0].shape[1] * w1[0].shape[2] * 17 * 4
    b2 = w2[0].shape[1] * w2[0].shape[2] * 17 * 4
    return {MLP1: (mlp1_base, mlp1_var, b1), MLP2: (mlp2_base, mlp2_var, b2)}


# (case, options of the persistent kernel), most telling first: --budget-s may cut the tail.
# The baselines (expert_gemv's defaults: rows 8, 32 blocks per step, 4 warps, 1 stage) run first.
GPU_VARIANTS = [
    (MLP1, dict(programs=5 * SMS)),  # (a) alone: 5 programs per SM (the baseline's occupancy), no pipelining
    (MLP1, dict(programs=4 * SMS, loop_stages=3, num_stages=3, blocks_per_step=16, x_prepared=True)),  # (a) + (b)
    (MLP2, dict(programs=2 * SMS, loop_stages=3, num_stages=3, blocks_per_step=16, x_prepared=True)),
    (MLP1, dict(programs=5 * SMS, unroll_steps=True, x_prepared=True)),  # a task's 3 steps of loads at once
    (MLP1, dict(programs=2 * SMS, loop_stages=3, num_stages=3, blocks_per_step=32, x_prepared=True)),
    (MLP2, dict(programs=3 * SMS, unroll_steps=True, x_prepared=True)),
    (MLP1, dict(programs=3 * SMS, unroll_steps=True, loop_stages=2, num_stages=2, x_prepared=True)),
    (MLP1, dict(programs=5 * SMS, x_prepared=True)),  # (b) on top of the plain persistent grid
    (MLP2, dict(programs=3 * SMS, x_prepared=True)),
    (MLP1, dict(programs=4 * SMS, loop_stages=4, num_stages=4, blocks_per_step=8, x_prepared=True)),
    (MLP1, dict(programs=2 * SMS, loop_stages=3, num_stages=3, blocks_per_step=16, x_prepared=True)),
    (MLP2, dict(programs=2 * SMS, loop_stages=3, num_stages=3, blocks_per_step=8, x_prepared=True)),
    (MLP1, dict(programs=2 * SMS, loop_stages=3, num_stages=3, blocks_per_step=16, num_warps=8, rows=16,
                x_prepared=True)),
    (MLP1, dict(programs=8 * SMS, rows=4, blocks_per_step=32, x_prepared=True)),
    (MLP2, dict(programs=SMS, loop_stages=3, num_stages=3, blocks_per_step=16, rows=4, x_prepared=True)),
]

SMALL_VARIANTS = [  # CPU interpret: ragged steps, a tail of tasks, both x layouts
    dict(programs=3, rows=4, blocks_per_step=2),
    dict(programs=5, rows=2, blocks_per_step=4, x_prepared=True),
    dict(programs=64, rows=8, blocks_per_step=1, x_prepared=True),
    dict(programs=7, rows=4, blocks_per_step=2, unroll_steps=True),
    dict(programs=3, rows=8, blocks_per_step=1, unroll_steps=True, x_prepared=True),
]


def lower_all(variants) -> list[dict]:
    """Lower every variant for cuda on this machine (no GPU needed): Pallas lowering errors show
    up here; the Triton compile itself happens on the GPU."""
    bf16, u8 = jnp.bfloat16, jnp.uint8
    s = jax.ShapeDtypeStruct
    pe = s((4,), jnp.int32)
    w1 = (s((32, 5760, 90, 16), u8), s((32, 5760, 90), u8), s((32, 5760), bf16))
    w2 = (s((32, 2880, 90, 16), u8), s((32, 2880, 90), u8), s((32, 2880), bf16))
    rows = []
    for name, v in variants:
        if name == MLP1:
            fn = functools.partial(persistent_gemv, pairs_per_x=4, swiglu_params=SWIGLU, **v)
            args = (s((1, 2880), bf16), pe, *w1)
        else:
            fn = functools.partial(persistent_gemv, pairs_per_program=4, **v)
            args = (s((4, 2880), bf16), pe, *w2, s((4,), bf16), s((1, 2880), bf16))
        row = {"case": name, **v}
        try:
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            row["lowered"] = "xla.gpu.triton" in text
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU): exactness only")
    parser.add_argument("--small", action="store_true", help="small shapes (6 experts, 96 features, hidden 64)")
    parser.add_argument("--medium", action="store_true",
                        help="20b's contraction (2880 features) with 8 experts and hidden 128, the GPU variants with "
                             "programs scaled down so that each program does several tasks")
    parser.add_argument("--calls", type=int, default=8, help="calls per timing, each reading other experts")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="start no new variant after this many seconds (compiles take ~20 s each)")
    parser.add_argument("--variants", type=json.loads,
                        help='replace the variant list: {"mlp1+swiglu": [{...}], "mlp2_sum4+residual": [...]}')
    parser.add_argument("--lower", action="store_true",
                        help="only lower the GPU variants for cuda (no GPU needed) and exit")
    args = parser.parse_args(argv)
    if args.lower:
        rows = lower_all(GPU_VARIANTS)
        return 0 if all(r.get("lowered") for r in rows) else 1
    started = time.perf_counter()
    interpret = args.interpret
    if args.small:
        experts, features, hidden = 6, 96, 64
    elif args.medium:
        experts, features, hidden = 8, 2880, 128
    else:
        experts, features, hidden = 32, 2880, 2880
    calls = 2 if interpret else args.calls
    w1, w2, x, ids, routing, residual = make_inputs(jax.random.key(0), experts, features, hidden, calls,
                                                    dead_ids=args.small or args.medium)
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "shapes": dict(experts=experts, features=features, hidden=hidden),
              "results": []}

    def record(row):
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    if args.variants is not None:
        variants = [(case, v) for case, vs in args.variants.items() for v in vs]
    elif args.small:
        variants = [(case, v) for case in (MLP1, MLP2) for v in SMALL_VARIANTS]
    elif args.medium:  # fewer programs, so that each does several tasks of the smaller matrices
        variants = [(case, {**v, "programs": v["programs"] // 50 + 1}) for case, v in GPU_VARIANTS]
    else:
        variants = GPU_VARIANTS
    table = []
    fns = cases(w1, w2, x, routing, residual)
    opts = dict(interpret=True) if interpret else {}
    # mlp2's input: mlp1's output (the baseline's), per call
    a_per_call = [moe.expert_gemv(x, pe, *w1, pairs_per_x=4, swiglu_params=SWIGLU, **opts) for pe in ids]
    call_args = {MLP1: [(pe,) for pe in ids], MLP2: list(zip(ids, a_per_call))}

    def batched(fn, **v):
        return jax.jit(lambda all_args: [fn(*c, **v) for c in all_args])

    baseline = {}
    for name in (MLP1, MLP2):
        base_fn, _, nbytes = fns[name]
        base_run = batched(base_fn, **opts)
        baseline[name] = jax.block_until_ready(base_run(call_args[name]))
        row = {"case": name, "variant": "expert_gemv (baseline)", "weight_bytes_per_call": nbytes}
        if not interpret:
            us, how = kernel_us(base_run, call_args[name], "mxfp4_expert_gemv")
            row.update(us=us, tb_per_s=nbytes / us / 1e6, timing=how)
        record(row)
        table.append(row)
    for name, v in variants:
        _, var_fn, nbytes = fns[name]
        row = {"case": name, "variant": "persistent", **v}
        if time.perf_counter() - started > args.budget_s:
            row["skipped"] = f"past --budget-s {args.budget_s:.0f}"
            record(row)
            table.append(row)
            continue
        try:
            run = batched(var_fn, **v, **opts)
            got = jax.block_until_ready(run(call_args[name]))
            checks = [compare(g, w) for g, w in zip(got, baseline[name])]
            row["elements"] = sum(c["elements"] for c in checks)
            row["differ"] = sum(c["differ"] for c in checks)
            row["max_abs_diff"] = max(c["max_abs_diff"] for c in checks)
            if not interpret:
                us, how = kernel_us(run, call_args[name], "persistent_gemv")
                base_us = next(r["us"] for r in table if r["case"] == name and "us" in r)
                row.update(us=us, tb_per_s=nbytes / us / 1e6, timing=how, speedup=base_us / us)
        except Exception as e:  # a tiling Triton rejects: record it and go on
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        record(row)
        table.append(row)
    table.sort(key=lambda r: r["case"])
    report["seconds"] = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\n{report['device']}, jax {report['jax']}, {report['seconds']:.0f} s")
    print(f"{'case':20} {'variant':76} {'us':>7} {'TB/s':>5} {'differ':>12}")
    short = {"programs": "programs", "rows": "rows", "blocks_per_step": "bps", "num_warps": "warps",
             "num_stages": "stages", "loop_stages": "loop_stages", "unroll_steps": "unroll", "x_prepared": "x32"}
    for r in table:
        desc = r["variant"] if r["variant"] != "persistent" else "persist " + " ".join(
            f"{name}={r[k]}" for k, name in short.items() if k in r)
        us = f"{r['us']:7.2f}" if "us" in r else "      -"
        tb = f"{r['tb_per_s']:5.2f}" if "tb_per_s" in r else "    -"
        diff = (f"{r['differ']}/{r['elements']}" if "differ" in r else r.get("error", r.get("skipped", "")))[:60]
        print(f"{r['case']:20} {desc:76} {us} {tb} {diff:>12}")
    bad = [r for r in table if r.get("differ") or "error" in r]
    return 1 if interpret and bad else 0


if __name__ == "__main__":
    sys.exit(main())
