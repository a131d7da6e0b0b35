"""The batch-1 MXFP4 expert GEMVs as CUDA kernels on tensor cores (kernels/cuda/mxfp4_gemv.cu),
called through XLA's FFI. Same contracts as the Triton kernels in kernels/moe.py, which stay
the fallback and the reference these are tested against.

The source is compiled with nvcc on first use into a cache folder (GPTOSS_JAX_CACHE, else
~/.cache/gptoss_jax) and registered with XLA once per process. `unavailable_reason()` says
why these kernels cannot run here (no NVIDIA GPU of compute capability >= 8.0, no nvcc, a
failed build); `set_kernels(model, moe="cuda")` checks it before selecting them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4

SOURCE = Path(__file__).resolve().parent / "cuda" / "mxfp4_gemv.cu"
TARGETS = {"swiglu": ("gptoss_mxfp4_gemv_swiglu", "GptossMxfp4GemvSwiglu"),
           "mix": ("gptoss_mxfp4_gemv_mix", "GptossMxfp4GemvMix")}
# Tilings compiled into the library: variant id -> (16-row tiles per CTA, warps splitting the
# contraction per pair, cp.async stages of 8 blocks). Must match `variant()` in the source.
VARIANTS = {0: (2, 4, 3), 1: (2, 4, 2), 2: (1, 4, 3), 3: (1, 8, 2), 4: (1, 2, 4), 5: (1, 2, 3), 6: (1, 2, 2), 7: (1, 4, 2)}
DEFAULT_SWIGLU_VARIANT = 0
DEFAULT_MIX_VARIANT = 4
# sm_80 (A100) and sm_90 (H100) machine code, and PTX that newer GPUs compile at load.
ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_90,code=compute_90")


class CudaKernelError(RuntimeError):
    """The CUDA kernels cannot be built or used here (the message says why and what to do)."""


def find_nvcc() -> str | None:
    """GPTOSS_NVCC, then nvcc on PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin."""
    candidates = [os.environ.get("GPTOSS_NVCC"), shutil.which("nvcc")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(str(Path(root) / "bin" / "nvcc"))
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_JAX_CACHE") or Path.home() / ".cache" / "gptoss_jax") / "cuda"


def build_command(nvcc: str, output: Path) -> list[str]:
    return [nvcc, "-O3", "-std=c++17", *ARCH_FLAGS, "--shared", "-Xcompiler", "-fPIC", "-diag-suppress", "940,2473",
            f"-I{jax.ffi.include_dir()}", "-o", str(output), str(SOURCE)]


@functools.cache
def library_path() -> Path:
    """The compiled library, built now if the cache has none for this source, nvcc and jax.
    The build writes a temporary file and renames it, so a failed or interrupted build
    leaves nothing that looks usable."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaKernelError("the CUDA expert kernels need nvcc to build: put it on PATH or set CUDA_HOME "
                              "(or GPTOSS_NVCC), or use --kernels pallas")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + jax.__version__.encode()
                         + " ".join(ARCH_FLAGS).encode()).hexdigest()[:16]
    path = cache_dir() / f"libgptoss_mxfp4_{key}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp) / path.name
        run = subprocess.run(build_command(nvcc, partial), capture_output=True, text=True)
        if run.returncode != 0:
            raise CudaKernelError(f"building {SOURCE.name} with {nvcc} failed (exit {run.returncode}):\n"
                                  f"{run.stderr[-4000:]}")
        os.replace(partial, path)
    return path


@functools.cache
def _register() -> None:
    library = ctypes.cdll.LoadLibrary(str(library_path()))
    for target, symbol in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="CUDA")


def unavailable_reason() -> str | None:
    """None when the kernels can run on the default device, else why not."""
    try:
        device = jax.devices()[0]
    except RuntimeError as e:
        return f"no JAX device: {e}"
    if device.platform != "gpu":
        return f"the default device is {device.device_kind} ({device.platform}), not an NVIDIA GPU"
    capability = getattr(device, "compute_capability", None)
    if capability is None or float(capability) < 8.0:
        return f"{device.device_kind} has compute capability {capability}; the kernels need 8.0 or newer"
    try:
        _register()
    except (CudaKernelError, OSError, AttributeError) as e:
        return str(e)
    return None


def _check(name: str, x, pair_expert, w_bytes, w_scales, bias):
    if w_bytes.dtype != jnp.uint8 or w_bytes.ndim != 4 or w_bytes.shape[-1] != 16:
        raise ValueError(f"{name}: weights must be the packed uint8 [E, O, D/32, 16] view "
                         f"(moe.packed_bytes), got {w_bytes.dtype} {w_bytes.shape}")
    e, o, nb, _ = w_bytes.shape
    if x.shape[-1] != nb * mxfp4.BLOCK:
        raise ValueError(f"{name}: x has {x.shape[-1]} features but the weights hold {nb} blocks of 32")
    if w_scales.shape != (e, o, nb) or bias.shape != (e, o):
        raise ValueError(f"{name}: scales {w_scales.shape} / bias {bias.shape} do not match weights {w_bytes.shape}")
    for what, arr in (("x", x), ("bias", bias)):
        if arr.dtype != jnp.bfloat16:
            raise ValueError(f"{name}: {what} must be bfloat16 for the CUDA kernel, got {arr.dtype}")
    if pair_expert.ndim != 1:
        raise ValueError(f"{name}: pair_expert must be 1-D, got shape {pair_expert.shape}")


def _rows_tile(name: str, variant: int, out_rows: int, group: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {sorted(VARIANTS)}, got {variant}")
    tiles, ksplit, _ = VARIANTS[variant]
    if out_rows % (16 * tiles):
        raise ValueError(f"{name}: {out_rows} output rows are not a multiple of the row tile {16 * tiles} "
                         f"(variant {variant}); choose a variant with fewer tiles")
    if 32 * ksplit * group > 256:
        raise ValueError(f"{name}: {group} pairs x {ksplit} warps per CTA exceed 256 threads (variant {variant})")


def _u8(scales):
    return jax.lax.bitcast_convert_type(scales, jnp.uint8)


def gemv_swiglu(x, pair_expert, w_bytes, w_scales, bias, *, pairs_per_x: int, limit: float, alpha: float,
                variant: int = DEFAULT_SWIGLU_VARIANT):
    """moe.expert_gemv with swiglu_params=(limit, alpha): [P, O/2] bf16, pair p reading row
    p // pairs_per_x of x [X, D] and expert pair_expert[p] (ids outside [0, E) read no
    weights: their rows hold the bias only)."""
    _check("gemv_swiglu", x, pair_expert, w_bytes, w_scales, bias)
    _rows_tile("gemv_swiglu", variant, w_bytes.shape[1], 1)
    if pair_expert.shape[0] > x.shape[0] * pairs_per_x:
        raise ValueError(f"gemv_swiglu: {pair_expert.shape[0]} pairs need {pair_expert.shape[0] // pairs_per_x} "
                         f"rows of x at {pairs_per_x} pairs per row, got {x.shape[0]}")
    _register()
    out = jax.ShapeDtypeStruct((pair_expert.shape[0], w_bytes.shape[1] // 2), jnp.bfloat16)
    return jax.ffi.ffi_call(TARGETS["swiglu"][0], out)(
        x, pair_expert.astype(jnp.int32), w_bytes, _u8(w_scales), bias, pairs_per_x=np.int64(pairs_per_x),
        limit=np.float32(limit), alpha=np.float32(alpha), variant=np.int64(variant))


def gemv_mix(a, pair_expert, w_bytes, w_scales, bias, pair_weight, residual=None, *, group: int,
             variant: int = DEFAULT_MIX_VARIANT):
    """moe.expert_gemv with pairs_per_program=group: a [P, D] (pair p reads row p), the sum
    over each group of consecutive pairs of pair_weight * (round(a @ W^T) + bias), fp32
    [P/group, O]; with residual [P/group, O] (bf16), residual + that sum rounded, in bf16."""
    _check("gemv_mix", a, pair_expert, w_bytes, w_scales, bias)
    _rows_tile("gemv_mix", variant, w_bytes.shape[1], group)
    num_pairs = pair_expert.shape[0]
    if num_pairs % group or a.shape[0] != num_pairs or pair_weight.shape != (num_pairs,):
        raise ValueError(f"gemv_mix: {num_pairs} pairs in groups of {group} need a [{num_pairs}, D] and "
                         f"pair_weight [{num_pairs}], got {a.shape} and {pair_weight.shape}")
    outputs = (num_pairs // group, w_bytes.shape[1])
    if residual is not None and (residual.shape != outputs or residual.dtype != jnp.bfloat16):
        raise ValueError(f"gemv_mix: residual must be bfloat16 {outputs}, got {residual.dtype} {residual.shape}")
    _register()
    out = jax.ShapeDtypeStruct(outputs, jnp.float32 if residual is None else jnp.bfloat16)
    return jax.ffi.ffi_call(TARGETS["mix"][0], out)(
        a, pair_expert.astype(jnp.int32), w_bytes, _u8(w_scales), bias, pair_weight.astype(jnp.bfloat16),
        jnp.zeros((1, 1), jnp.bfloat16) if residual is None else residual, group=np.int64(group),
        add_residual=residual is not None, variant=np.int64(variant))


def experts_mix_decode(h, experts, mlp1_bytes, mlp1_scales, mlp1_bias, mlp2_bytes, mlp2_scales, mlp2_bias,
                       *, weights, limit: float, alpha: float, residual=None, mlp1_variant: int | None = None,
                       mlp2_variant: int | None = None):
    """moe.experts_mix_decode on the CUDA kernels: h [n, d], experts [n, k], weights [n, k]
    -> fp32 [n, d] (or residual + that in bf16). Ids outside [0, E) add nothing."""
    k = experts.shape[1]
    pair_expert = experts.reshape(-1)
    a = gemv_swiglu(h, pair_expert, mlp1_bytes, mlp1_scales, mlp1_bias, pairs_per_x=k, limit=limit, alpha=alpha,
                    variant=pick_variant(mlp1_variant, DEFAULT_SWIGLU_VARIANT, mlp1_bytes.shape[1], 1))
    return gemv_mix(a, pair_expert, mlp2_bytes, mlp2_scales, mlp2_bias, weights.reshape(-1), residual, group=k,
                    variant=pick_variant(mlp2_variant, DEFAULT_MIX_VARIANT, mlp2_bytes.shape[1], k))


def pick_variant(chosen: int | None, default: int, out_rows: int, group: int) -> int:
    """The chosen variant, else the default when its row tile and CTA size fit, else the
    variant with the most rows per CTA that fits (small test models)."""
    if chosen is not None:
        return chosen

    def fits(v):
        tiles, ksplit, _ = VARIANTS[v]
        return out_rows % (16 * tiles) == 0 and 32 * ksplit * group <= 256

    if fits(default):
        return default
    fitting = sorted((v for v in VARIANTS if fits(v)), key=lambda v: (-VARIANTS[v][0], VARIANTS[v][1]))
    if not fitting:
        raise ValueError(f"no CUDA GEMV tiling fits {out_rows} output rows with {group} experts per token "
                         f"(rows must be a multiple of 16 and experts per token at most 8)")
    return fitting[0]
