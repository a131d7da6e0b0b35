"""Conversion between the MXFP4 safetensors layouts and this project's Orbax checkpoint.

`convert(SRC, DST)` reads an HF- or original-layout checkpoint, validates it against its
config (headers, names, shapes, dtypes, E8M0 scales) before writing anything, then streams
it tensor by tensor into a converted checkpoint (see `orbax_io`). `export_hf(SRC, DST)` turns
a converted checkpoint back into HF-layout safetensors. Both write into a temporary sibling
of DST and rename it at the end, so a failed or interrupted run leaves no DST, and a later
run to the same DST deletes what a killed one left.

Host memory: a tensor is read with plain file reads (no memory map), split along its first
axis into one piece per CPU device, and each piece is copied to its device and dropped; the
writer hands orbax groups of at most `orbax_io.GROUP_BYTES`. So the host holds about one
group or the largest tensor, plus one piece.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax.config import ConfigError
from gptoss_jax.converters import orbax_io
from gptoss_jax.converters.destination import ConversionError, atomic_directory, check_destination, check_free_space
from gptoss_jax.converters.interrupts import signals_raise_interrupted, uninterrupted
from gptoss_jax.converters.layouts import (
    DENSE,
    E8M0_SCALES,
    HF,
    HF_SHARD_BYTES,
    Checkpoint,
    part_byte_ranges,
    tensor_from_parts,
    tensor_specs,
    write_checkpoint,
)
from gptoss_jax.converters.safetensors_io import CheckpointError, read_json
from gptoss_jax.model import abstract_model

# Files an HF download carries besides the weights; kept so `--to hf` returns them.
HF_EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja")
MIN_PIECE_BYTES = 64 << 20  # smaller tensors go to one device whole


# ------------------------------------------------------------------------------ progress
class Progress:
    """A one-line progress bar on a terminal: bytes done, rate, ETA and the current tensor."""

    def __init__(self, total: int, stream=None, enabled: bool | None = None, label: str = "converting",
                 interval: float = 0.2):
        self.total, self.done, self.label, self.interval = total, 0, label, interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.last = self.start - interval

    def advance(self, nbytes: int, name: str):
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            self.stream.write("\r\033[K" + self.line(name))
            self.stream.flush()

    def line(self, name: str = "") -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        # Every tensor is read: what is left is writing the last of them and the metadata.
        tail = "finishing: writing the last data and the metadata" if self.done >= self.total else \
            f"ETA {eta_text} {name}"
        return (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done / 2**30:.2f}/"
                f"{self.total / 2**30:.2f} GiB {rate / 1e6:.0f} MB/s {tail}")

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------- convert
def _scan_scales(checkpoint: Checkpoint):
    """Refuses E8M0 scale 255 (NaN) anywhere, before anything is written."""
    for spec in checkpoint.specs:
        if spec.parts[0].kind == E8M0_SCALES:
            checkpoint.read(spec)  # raises on 255


def source_bytes(checkpoint: Checkpoint) -> int:
    return sum(checkpoint.files[checkpoint.file_of[s.name]].nbytes(s.name) for s in checkpoint.specs)


def convert(src, dst, *, force: bool = False, dry_run: bool = False, progress: bool | None = None) -> dict:
    """Converts an HF- or original-layout MXFP4 checkpoint into a converted checkpoint at `dst`.
    Returns a summary (layout, bytes, seconds)."""
    src, dst = Path(src), Path(dst)
    if orbax_io.is_converted(src):
        raise ConversionError(f"{src}: already a converted gptoss-jax checkpoint (load it as it is); to write it back "
                              f"as HF-layout safetensors, run `python -m gptoss_jax.convert {src} DST --to hf`")
    checkpoint = Checkpoint(src)
    check_destination(src, dst, force)
    _scan_scales(checkpoint)
    total = source_bytes(checkpoint)
    summary = {"layout": checkpoint.layout, "tensors": len(checkpoint.specs), "bytes": total,
               "config": checkpoint.config.name}
    if dry_run:
        return summary
    check_free_space(dst, total)
    start = time.monotonic()
    bar = Progress(total, enabled=progress)
    try:
        with atomic_directory(dst, force=force) as tmp:
            _write_converted(checkpoint, tmp, bar)
    finally:
        bar.close()
    summary["seconds"] = time.monotonic() - start
    return summary


def _write_converted(checkpoint: Checkpoint, tmp: Path, bar: Progress):
    devices = jax.devices("cpu")
    axes = _leaf_axes(checkpoint.config)
    writer = orbax_io.ParamsWriter(tmp / orbax_io.PARAMS)
    try:
        for spec in checkpoint.specs:
            name = spec.name
            f = checkpoint.files[checkpoint.file_of[name]]
            dtype = np.dtype(f.entries[name][0])
            for part, begin, end in part_byte_ranges(spec, dtype.itemsize):
                leaf_dtype = orbax_io.stored_dtype(part.kind, dtype)
                writer.make_room(end - begin)
                array = _to_cpu_devices(lambda a, b: f.read_bytes(name, begin + a, begin + b), part.disk_shape,
                                        leaf_dtype, devices)
                writer.add(part.leaf, array, shard_axes=orbax_io.chunk_axes(axes[part.leaf], part.disk_shape,
                                                                            leaf_dtype.itemsize))
                del array
            bar.advance(f.nbytes(name), name)
        writer.finish()
    except orbax_io.WriteFailed as e:
        raise _write_error(tmp, e.what, e.cause) from None
    _copy_source_files(checkpoint, tmp / orbax_io.SOURCE)
    # The config is named after the source folder (it was named after its config.json path).
    config = checkpoint.config.replace(name=checkpoint.path.resolve().name)
    orbax_io.write_marker(tmp, config, {
        "layout": checkpoint.layout, "path": str(checkpoint.path.resolve()),
        "files": sorted(checkpoint.files), "bytes": source_bytes(checkpoint)})


def _write_error(tmp: Path, name: str | None, e: Exception) -> ConversionError:
    dst = tmp.with_name(tmp.name.split(".incomplete-")[0])
    code = getattr(e, "errno", None)
    if code is None:  # tensorstore: "... [os_error_code='28']"
        found = re.search(r"os_error_code='(\d+)'", str(e))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else (getattr(e, "strerror", None) or str(e))
    hint = ("free some space or choose another DST" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            else "check the destination file system")
    return ConversionError(f"{dst}: {name}: writing failed ({reason}); nothing was written to {dst}; {hint}")


def _leaf_axes(config) -> dict[tuple, tuple[str, ...]]:
    _, leaves = abstract_model(config, jnp.bfloat16)
    return {path: var.get_metadata()["axes"] for path, var in leaves}


def _to_cpu_devices(read, shape, dtype, devices):
    """A jax.Array of `shape` split along axis 0 over up to len(devices) CPU devices, read a
    piece at a time with `read(first byte, end byte)` so the host holds one piece at once."""

    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    pieces = 1
    if nbytes > MIN_PIECE_BYTES:
        pieces = max(k for k in range(1, len(devices) + 1) if shape[0] % k == 0)
    step = nbytes // pieces
    shards = []
    for i in range(pieces):
        piece = read(i * step, (i + 1) * step).view(dtype).reshape(shape[0] // pieces, *shape[1:])
        shards.append(jax.device_put(piece, devices[i]))
        del piece
    sharding = NamedSharding(Mesh(np.array(devices[:pieces]), ("pieces",)), PartitionSpec("pieces"))
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, shards)


def _copy_source_files(checkpoint: Checkpoint, folder: Path):
    folder.mkdir()
    shutil.copyfile(checkpoint.root / "config.json", folder / "config.json")
    if checkpoint.layout == HF:
        for name in HF_EXTRA_FILES:
            if (checkpoint.root / name).is_file():
                shutil.copyfile(checkpoint.root / name, folder / name)


# -------------------------------------------------------------------------------- export
def export_hf(src, dst, *, force: bool = False, dry_run: bool = False, progress: bool | None = None,
              max_shard_bytes: int = HF_SHARD_BYTES) -> dict:
    """Writes a converted checkpoint as HF-layout MXFP4 safetensors (shards, index, config).
    An unmodified conversion comes back byte for byte; the source's config and tokenizer
    files, if it had them, come back unchanged."""
    src, dst = Path(src), Path(dst)
    checkpoint = orbax_io.ConvertedCheckpoint(src)
    check_destination(src, dst, force)
    specs = tensor_specs(checkpoint.config, HF)
    leaves = checkpoint.leaves
    dtypes = {s.name: leaves[s.parts[0].leaf].dtype for s in specs if s.parts[0].kind == DENSE}
    total = sum(leaves[p.leaf].nbytes for s in specs for p in s.parts)
    summary = {"layout": HF, "tensors": len(specs), "bytes": total, "config": checkpoint.config.name}
    if dry_run:
        return summary
    check_free_space(dst, total)
    source = src / orbax_io.SOURCE
    from_hf = checkpoint.marker.get("source", {}).get("layout") == HF and (source / "config.json").is_file()
    hf_config = read_json(source / "config.json") if from_hf else None
    reader = _GroupReader(checkpoint, specs)
    start = time.monotonic()
    bar = Progress(total, enabled=progress, label="exporting")
    current = {"name": None}

    def produce(spec):
        current["name"] = spec.name
        tensor = tensor_from_parts(spec, lambda part: reader.get(part.leaf))
        bar.advance(tensor.nbytes, spec.name)
        return tensor

    try:
        with atomic_directory(dst, force=force) as tmp:
            try:
                write_checkpoint(tmp, checkpoint.config, HF, produce, max_shard_bytes=max_shard_bytes,
                                 dtypes=dtypes, hf_config=hf_config)
                if from_hf:
                    for name in HF_EXTRA_FILES:
                        if (source / name).is_file():
                            shutil.copyfile(source / name, tmp / name)
            except OSError as e:
                raise _write_error(tmp, current["name"], e) from None
    finally:
        bar.close()
    summary["seconds"] = time.monotonic() - start
    return summary


class _GroupReader:
    """Reads stored parameters in the order the writer needs them, a group of at most
    `orbax_io.GROUP_BYTES` per Orbax read, keeping only the current group on the host."""

    def __init__(self, checkpoint: orbax_io.ConvertedCheckpoint, specs):
        self.checkpoint = checkpoint
        self.order = [p.leaf for s in specs for p in s.parts]
        self.position = {leaf: i for i, leaf in enumerate(self.order)}
        self.cache: dict[tuple, np.ndarray] = {}

    def get(self, leaf: tuple) -> np.ndarray:
        if leaf not in self.cache:
            self.cache = {}  # drop the previous group first
            group, size = [], 0
            for path in self.order[self.position[leaf]:]:
                nbytes = self.checkpoint.leaves[path].nbytes
                if group and size + nbytes > orbax_io.GROUP_BYTES:
                    break
                group.append(path)
                size += nbytes
            with uninterrupted():  # a signal is acted on between groups, not inside orbax's event loop
                self.cache = self.checkpoint.read_host(group)
            orbax_io.return_free_memory()
        return self.cache[leaf]


# ----------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_jax.convert",
        description="Convert a gpt-oss MXFP4 checkpoint (Hugging Face or original OpenAI layout) into a gptoss-jax "
                    "Orbax checkpoint, or (--to hf) a converted checkpoint back into HF-layout safetensors.")
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory (must not exist unless --force)")
    parser.add_argument("--to", choices=("orbax", "hf"), default="orbax",
                        help="orbax: MXFP4 safetensors -> converted checkpoint (default); "
                             "hf: converted checkpoint -> HF-layout safetensors")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.add_argument("--dry-run", action="store_true", help="validate SRC and DST, write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    return parser


def _use_cpu_devices(count: int = 8):
    """The converter needs no accelerator: run JAX on `count` CPU devices, so tensors split
    into pieces. Only possible before JAX starts its backends; otherwise keep what is there."""

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        return
    jax.config.update("jax_platforms", "cpu")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Failures are reported below in one line; orbax would also log them with a traceback.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    progress = False if args.no_progress else None
    try:
        with signals_raise_interrupted():
            _use_cpu_devices()
            orbax_io.map_large_allocations()
            if args.to == "hf":
                summary = export_hf(args.src, args.dst, force=args.force, dry_run=args.dry_run, progress=progress)
            else:
                summary = convert(args.src, args.dst, force=args.force, dry_run=args.dry_run, progress=progress)
    except (CheckpointError, ConfigError, ConversionError, OSError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Interrupted)
        status = getattr(e, "exit_status", 128 + signal.SIGINT)
        how = "interrupted" if status == 128 + signal.SIGINT else f"stopped by {e}"
        print(f"error: {args.dst}: {how}; nothing was written", file=sys.stderr)
        return status
    size = f"{summary['bytes'] / 2**30:.2f} GiB"
    if args.dry_run:
        kind = "converted checkpoint" if args.to == "hf" else f"{summary['layout']}-layout checkpoint"
        print(f"ok: {args.src} is a valid {kind} ({summary['tensors']} tensors, {size}); would write {args.dst}")
    else:
        rate = summary["bytes"] / max(summary["seconds"], 1e-9) / 1e9
        print(f"wrote {args.dst} ({size} in {summary['seconds']:.1f} s, {rate:.2f} GB/s)")
    return 0
