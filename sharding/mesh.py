"""Mesh specs, their checks against the devices and the model, and device start-up.

A mesh spec `AxB` is A-way expert parallelism times B-way tensor parallelism (mesh axes
"expert" x "model"); `DxAxB` adds a leading D-way "data" axis (the batch is split D ways,
each data slice holds a full copy of the weights). Meshes always carry all three axes.

Start-up order matters: host (CPU) devices must be provisioned and `jax.distributed`
initialised before JAX starts its backends, so `start_devices` runs before anything else
touches a device.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading

import jax
from jax.sharding import AxisType, Mesh

from gptoss_jax.mxfp4 import BLOCK as MXFP4_BLOCK
from gptoss_jax.sharding.rules import DATA, EXPERT, MODEL

MESH_AXES = (DATA, EXPERT, MODEL)
HOST_DEVICE_FLAG = "xla_force_host_platform_device_count"
# No host has more devices than this; asking XLA for a million host devices takes minutes and
# gigabytes before anything can say that the mesh does not fit.
MAX_LOCAL_DEVICES = 1024
DEFAULT_JOIN_TIMEOUT = 120  # seconds


class MeshError(ValueError):
    """A mesh spec that is malformed or does not fit the devices or the model."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int
    expert: int
    model: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.expert, self.model)

    @property
    def size(self) -> int:
        return self.data * self.expert * self.model

    def __str__(self) -> str:
        if self.data == 1:
            return f"{self.expert}x{self.model}"
        return f"{self.data}x{self.expert}x{self.model}"


def parse_mesh_spec(text: str) -> MeshSpec:
    """'4x2' -> data 1, expert 4, model 2; '2x2x2' -> data 2, expert 2, model 2."""
    parts = str(text).strip().lower().split("x")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"[0-9]+", p) and int(p) > 0 for p in parts):
        raise MeshError(f"--mesh '{text}' is not a mesh spec; use AxB (expert x model, e.g. 4x2) or "
                        f"DxAxB (data x expert x model, e.g. 2x2x2) with positive integers")
    sizes = [int(p) for p in parts]
    return MeshSpec(*([1] * (3 - len(sizes)) + sizes))


def spec_of(mesh: Mesh) -> MeshSpec:
    return MeshSpec(*(mesh.shape.get(axis, 1) for axis in MESH_AXES))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_mesh_fits_model(config, mesh) -> list[str]:
    """Raises MeshError when the model cannot be split over `mesh` (a Mesh, AbstractMesh or
    MeshSpec); returns notes about what is replicated instead of split."""
    spec = mesh if isinstance(mesh, MeshSpec) else spec_of(mesh)
    explicit = [name for name, kind in zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ()))
                if kind != AxisType.Auto]
    if explicit:
        raise MeshError(f"mesh axes {explicit} are not AxisType.Auto (jax.make_mesh makes Explicit axes by "
                        f"default); build the mesh with gptoss_jax.sharding.make_mesh('{spec}')")
    c, a, b = config, spec.expert, spec.model
    where = f"mesh {spec} (expert {a} x model {b}) for model '{c.name}'"
    if c.num_experts % a:
        raise MeshError(f"{where}: the expert axis must divide the {c.num_experts} experts; "
                        f"use an expert axis in {_divisors(c.num_experts)}")
    if c.num_attention_heads % b:
        raise MeshError(f"{where}: the model axis must divide the {c.num_attention_heads} attention heads; "
                        f"use a model axis in {_divisors(c.num_attention_heads)}")
    hidden_blocks = c.intermediate_size // MXFP4_BLOCK
    if hidden_blocks % b:
        raise MeshError(f"{where}: the model axis must divide the experts' {hidden_blocks} MXFP4 blocks of "
                        f"hidden units (intermediate_size {c.intermediate_size} / {MXFP4_BLOCK}); use a "
                        f"model axis in {_divisors(hidden_blocks)}, and put the other devices on the expert axis")
    notes = []
    if c.num_key_value_heads % b:
        notes.append(f"the {c.num_key_value_heads} KV heads do not split {b} ways: each device of the model "
                     f"axis holds all of them (replicated)")
    if c.vocab_size % b:
        notes.append(f"the vocabulary ({c.vocab_size}) does not split {b} ways: embeddings are replicated")
    return notes


def make_mesh(spec: MeshSpec | str, devices=None) -> Mesh:
    """The ("data", "expert", "model") mesh over all devices (of every process), or over
    `devices`. Axes are Auto: XLA propagates shardings outside the MoE's shard_map."""
    spec = parse_mesh_spec(spec) if isinstance(spec, str) else spec
    devices = list(jax.devices() if devices is None else devices)
    if spec.size != len(devices):
        platform = devices[0].platform if devices else "no"
        if platform == "cpu":
            hint = (f"; for {spec.size} host devices set XLA_FLAGS=--{HOST_DEVICE_FLAG}={spec.size} before JAX "
                    f"starts (the CLI does so itself unless XLA_FLAGS already sets a count)")
        else:
            hint = f"; choose mesh sizes whose product is {len(devices)}"
        raise MeshError(f"--mesh {spec} needs {spec.size} devices (the product of its sizes) but "
                        f"{len(devices)} {platform.upper()} devices are available{hint}")
    return jax.make_mesh(spec.shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ------------------------------------------------------------------------------- start-up
def provision_host_devices(count: int) -> bool:
    """Asks JAX for `count` host (CPU) devices. Must run before JAX starts its backends;
    returns False (and changes nothing) when XLA_FLAGS already sets a count or JAX has
    started. Harmless on accelerator hosts: the accelerators stay the default devices."""
    if HOST_DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Distributed:
    """How to join several processes into one JAX runtime. `auto` lets JAX detect the
    cluster (TPU pod slices, SLURM, Open MPI, Kubernetes); otherwise all three are given."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    join_timeout: float = DEFAULT_JOIN_TIMEOUT  # seconds to wait for every process to join

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator is not None

    def check(self) -> None:
        if not self.join_timeout > 0:
            raise MeshError(f"--join-timeout must be > 0 seconds, got {self.join_timeout}")
        if self.auto or (self.coordinator is None and self.num_processes is None and self.process_id is None):
            return
        if self.coordinator is None or self.num_processes is None or self.process_id is None:
            raise MeshError("multi-process runs need --coordinator HOST:PORT, --num-processes N and "
                            "--process-id I together (or --distributed to detect a TPU pod / cluster)")
        host, colon, port = self.coordinator.rpartition(":")
        if not (colon and host and port.isdigit()):
            example = f"{host if colon else self.coordinator}:1234"
            raise MeshError(f"--coordinator '{self.coordinator}' is not HOST:PORT; give the port too, e.g. {example}")
        if not 0 < int(port) < 65536:
            raise MeshError(f"--coordinator '{self.coordinator}': the port must be in 1..65535")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise MeshError(f"--process-id must be in [0, {self.num_processes}) for --num-processes "
                            f"{self.num_processes}, got {self.process_id}")

    def join_failure(self) -> str:
        """What to say when the processes did not all join within the timeout."""
        within = f"within {self.join_timeout:g} s"
        if self.auto:
            return (f"error: the processes did not all join {within} (jax.distributed cluster detection); check that "
                    f"every process of the job was started, or raise --join-timeout")
        address, n = self.coordinator, self.num_processes
        same = f"--coordinator {address} --num-processes {n}"
        if self.process_id == 0:
            return (f"error (process 0): not all {n} processes joined at {address} {within}; check that each was "
                    f"started with {same} and its own --process-id, that {address} is reachable from every host "
                    f"(firewall, host name), or raise --join-timeout")
        return (f"error (process {self.process_id}): could not join process 0 at {address} {within}; check that "
                f"process 0 runs with {same}, that {address} is reachable from this host (firewall, host name), "
                f"or raise --join-timeout")


def start_devices(spec: MeshSpec, distributed: Distributed = Distributed()) -> list[str]:
    """Provisions host devices for the mesh and joins the processes, before JAX starts.
    Returns notes for the user (empty when nothing was done behind their back)."""
    distributed.check()
    local = spec.size
    if distributed.num_processes:
        if spec.size % distributed.num_processes:
            raise MeshError(f"--mesh {spec} ({spec.size} devices) does not split evenly over "
                            f"{distributed.num_processes} processes")
        local = spec.size // distributed.num_processes
    if local > MAX_LOCAL_DEVICES:
        raise MeshError(f"--mesh {spec} needs {local} devices in one process; no host has more than "
                        f"{MAX_LOCAL_DEVICES} (spread it over processes with --num-processes, or use a smaller mesh)")
    provisioned = local > 1 and provision_host_devices(local)
    if distributed.enabled:
        _join(distributed)
    notes = []
    if provisioned and jax.default_backend() == "cpu":
        notes.append(f"no accelerator found: --mesh {spec} runs on {spec.size} host (CPU) devices "
                     f"({local} in this process), provisioned by this command")
    return notes


def _join(distributed: Distributed) -> None:
    """jax.distributed.initialize, bounded by `join_timeout`. When a process never comes, JAX
    waits its own (longer) timeout and then aborts the interpreter with a C++ stack trace; the
    wait happens outside Python (no exception can interrupt it), so a timer thread reports the
    failure in one line and ends the process with status 2 first."""
    # Collectives between processes on CPU go through gloo (TCP); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def give_up():
        print(distributed.join_failure(), file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(distributed.join_timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        if distributed.auto:
            jax.distributed.initialize(initialization_timeout=int(distributed.join_timeout) + 60)
        else:
            jax.distributed.initialize(distributed.coordinator, distributed.num_processes, distributed.process_id,
                                       initialization_timeout=int(distributed.join_timeout) + 60)
    except (ValueError, RuntimeError) as e:
        raise MeshError(f"could not join the processes with jax.distributed: {' '.join(str(e).split())}") from None
    finally:
        timer.cancel()
