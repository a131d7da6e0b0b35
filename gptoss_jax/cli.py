"""What the command-line programs share: model and sampling arguments, loading the model
onto the devices (and the mesh, and the processes), the compilation cache, the end of a
streamed completion, and turning bad input into one `error:` line and exit status 2 (and
Ctrl-C into one line and exit status 130)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax

from gptoss_jax.config import PRESETS, GptOssConfig
from gptoss_jax.converters.layouts import detect_layout, read_config
from gptoss_jax.converters.orbax_io import is_converted
from gptoss_jax.hub import resolve_checkpoint
from gptoss_jax.kernels.dispatch import CHOICES
from gptoss_jax.loader import BUILTIN_DESCRIPTION, builtin_config, load
from gptoss_jax.model import GptOss
from gptoss_jax.sampling import check_sampling
from gptoss_jax.sharding.memory import bytes_per_device, format_bytes
from gptoss_jax.sharding.mesh import (
    DEFAULT_JOIN_TIMEOUT,
    Distributed,
    check_mesh_fits_model,
    make_mesh,
    parse_mesh_spec,
    start_devices,
)
from gptoss_jax.streaming import HarmonyStream

INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)

COMPILATION_CACHE_DIR = Path(os.environ.get("GPTOSS_JAX_CACHE_DIR") or
                             Path.home() / ".cache" / "gptoss_jax" / "jax_cache")


def enable_compilation_cache(path: Path = COMPILATION_CACHE_DIR) -> None:
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint",
                        help="checkpoint directory (either MXFP4 layout, or converted), or a Hugging Face repo id "
                             "such as openai/gpt-oss-20b (local HF cache first, else downloaded), or a preset name "
                             f"({', '.join(PRESETS)}) for random weights at that shape; "
                             "default: the built-in model, trained on a small synthetic task (two-digit arithmetic, "
                             "unit conversions, dates, weather through a tool call)")
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
    mesh.add_argument("--join-timeout", type=float, default=DEFAULT_JOIN_TIMEOUT, metavar="SECONDS",
                      help=f"stop with an error when the processes have not all joined after this long "
                           f"(default {DEFAULT_JOIN_TIMEOUT})")


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
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {args.seed}")


def check_positions(config: GptOssConfig, prompt_tokens: int, max_new_tokens: int, prompt: str) -> None:
    """Refuses `prompt` (its description) plus --max-new-tokens beyond the model's positions."""
    limit = config.max_position_embeddings
    where = f"the model's {limit} positions (max_position_embeddings)"
    if prompt_tokens > limit:
        raise ValueError(f"{prompt} ({prompt_tokens} tokens) exceeds {where}; shorten it")
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"{prompt} ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} = "
                         f"{prompt_tokens + max_new_tokens} positions exceed {where}; lower --max-new-tokens to at "
                         f"most {limit - prompt_tokens}")


COMPILATION_CACHE_NOTE = (f"Compiled code is cached across runs in {COMPILATION_CACHE_DIR} (JAX's persistent "
                          "compilation cache; set GPTOSS_JAX_CACHE_DIR to move it, --no-compilation-cache "
                          "to disable it).")


def model_source(args) -> tuple[str | Path, GptOssConfig]:
    """What --checkpoint names, a preset (random weights), a checkpoint directory or None (the
    built-in model), and the model's config, read without the weights; looked up once per run."""
    if getattr(args, "resolved_source", None) is None:
        if args.checkpoint is None:
            args.resolved_source = (None, builtin_config())
        elif args.checkpoint in PRESETS and not Path(args.checkpoint).exists():
            args.resolved_source = (args.checkpoint, GptOssConfig.preset(args.checkpoint))
        else:
            path = resolve_checkpoint(args.checkpoint, log=lambda message: print(message, file=sys.stderr))
            config_file = path / "config.json" if is_converted(path) else detect_layout(path)[1] / "config.json"
            args.resolved_source = (path, read_config(config_file))
    return args.resolved_source


def load_model(args) -> GptOss:
    source, _ = model_source(args)
    mesh = make_mesh(parse_mesh_spec(args.mesh)) if args.mesh else None
    if args.checkpoint is None:
        print(f"note: no --checkpoint given; using the built-in model: {BUILTIN_DESCRIPTION}", file=sys.stderr)
    elif isinstance(source, str):
        print(f"note: --checkpoint {source} is a preset: random weights at its shape", file=sys.stderr)
    model = load(source, dtype=args.dtype, mesh=mesh, kernels=args.kernels)
    if mesh is not None:
        _report_mesh(model, args.mesh)
    return model


def finish_harmony_stream(stream: HarmonyStream) -> bool:
    """Ends a streamed completion; returns whether it followed the harmony format. The stream
    gives up on harmony while it streams; output too short for it to tell (a header that never
    ended, as from random weights) is not harmony either: it is shown now as raw text on
    stdout, as longer output is while it streams."""
    if stream.not_harmony:
        return False
    parsed = stream.parser.result()
    if parsed.messages or parsed.partial_message is not None or not stream.tokens:
        return True
    stream.not_harmony = True
    if stream.echo:
        print("note: the output does not follow the harmony format; showing the raw tokens", file=sys.stderr,
              flush=True)
        print(stream.raw.feed(stream.tokens), end="", flush=True)
    return False


def cli(run_fn, parser: argparse.ArgumentParser, argv=None) -> int:
    """Parses arguments, runs, and turns bad input into one `error:` line and exit status 2,
    Ctrl-C into the line `interrupted` and exit status 130 (no traceback)."""
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
    except KeyboardInterrupt:
        print("\ninterrupted", file=errors)  # after the ^C the terminal shows, on a line of its own
        return INTERRUPTED
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
    distributed = Distributed(args.coordinator, args.num_processes, args.process_id, args.distributed,
                              args.join_timeout)
    distributed.check()
    spec = parse_mesh_spec(args.mesh) if args.mesh else None
    if spec is None:
        if distributed.enabled:
            raise ValueError("multi-process runs need --mesh (the mesh spans the devices of all processes)")
        return sys.stderr
    check_mesh_fits_model(model_source(args)[1], spec)  # before a single device is provisioned
    errors = sys.stderr
    if distributed.enabled:
        # gloo (CPU collectives between processes) prints a line per connection to the C-level
        # stdout: that goes nowhere, and Python's stdout keeps the output.
        sys.stdout.flush()
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        errors = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    notes = start_devices(spec, distributed)
    if jax.process_index() != 0:  # only process 0 prints
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return errors
