"""bench.py with a kernel default changed, to compare one design choice end to end (GPU; not
part of CI). Everything after `--` goes to bench.py.

    python benchmarks/bench_variant.py --gemm-min-pairs 32 -- --kernels fastest --measure batch --batches 8,16
    python benchmarks/bench_variant.py --gemv contiguous_x=true -- --kernels fastest --measure decode --contexts 0
    python benchmarks/bench_variant.py --gemm-decode num_stages=3 -- --kernels fastest --measure batch --batches 64
    python benchmarks/bench_variant.py --per-pair-mlp2 -- --kernels fastest --measure decode --contexts 0
"""

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gptoss_jax import model as model_lib  # noqa: E402
from gptoss_jax.kernels import moe, moe_gemm  # noqa: E402


def per_pair_mix(self, h, experts, weights, w, residual=None):
    """MoE.experts_mix_kernel's contract the earlier way: per-pair GEMV outputs, then XLA's
    masked weighted sum (and the residual add)."""
    known = (experts >= 0) & (experts < w.mlp1_fp4.shape[0])
    y = self.experts_kernel(h, jnp.where(known, experts, 0), w)
    y = jnp.where(known[..., None], y, jnp.zeros_like(y))
    mix = jnp.einsum("nko,nk->no", y, weights, preferred_element_type=jnp.float32)
    return mix if residual is None else residual + mix.astype(residual.dtype)


def main(argv):
    split = argv.index("--") if "--" in argv else len(argv)
    own, rest = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser()
    parser.add_argument("--gemm-min-pairs", type=int, help="model.KERNEL_GEMM_MIN_PAIRS")
    parser.add_argument("--gemv", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword default of kernels.moe.expert_gemv (value as JSON)")
    parser.add_argument("--gemm-decode", action="append", default=[], metavar="KEY=VALUE",
                        help="an entry of kernels.moe_gemm.DECODE_TUNING (the GEMM for decode batches)")
    parser.add_argument("--per-pair-mlp2", action="store_true",
                        help="batch-1 MoE as before the summing GEMV: mlp2 per pair, then an XLA weighted sum")
    args = parser.parse_args(own)
    if args.gemm_decode:
        moe_gemm.DECODE_TUNING.update({k: json.loads(v) for k, v in (item.split("=", 1) for item in args.gemm_decode)})
    if args.per_pair_mlp2:
        model_lib.MoE.experts_mix_kernel = per_pair_mix
    if args.gemm_min_pairs is not None:
        model_lib.KERNEL_GEMM_MIN_PAIRS = args.gemm_min_pairs
    if args.gemv:
        options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.gemv)}
        moe.expert_gemv = functools.partial(moe.expert_gemv, **options)
    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
