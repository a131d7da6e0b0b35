"""Will a model fit a target, and how fast can it decode there? Answered before renting it.

`plan(model, target, mesh, batch, context)` compiles the engine's real programs, prefill
and one decode step (`engine.prefill`, `engine.decode_chunk`), for the target's chips on
this machine: TPU targets through libtpu's deviceless ahead-of-time compilation (the real
XLA:TPU and Mosaic compilers; `pip install "libtpu==0.0.42.*"`), from an abstract model
(shapes and shardings only, no weights). Per chip it reports the parameters, the KV cache,
the compiled arguments and temporaries against the HBM the compiler allows, whether it
fits, the largest context and batch that fit, and the decode step's HBM bytes against the
byte bound with the tokens/s each allows at the chip's bandwidth. GPU targets (H100, H200)
are sized from the shapes (no GPU compiler here): parameters, cache and the byte bound.

    python -m gptoss_jax.plan --model gpt-oss-120b --target v5e-8 --mesh 4x2 --context 32768

`plan_training(...)` (`--train lora|full`) compiles one training step of `gptoss_jax.train`
instead (forward, backward and the AdamW update on `--batch` rows of `--seq-len` tokens) and
reports what each chip holds while it runs.

docs/tpu.md explains the numbers and how the bytes are counted. `planned_bytes_per_device`
sizes the parameters alone, from shapes, for any mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, SingleDeviceSharding

from gptoss_jax import engine, train
from gptoss_jax.config import PRESETS, GptOssConfig
from gptoss_jax.converters.layouts import detect_layout, read_config
from gptoss_jax.dataset import Batch
from gptoss_jax.kernels import tpu_aot
from gptoss_jax.kernels.dispatch import CHOICES, XLA, Kernels
from gptoss_jax.loader import parse_dtype
from gptoss_jax.model import CACHE_AXES, GptOss, LayerCache, abstract_model
from gptoss_jax.sharding.memory import format_bytes, is_expert, packed_bytes
from gptoss_jax.sharding.mesh import MESH_AXES, MeshError, MeshSpec, check_mesh_fits_model, make_mesh, parse_mesh_spec
from gptoss_jax.sharding.placement import param_placement
from gptoss_jax.sharding.rules import partition_spec

GiB = 2**30


def planned_bytes_per_device(config, spec: MeshSpec | str, dtype="bfloat16") -> dict[str, float]:
    """Parameter bytes for `config` on a mesh: {"total", "experts", "other"} per device and
    "model" for the whole model (FP4 counted as half a byte)."""
    spec = parse_mesh_spec(spec) if isinstance(spec, str) else spec
    mesh = AbstractMesh(spec.shape, MESH_AXES)
    _, leaves = abstract_model(config, parse_dtype(dtype))
    out = {"total": 0.0, "experts": 0.0, "other": 0.0, "model": 0.0}
    for path, var in leaves:
        pspec = partition_spec(var.get_metadata()["axes"], var.shape, mesh)
        split = math.prod(mesh.shape[a] for a in pspec if a is not None)
        size = math.prod(var.shape)
        local = packed_bytes(var.dtype, size // split)
        out["total"] += local
        out["experts" if is_expert(path) else "other"] += local
        out["model"] += packed_bytes(var.dtype, size)
    return out


# ------------------------------------------------------------------------------ targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for: its chips, each chip's HBM and bandwidth as published
    (docs/tpu.md gives the sources), and for TPUs the topology the compiler builds."""

    name: str
    platform: str  # "tpu" or "gpu"
    chips: int
    hbm_bytes: float
    bandwidth: float  # HBM bytes per second per chip
    topology: str | None = None
    chips_per_host: tuple[int, int, int] | None = None
    chip_config: str = "default"

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host) if self.chips_per_host else 1

    def devices(self):
        return tpu_aot.topology(self.topology, self.chips_per_host, self.chip_config).devices


def _tpu(name, chips, hbm_gib, bandwidth, topology, per_host, config="default"):
    return Target(name, "tpu", chips, hbm_gib * GiB, bandwidth, topology, per_host, config)


def _gpu(name, chips, hbm_gb, bandwidth):
    return Target(name, "gpu", chips, hbm_gb * 1e9, bandwidth)


TARGETS = {t.name: t for t in (
    _tpu("v5e-1", 1, 16, 819e9, "v5e:1x1", (1, 1, 1)),
    _tpu("v5e-4", 4, 16, 819e9, "v5e:2x2", (2, 2, 1)),
    _tpu("v5e-8", 8, 16, 819e9, "v5e:2x4", (2, 4, 1)),
    _tpu("v5e-16", 16, 16, 819e9, "v5e:4x4", (2, 2, 1)),  # 4 hosts
    _tpu("v5e-32", 32, 16, 819e9, "v5e:4x8", (2, 2, 1)),  # 8 hosts
    _tpu("v6e-1", 1, 32, 1640e9, "v6e:1x1", (1, 1, 1)),
    _tpu("v6e-4", 4, 32, 1640e9, "v6e:2x2", (2, 2, 1)),
    _tpu("v6e-8", 8, 32, 1640e9, "v6e:2x4", (2, 4, 1)),
    _tpu("v5p-8", 4, 95, 2765e9, "v5p:2x2x1", (2, 2, 1)),  # 4 chips, 8 TensorCores
    _tpu("v4-8", 4, 32, 1200e9, "v4:2x2x1", (2, 2, 1), "megacore"),  # 4 chips, 8 TensorCores
    _gpu("h100", 1, 80, 3.35e12), _gpu("h100-8", 8, 80, 3.35e12),
    _gpu("h200", 1, 141, 4.8e12), _gpu("h200-8", 8, 141, 4.8e12),
)}


def target_named(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target '{name}'; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


@functools.cache
def available_hbm(target: Target) -> float:
    """The HBM one chip offers a program, as the TPU compiler states it when a program
    exceeds it (less than the chip's HBM: the runtime keeps some)."""
    mesh = jax.sharding.Mesh(np.array(target.devices()[:1]), ("chip",))
    too_big = jax.ShapeDtypeStruct((int(target.hbm_bytes * 2) // 4096, 1024), jnp.float32,
                                   sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    try:
        jax.jit(lambda x: x + 1, donate_argnums=0).lower(too_big).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory error carries the number
        found = re.search(r"exceeds available HBM \(([\d.]+)G\)", str(e))
        if found:
            return float(found.group(1)) * GiB
        raise
    raise RuntimeError(f"{target.name}: a program of twice the chip's HBM compiled; cannot find the HBM limit")


# ------------------------------------------------------------------------------ models
def model_config(model: str | GptOssConfig) -> GptOssConfig:
    """A preset name, a config.json, or a checkpoint directory."""
    if isinstance(model, GptOssConfig):
        return model
    if model in PRESETS and not Path(model).exists():
        return GptOssConfig.preset(model)
    path = Path(model)
    if path.is_file():
        return read_config(path)
    if not path.exists():
        raise ValueError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}) nor an existing config.json "
                         f"or checkpoint directory")
    _, folder = detect_layout(path)
    return read_config(folder / "config.json")


# ------------------------------------------------------------------------------ numbers
@dataclasses.dataclass
class Program:
    """One compiled program's numbers for one chip (bytes)."""

    name: str
    compile_seconds: float
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    hbm_bytes: float  # HBM bytes of one run (tpu_aot.hbm_traffic): XLA ops + kernels
    kernel_bytes: float  # of which the Pallas kernels' (their block specs, as their cost estimates)
    xla_cost_bytes: float  # XLA's cost analysis "bytes accessed" (also counts VMEM traffic)
    kernel_calls: int
    hlo: str = dataclasses.field(repr=False, default="")
    needed: float | None = None  # when the compiler refused the program: the bytes it said it needs

    @property
    def total(self) -> float:
        """What the chip holds while the program runs: arguments, temporaries, outputs
        that do not reuse a donated argument, the program itself."""
        if self.needed is not None:
            return self.needed
        return self.arguments + self.temporaries + self.outputs - self.aliased + self.code


@dataclasses.dataclass
class Plan:
    model: str
    target: Target
    mesh: str
    batch: int  # sequences in all
    sequences: int  # sequences per chip (the data axis splits the batch)
    context: int
    prompt: int
    kernels: tuple[str, ...]
    parameters: float  # per chip, logical (FP4 as half a byte)
    cache: float  # per chip, logical
    cache_per_slot: float  # per chip per sequence per slot of the full layers
    cache_fixed: float  # per chip per sequence: the sliding layers' rings (at this context)
    bound_bytes: float  # the decode step's byte bound per chip
    available: float | None = None  # HBM the compiler allows a program (TPU)
    prefill: Program | None = None
    decode: Program | None = None

    @property
    def compiled(self) -> bool:
        return self.decode is not None

    @property
    def total(self) -> float:
        """Per chip: the larger of the two programs, or parameters + cache uncompiled."""
        if not self.compiled:
            return self.parameters + self.cache
        return max(p.total for p in (self.prefill, self.decode) if p is not None)

    @property
    def hbm(self) -> float:
        return self.available or self.target.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    def _headroom(self, program_total: float) -> float:
        return self.hbm - (program_total - self.sequences * (self.cache_fixed + self.cache_per_slot * self.context))

    @property
    def largest_context(self) -> int:
        """The longest cache the compiled decode step fits at this batch (its other bytes
        held fixed), a multiple of 1024, at most the model's context."""
        room = self._headroom(self.decode.total) / self.sequences - self.cache_fixed
        if room < 0:
            return 0
        if not self.cache_per_slot:  # only sliding layers: the cache stops growing at the window
            return self.model_context
        slots = int(room // self.cache_per_slot) // 1024 * 1024
        return max(0, min(slots, self.model_context))

    @property
    def largest_batch(self) -> int:
        """The largest batch whose caches of this context the compiled decode step fits
        (its other bytes held fixed)."""
        per_sequence = self.cache_fixed + self.cache_per_slot * self.context
        per_chip = int(self._headroom(self.decode.total) // per_sequence) if per_sequence else 0
        return max(0, per_chip * self.batch // self.sequences)

    model_context: int = 131072

    @property
    def decode_bytes(self) -> float:
        return self.decode.hbm_bytes if self.decode else float("nan")

    def tokens_per_second(self, step_bytes: float) -> float:
        return self.batch * self.target.bandwidth / step_bytes

    def report(self) -> str:
        t, lines = self.target, []
        where = f"{t.name} ({t.chips} chip{'s' * (t.chips > 1)}{f', {t.hosts} hosts' if t.hosts > 1 else ''})"
        lines.append(f"{self.model} on {where}, mesh {self.mesh}, batch {self.batch}, context {self.context}, "
                     f"prompt {self.prompt}; kernels: {', '.join(self.kernels) or 'none (XLA)'}")
        lines.append("per chip:")
        lines.append(f"  parameters            {format_bytes(self.parameters)}")
        lines.append(f"  KV cache              {format_bytes(self.cache)}")
        if self.compiled:
            for p in (self.prefill, self.decode):
                if p.needed is not None:
                    lines.append(f"  {p.name + ':':21s} does NOT fit: the compiler needs {format_bytes(p.needed)} "
                                 f"(refused in {p.compile_seconds:.0f} s)")
                    continue
                lines.append(f"  {p.name + ':':21s} arguments {format_bytes(p.arguments)}, temporaries "
                             f"{format_bytes(p.temporaries)}, total {format_bytes(p.total)} "
                             f"(compiled in {p.compile_seconds:.0f} s)")
            hbm = f"{format_bytes(self.hbm)} the compiler allows of {format_bytes(t.hbm_bytes)} HBM"
        else:
            hbm = f"{format_bytes(t.hbm_bytes)} HBM (not compiled: no {t.platform.upper()} compiler on this machine; " \
                  f"temporaries not counted)"
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  total                 {format_bytes(self.total)} of {hbm}: {verdict}"
                     f" ({format_bytes(abs(self.hbm - self.total))} {'spare' if self.fits else 'over'})")
        if self.compiled and self.decode.needed is None:
            lines.append(f"  decode step fits      context {self.largest_context} at batch {self.batch}, batch "
                         f"{self.largest_batch} at context {self.context} (extrapolated from its compiled bytes; "
                         f"prefill grows with the context too: plan that context to check it)")
        bound = self.bound_bytes
        lines.append(f"decode step, per chip: byte bound {bound / 1e9:.3f} GB -> at most "
                     f"{self.tokens_per_second(bound):.0f} tokens/s at {t.bandwidth / 1e9:.0f} GB/s")
        if self.compiled and self.decode.needed is None:
            step = self.decode_bytes
            lines.append(f"  compiled: {step / 1e9:.3f} GB of HBM traffic ({step / bound:.2f}x the bound; kernels "
                         f"{self.decode.kernel_bytes / 1e9:.3f} GB in {self.decode.kernel_calls} calls; XLA's cost "
                         f"analysis, VMEM copies included: {self.decode.xla_cost_bytes / 1e9:.3f} GB) -> about "
                         f"{self.tokens_per_second(step):.0f} tokens/s if bandwidth-bound")
            lines.append("  (an estimate from the compiled program: not measured on a TPU)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ byte bound
def byte_bound(config: GptOssConfig, spec: MeshSpec, batch: int, context: int, dtype="bfloat16") -> float:
    """The HBM bytes one chip must read for one decode step of `batch` tokens: its share of
    every weight a token uses (attention, router, the routed experts when the batch's
    (token, expert) pairs land on as many of this chip's experts as they can, the final
    norm, the unembedding; an embedding row per token) and of the sequences' KV caches
    (full layers up to the context, sliding layers up to the window)."""
    c, item = config, jnp.dtype(parse_dtype(dtype)).itemsize
    mesh = AbstractMesh(spec.shape, MESH_AXES)
    _, leaves = abstract_model(config, parse_dtype(dtype))
    per_layer_experts = batch * c.experts_per_token
    local_experts = c.num_experts // spec.expert
    total = 0.0
    for path, var in leaves:
        pspec = partition_spec(var.get_metadata()["axes"], var.shape, mesh)
        split = math.prod(mesh.shape[a] for a in pspec if a is not None)
        local = packed_bytes(var.dtype, math.prod(var.shape) // split)
        if is_expert(path):
            local *= min(per_layer_experts, local_experts) / local_experts
        elif path[-1] == "embedding":
            local = batch * c.hidden_size * item
        total += local
    kv_split = spec.model if c.num_key_value_heads % spec.model == 0 else 1
    row = 2 * c.num_key_value_heads // kv_split * c.head_dim * item
    sequences = batch // spec.data if batch % spec.data == 0 else batch
    for layer in range(c.num_hidden_layers):
        slots = min(c.sliding_window, context) if c.is_sliding(layer) else context
        total += sequences * slots * row
    return total


def cache_bytes(config: GptOssConfig, spec: MeshSpec, context: int, dtype) -> tuple[float, float]:
    """Per chip per sequence: (bytes per slot of the full layers, bytes of the sliding
    layers' rings), keys, values and positions."""
    c, item = config, jnp.dtype(dtype).itemsize
    kv_split = spec.model if c.num_key_value_heads % spec.model == 0 else 1
    slot = 2 * c.num_key_value_heads // kv_split * c.head_dim * item + 4
    full = sum(not c.is_sliding(i) for i in range(c.num_hidden_layers))
    sliding = c.num_hidden_layers - full
    return full * slot, sliding * min(c.sliding_window, context) * slot


# ------------------------------------------------------------------------------ compiling
def _program(name: str, lowered, progress) -> Program:
    progress(f"compiling {name}...")
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The compiler refuses a program larger than the chip: it says how much it needs.
        needed = re.search(r"RESOURCE_EXHAUSTED: Ran out of memory.*?\(([\d.]+)G\) exceeds available HBM", str(e))
        if not needed:
            raise
        seconds = time.perf_counter() - start
        progress(f"{name} does not fit: the compiler needs {needed.group(1)} GiB")
        return Program(name, seconds, 0, 0, 0, 0, 0, float("nan"), float("nan"), float("nan"), 0,
                       needed=float(needed.group(1)) * GiB)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0]
    hlo = compiled.as_text()
    traffic = tpu_aot.hbm_traffic(hlo)
    progress(f"compiled {name} in {seconds:.0f} s")
    return Program(name, seconds, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                   memory.alias_size_in_bytes, memory.temp_size_in_bytes, memory.generated_code_size_in_bytes,
                   traffic["kernels"] + traffic["xla"], traffic["kernels"], float(cost.get("bytes accessed", 0.0)),
                   tpu_aot.kernel_calls(hlo), hlo)


def abstract_state(config: GptOssConfig, dtype, mesh, kernels: Kernels, device):
    """The model's graph and its parameters as ShapeDtypeStructs placed on the target."""
    graphdef, leaves = abstract_model(config, dtype, mesh, kernels)
    for _, var in leaves:
        sharding = _sharding(var.get_metadata()["axes"], var.shape, mesh, device)
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=param_placement(var, sharding)))
    return graphdef, nnx.from_flat_state(leaves)


def _sharding(axes, shape, mesh, device):
    if mesh is None:
        return SingleDeviceSharding(device)
    return jax.sharding.NamedSharding(mesh, partition_spec(axes, shape, mesh))


def _placed(shape, dtype, axes, mesh, device):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=_sharding(axes, shape, mesh, device))


def lower_steps(config: GptOssConfig, devices, spec: MeshSpec, *, batch: int, context: int, prompt: int,
                dtype="bfloat16", kernels: str | Kernels = "auto"):
    """(prefill, decode step) of the engine lowered for `devices`, and the kernels chosen."""
    dtype = parse_dtype(dtype)
    mesh = make_mesh(spec, devices) if spec.size > 1 else None
    device = devices[0]
    if not isinstance(kernels, Kernels):
        kernels = Kernels.auto(kernels, mesh=mesh, devices=devices[:1])
    graphdef, state = abstract_state(config, dtype, mesh, kernels, device)
    place = functools.partial(_placed, mesh=mesh, device=device)
    caches = []
    for layer in range(config.num_hidden_layers):
        slots = min(config.sliding_window, context) if config.is_sliding(layer) else context
        kv = (batch, slots, config.num_key_value_heads, config.head_dim)
        caches.append(LayerCache(place(kv, dtype, CACHE_AXES.k), place(kv, dtype, CACHE_AXES.v),
                                 place((batch, slots), jnp.int32, CACHE_AXES.positions)))
    rows = ("batch",)
    prefill = engine.prefill.lower(graphdef, state, place((batch, prompt), jnp.int32, ("batch", "seq")),
                                   place((batch, prompt), jnp.int32, ("batch", "seq")), caches,
                                   place((batch,), jnp.int32, rows))
    key = jax.eval_shape(lambda: jax.random.key(0))
    scalar = lambda dt: place((), dt, ())  # noqa: E731
    decode = engine.decode_chunk.lower(
        graphdef, state, caches, place((batch, config.vocab_size), jnp.float32, ("batch", None)),
        place((batch,), jnp.int32, rows), place((batch,), jnp.int32, rows), place((batch,), jnp.bool_, rows),
        scalar(jnp.int32), place((batch,), jnp.int32, rows), place((2,), jnp.int32, (None,)),
        place(key.shape, key.dtype, ()), scalar(jnp.float32), scalar(jnp.float32),
        chunk=1, greedy=True, top_k=0, use_top_p=False)
    return prefill, decode, kernels


def plan(model: str | GptOssConfig, target: str | Target, mesh: str | None = None, *, batch: int = 1,
         context: int = 4096, prompt: int | None = None, dtype: str = "bfloat16", kernels: str = "auto",
         layers: int | None = None, progress=lambda message: None) -> Plan:
    """What `model` needs per chip of `target` on `mesh` (default: all chips on the expert
    axis) for `batch` sequences of a `context`-slot cache, prefilling `prompt` tokens
    (default min(context, 1024)). TPU targets are compiled (see the module docstring);
    `layers`: plan the model cut to its first `layers` layers (full width: a quick check;
    the numbers are then that model's). `progress(message)` hears about each compile.
    Raises ValueError for an unknown target, a mesh that does not match the chips or
    divide the model, or bad sizes."""
    config = _cut(model_config(model), layers)
    target = target if isinstance(target, Target) else target_named(target)
    if kernels not in CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(CHOICES)}, got {kernels!r}")
    spec = _target_mesh(config, target, mesh)
    _check_sizes(spec, batch=batch, context=context)
    if context > config.max_position_embeddings:
        raise ValueError(f"--context {context} is longer than the model's {config.max_position_embeddings} positions")
    prompt = min(context, 1024) if prompt is None else prompt
    if not 1 <= prompt <= context:
        raise ValueError(f"--prompt must be in [1, --context {context}], got {prompt}")
    dt = parse_dtype(dtype)
    per_slot, rings = cache_bytes(config, spec, context, dt)
    sequences = batch // spec.data
    params = planned_bytes_per_device(config, spec, dtype)["total"]
    result = Plan(config.name, target, str(spec), batch, sequences, context, prompt, (), params,
                  sequences * (rings + per_slot * context), per_slot, rings,
                  byte_bound(config, spec, batch, context, dtype), model_context=config.max_position_embeddings)
    if target.platform != "tpu":
        result.kernels = Kernels.choose(kernels, "gpu").names()
        return result
    devices = target.devices()
    result.available = available_hbm(target)
    progress(f"lowering {config.name} for {target.name} (mesh {spec}, batch {batch}, context {context})")
    prefill, decode, chosen = lower_steps(config, devices, spec, batch=batch, context=context, prompt=prompt,
                                          dtype=dtype, kernels=kernels)
    result.kernels = chosen.names()
    result.prefill = _program(f"prefill ({prompt} tokens)", prefill, progress)
    result.decode = _program("decode step", decode, progress)
    return result


# ------------------------------------------------------------------------------ training
@dataclasses.dataclass
class TrainingPlan:
    model: str
    target: Target
    mesh: str
    method: str  # "lora" or "full"
    adapters: str  # what trains, in words
    batch: int
    seq_len: int
    trainable: int  # trained parameters, all chips
    parameters: float  # per chip, logical (FP4 as half a byte)
    available: float
    step: Program

    @property
    def fits(self) -> bool:
        return self.step.total <= self.available

    def report(self) -> str:
        t, p = self.target, self.step
        lines = [f"{self.model} on {t.name} ({t.chips} chip{'s' * (t.chips > 1)}), mesh {self.mesh}: one {self.method} "
                 f"training step ({self.adapters}; {self.trainable:,} trained parameters) on {self.batch} x "
                 f"{self.seq_len} tokens",
                 "per chip:",
                 f"  model parameters      {format_bytes(self.parameters)}"]
        if p.needed is not None:
            lines.append(f"  training step         does NOT fit: the compiler needs {format_bytes(p.needed)} of "
                         f"{format_bytes(self.available)} (refused in {p.compile_seconds:.0f} s)")
        else:
            lines.append(f"  training step         arguments {format_bytes(p.arguments)} (parameters, trained weights "
                         f"and optimizer state), temporaries {format_bytes(p.temporaries)}, total "
                         f"{format_bytes(p.total)} (compiled in {p.compile_seconds:.0f} s)")
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  total                 {format_bytes(p.total)} of {format_bytes(self.available)} the "
                         f"compiler allows of {format_bytes(t.hbm_bytes)} HBM: {verdict} "
                         f"({format_bytes(abs(self.available - p.total))} {'spare' if self.fits else 'over'})")
        return "\n".join(lines)


def plan_training(model: str | GptOssConfig, target: str | Target, mesh: str | None = None, *, method: str = "lora",
                  lora=None, batch: int = 1, seq_len: int = 2048, layers: int | None = None,
                  progress=lambda message: None) -> TrainingPlan:
    """One step of `gptoss_jax.train.Trainer` (`method` "lora" with `lora`, a
    train.LoraConfig (default: rank 8 on q, k, v, o), or "full") compiled for a TPU `target`
    on `mesh`, from an abstract model: what each chip holds while it runs. Raises ValueError
    as `plan` does, and for a GPU target (no GPU compiler here)."""

    config = _cut(model_config(model), layers)
    target = target if isinstance(target, Target) else target_named(target)
    if target.platform != "tpu":
        tpus = ", ".join(name for name, t in TARGETS.items() if t.platform == "tpu")
        raise ValueError(f"training plans are compiled: pick a TPU target ({tpus}), not {target.name}")
    if method not in ("lora", "full"):
        raise ValueError(f"--train must be lora or full, got {method!r}")
    spec = _target_mesh(config, target, mesh)
    _check_sizes(spec, batch=batch, seq_len=seq_len)
    lora = train.LoraConfig() if lora is None else lora
    if method == "lora":
        lora.check(config)
    devices = target.devices()
    available = available_hbm(target)
    progress(f"lowering a {method} training step of {config.name} for {target.name} (mesh {spec}, {batch} x {seq_len})")
    device_mesh = make_mesh(spec, devices)

    def build():
        base = GptOss(config, jnp.bfloat16, device_mesh, XLA)
        return train.add_lora(base, lora) if method == "lora" else base

    trainer = train.Trainer(nnx.eval_shape(build), method, train.OptimizerConfig(learning_rate=1e-4, steps=1000),
                            abstract=True)
    rows = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    step = _program("training step", trainer.lower(Batch(rows, rows, None, rows, rows,
                                                         jax.ShapeDtypeStruct((batch, seq_len), jnp.float32))), progress)
    trainable = sum(math.prod(shape) for shape in trainer.param_shapes.values())
    if method == "lora":
        experts = ("" if not set(lora.targets) & {"mlp1", "mlp2"} else
                   f", expert layers {'all' if lora.expert_layers is None else ','.join(map(str, lora.expert_layers))}")
        adapters = f"LoRA rank {lora.rank} on {','.join(lora.targets)}{experts}; experts frozen in MXFP4"
    else:
        adapters = "every dense parameter; experts frozen in MXFP4"
    return TrainingPlan(config.name, target, str(spec), method, adapters, batch, seq_len, trainable,
                        planned_bytes_per_device(config, spec)["total"], available, step)


def _cut(config: GptOssConfig, layers: int | None) -> GptOssConfig:
    if layers is None:
        return config
    if not 1 <= layers <= config.num_hidden_layers:
        raise ValueError(f"--layers must be in [1, {config.num_hidden_layers}], got {layers}")
    return config.replace(num_hidden_layers=layers, name=f"{config.name} (first {layers} layers)")


def _check_sizes(spec: MeshSpec, **sizes: int) -> None:
    """Each size at least 1 (named as its flag), and `batch` split evenly over the data axis."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if sizes["batch"] % spec.data:
        raise ValueError(f"--batch {sizes['batch']} does not split over the mesh's data axis of {spec.data}")


def _target_mesh(config: GptOssConfig, target: Target, mesh: str | None) -> MeshSpec:
    spec = parse_mesh_spec(mesh) if mesh else MeshSpec(1, target.chips, 1)
    if spec.size != target.chips:
        raise MeshError(f"mesh {spec} has {spec.size} devices but {target.name} has {target.chips} chips; "
                        f"use a mesh whose sizes multiply to {target.chips}")
    check_mesh_fits_model(config, spec)
    return spec


# ------------------------------------------------------------------------------ command line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_jax.plan",
        description="What a model needs per chip of a TPU (compiled for it on this machine, no TPU needed) or a GPU "
                    "(from the shapes), and the decode speed the chip's bandwidth allows.")
    parser.add_argument("--model", default="gpt-oss-20b",
                        help=f"a preset ({', '.join(PRESETS)}), a config.json or a checkpoint directory")
    parser.add_argument("--target", required=True, help=f"one of {', '.join(TARGETS)}")
    parser.add_argument("--mesh", metavar="AxB|DxAxB",
                        help="expert x model (or data x expert x model) over the target's chips; default: all chips "
                             "on the expert axis")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--context", type=int, default=4096, help="KV cache slots per sequence")
    parser.add_argument("--prompt", type=int, help="tokens prefilled in one call (default: min(context, 1024))")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--kernels", choices=CHOICES, default="auto")
    parser.add_argument("--layers", type=int,
                        help="plan only the first N layers (full width): a quick check; the numbers are then for "
                             "that depth")
    training = parser.add_argument_group("training (--train): one step of python -m gptoss_jax.finetune")
    training.add_argument("--train", choices=["lora", "full"],
                          help="plan a training step instead of inference: LoRA adapters, or every dense parameter "
                               "(the experts stay frozen in MXFP4 either way)")
    training.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048); --batch: rows")
    training.add_argument("--lora-rank", type=int, default=8)
    training.add_argument("--lora-targets", default="q,k,v,o",
                          help="among q, k, v, o, router, mlp1, mlp2 (default q,k,v,o)")
    training.add_argument("--expert-layers", help="layers whose experts get adapters, e.g. 7,15,23 (default: all, "
                                                  "when mlp1 or mlp2 is a target)")
    args = parser.parse_args(argv)
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # compiling only: no backend but the host's is needed
    try:
        if args.train:
            return _plan_training(args)
        result = plan(args.model, args.target, args.mesh, batch=args.batch, context=args.context, prompt=args.prompt,
                      dtype=args.dtype, kernels=args.kernels, layers=args.layers,
                      progress=lambda message: print(message, file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(result.report())
    return 0


def _plan_training(args) -> int:
    layers = None
    if args.expert_layers:
        try:
            layers = tuple(int(x) for x in args.expert_layers.split(","))
        except ValueError:
            raise ValueError(f"--expert-layers must be comma-separated layer numbers, got {args.expert_layers!r}") from None
    lora = train.LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                            targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                            expert_layers=layers)
    result = plan_training(args.model, args.target, args.mesh, method=args.train, lora=lora, batch=args.batch,
                           seq_len=args.seq_len, layers=args.layers,
                           progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
