"""What the command-line programs share: model and sampling arguments, loading the model
onto the devices (and the mesh, and the processes), the compilation cache, and turning bad
input into one `error:` line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax

from gptoss_jax.hub import resolve_checkpoint
from gptoss_jax.kernels.dispatch import CHOICES
from gptoss_jax.loader import load
from gptoss_jax.model import GptOss
from gptoss_jax.sampling import check_sampling
from gptoss_jax.sharding.memory import bytes_per_device, format_bytes
from gptoss_jax.sharding.mesh import Distributed, check_mesh_fits_model, make_mesh, parse_mesh_spec, start_devices

COMPILATION_CACHE_DIR = Path(os.environ.get("GPTOSS_JAX_CACHE_DIR") or
                             Path.home() / ".cache" / "gptoss_jax" / "jax_cache")


def enable_compilation_cache(path: Path = COMPILATION_CACHE_DIR) -> None:
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint",
                        help="checkpoint directory (either MXFP4 layout), or a Hugging Face repo id such as "
                             "openai/gpt-oss-20b (local HF cache first, else downloaded); "
                             "default: the built-in 'tiny' model with random weights")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--no-compilation-cache", action="store_true")
    parser.add_argument("--kernels", choices=CHOICES, default="auto",
                        help="auto (default): the Pallas kernels chosen for the devices (GPUs: fused MXFP4 MoE, "
                             "attention with sinks, fused projections and router, measured faster than XLA; TPUs: the "
                             "MXFP4 expert kernel and decode attention, experts stored in their layout), the XLA "
                             "reference path on a CPU; on a mesh every kernel runs per device. pallas: every kernel "
                             "that compiles for the devices (on a CPU in Pallas interpret mode: slow). xla: none")
    mesh = parser.add_argument_group(
        "mesh (several devices)",
        "--mesh AxB spreads the model over A x B devices: A-way expert parallelism (each device holds "
        "1/A of the experts) times B-way tensor parallelism (attention heads, vocabulary and each "
        "expert's hidden units split B ways); DxAxB adds D-way data parallelism (the batch split D "
        "ways, each slice holding a full copy of the weights). The product must equal the number of "
        "devices; e.g. --mesh 4x2 on a TPU v5e-8 or an 8-GPU host. Without accelerators the command "
        "provisions that many host (CPU) devices itself. Several processes (one per host) join with "
        "--coordinator/--num-processes/--process-id, or --distributed on a TPU pod slice or cluster; "
        "each loads only its own shards and only process 0 prints.")
    mesh.add_argument("--mesh", metavar="AxB|DxAxB", help="expert x model (or data x expert x model) mesh")
    mesh.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, for multi-process runs")
    mesh.add_argument("--num-processes", type=int, metavar="N", help="number of processes in a multi-process run")
    mesh.add_argument("--process-id", type=int, metavar="I", help="this process's index in [0, --num-processes)")
    mesh.add_argument("--distributed", action="store_true",
                      help="join processes with jax.distributed's cluster detection (TPU pod slices, SLURM, ...)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-analysis", action="store_true", help="stream the analysis channel to stderr")


def check_sampling_arguments(args) -> None:
    check_sampling(args.temperature, args.top_p, args.top_k)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")


COMPILATION_CACHE_NOTE = (f"Compiled code is cached across runs in {COMPILATION_CACHE_DIR} (JAX's persistent "
                          "compilation cache; set GPTOSS_JAX_CACHE_DIR to move it, --no-compilation-cache "
                          "to disable it).")


def load_model(args) -> GptOss:
    mesh = make_mesh(parse_mesh_spec(args.mesh)) if args.mesh else None
    if args.checkpoint is None:
        print("note: no --checkpoint given; using the built-in 'tiny' model with random weights "
              "(its output is random tokens)", file=sys.stderr)
        model = load("tiny", dtype=args.dtype, mesh=mesh, kernels=args.kernels)
    else:
        path = resolve_checkpoint(args.checkpoint, log=lambda message: print(message, file=sys.stderr))
        model = load(path, dtype=args.dtype, mesh=mesh, kernels=args.kernels)
    if mesh is not None:
        _report_mesh(model, args.mesh)
    return model


def cli(run_fn, parser: argparse.ArgumentParser, argv=None) -> int:
    """Parses arguments, runs, and turns bad input into one `error:` line and exit status 2."""
    args = parser.parse_args(argv)
    errors = sys.stderr
    try:
        errors = _start_devices(args)
        if not args.no_compilation_cache:
            enable_compilation_cache()
        return run_fn(args)
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        where = "" if jax.process_count() == 1 else f" (process {jax.process_index()})"
        print(f"error{where}: {message}", file=errors)
        return 2
    finally:
        sys.stdout.flush()


def _report_mesh(model: GptOss, spec: str) -> None:
    for note in check_mesh_fits_model(model.config, model.mesh):
        print(f"note: {note}", file=sys.stderr)
    total = max(bytes_per_device(model).values())
    experts = max(bytes_per_device(model, experts_only=True).values())
    print(f"note: mesh {spec} over {model.mesh.size} {jax.default_backend().upper()} devices: "
          f"{format_bytes(total)} of parameters per device ({format_bytes(experts)} of experts)", file=sys.stderr)


def _start_devices(args):
    """Host devices and jax.distributed must be set up before JAX starts its backends.
    Returns the stream for error messages (every process reports its errors)."""
    distributed = Distributed(args.coordinator, args.num_processes, args.process_id, args.distributed)
    distributed.check()
    spec = parse_mesh_spec(args.mesh) if args.mesh else None
    if spec is None:
        if distributed.enabled:
            raise ValueError("multi-process runs need --mesh (the mesh spans the devices of all processes)")
        return sys.stderr
    errors = sys.stderr
    if distributed.enabled:
        # gloo (CPU collectives between processes) prints to the C-level stdout: send that to
        # stderr and keep Python's stdout for the output.
        sys.stdout.flush()
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        errors = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
    notes = start_devices(spec, distributed)
    if jax.process_index() != 0:  # only process 0 prints
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return errors
