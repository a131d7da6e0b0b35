"""Decode batch 8 (32 pairs) and 16 with the grouped GEMM taking over from the GEMV at 32
pairs instead of model.KERNEL_GEMM_MIN_PAIRS (GPU; not part of CI).

    python benchmarks/gemm_threshold.py --json out.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

from gptoss_jax import model as model_lib  # noqa: E402

if __name__ == "__main__":
    model_lib.KERNEL_GEMM_MIN_PAIRS = 32
    sys.exit(bench.main(["--model", "gpt-oss-20b", "--kernels", "fastest", "--measure", "batch",
                         "--batches", "8,16", "--steps", "32", *sys.argv[1:]]))
