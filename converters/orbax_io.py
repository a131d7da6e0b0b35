"""This project's own checkpoint format: the model's parameters saved with orbax-checkpoint.

A converted checkpoint is a directory holding

- `gptoss_jax.json`: the format marker (name, version), the tokenizer it expects, where
  the weights came from and the size of every file under `params/` (so that a missing or
  truncated file is found before anything is read);
- `config.json`: the model config (`GptOssConfig.to_dict`);
- `params/`: an Orbax checkpoint (OCDBT + Zarr3, uncompressed) of the model's parameter tree,
  one array per parameter, keyed by the parameter's path (`blocks/0/mlp/mlp1_fp4`);
- `source/` (optional): the source's `config.json` and tokenizer files, returned unchanged
  by `--to hf`.

Arrays are stored in their checkpoint form, so a conversion is bit-exact and reversible:
E8M0 scales as `float8_e8m0fnu`, dense tensors in the dtype the source stored them in, and
FP4 values as the MXFP4 bytes themselves, `uint8[..., blocks, 16]` with element 2j in the
low nibble (docs/architecture.md 3.3). Orbax can store `float4_e2m1fn`, but as one byte per value on disk and
on the host; the packed bytes halve both, and on the device a bitcast turns them into
`float4_e2m1fn[..., blocks, 32]` (`mxfp4.blocks_to_fp4`). Chunks hold one expert each, so a
process restoring an expert-parallel shard reads only its own experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters.destination import atomic_directory
from gptoss_jax.converters.interrupts import uninterrupted
from gptoss_jax.converters.layouts import DENSE, E8M0_SCALES, FLOAT_DTYPES, FP4_VALUES, HF, read_config, tensor_specs
from gptoss_jax.converters.safetensors_io import DTYPES, CheckpointError, read_json
from gptoss_jax.sharding.rules import LOGICAL_TO_MESH
from gptoss_jax.tokenizer import ENCODING_NAME, VOCABULARY_FILE, VOCABULARY_SHA256

FORMAT = "gptoss-jax-orbax"
FORMAT_VERSION = 1
MARKER = "gptoss_jax.json"
CONFIG = "config.json"
PARAMS = "params"
SOURCE = "source"

CHUNK_BYTES = 16 << 20  # storage chunks; a restore reads whole chunks
GROUP_BYTES = 512 << 20  # parameters handed to one orbax save
MIN_CHUNK_BYTES = 64 << 10  # smallest chunk cut along shardable axes
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
STORED_FLOAT_DTYPES = tuple(DTYPES[name] for name in FLOAT_DTYPES)


@dataclasses.dataclass(frozen=True)
class StoredLeaf:
    """One parameter as stored: its model path, kind and stored shape and dtype."""

    path: tuple
    kind: str  # DENSE, FP4_VALUES or E8M0_SCALES
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def key(self) -> str:
        return leaf_key(self.path)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def chunk_axes(logical_axes: tuple[str, ...], shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Axes to store one index per chunk, so that a process restoring a shard of them reads
    only its own chunks: the axes a mesh may shard (sharding/rules.py), in order, as long as
    a chunk stays at least `MIN_CHUNK_BYTES` (experts and attention heads qualify; vocabulary
    rows and MXFP4 blocks would make chunks of a few KiB)."""
    chunk = int(np.prod(shape, dtype=np.int64)) * itemsize
    axes = []
    for i, name in enumerate(logical_axes):
        if LOGICAL_TO_MESH.get(name) is not None and shape[i] > 1 and chunk // shape[i] >= MIN_CHUNK_BYTES:
            axes.append(i)
            chunk //= shape[i]
    return tuple(axes)


def leaf_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def stored_dtype(kind: str, dense_dtype) -> np.dtype:
    return {FP4_VALUES: np.dtype(np.uint8), E8M0_SCALES: E8M0}.get(kind, np.dtype(dense_dtype))


def expected_leaves(config: GptOssConfig) -> dict[tuple, tuple[str, tuple[int, ...]]]:
    """path -> (kind, stored shape) of every parameter of a model with this config."""
    return {part.leaf: (part.kind, part.disk_shape) for spec in tensor_specs(config, HF) for part in spec.parts}


def nest(values: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, value in values.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(str(name), {})
        node[str(path[-1])] = value
    return tree


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
    if isinstance(tree, dict):
        out = {}
        for name, sub in tree.items():
            out.update(_flatten(sub, (*prefix, name)))
        return out
    return {prefix: tree}


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_free_memory():
    """Hands memory freed by tensorstore's writer threads back to the OS (glibc keeps it in
    per-thread arenas otherwise, and the process grows by a few groups' worth)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = 32 << 20):
    """glibc: serve allocations above `threshold` with their own mappings, returned to the OS
    when freed, instead of raising the threshold as buffers come and go (which leaves
    tens-of-MB chunk buffers stranded in arenas). For converter processes only."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def _ocp():
    from orbax.checkpoint import v1 as ocp  # imported on use: it is slow to import

    return ocp


@contextlib.contextmanager
def _orbax_logs_kept():
    """Yields a list that collects what orbax and its event loop log (warnings and errors
    about arrays it could not read) instead of printing it: the caller turns failures
    into one error of its own."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    saved = [(logger.handlers, logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate, logger.level = [Keep()], False, logging.WARNING
    try:
        yield records
    finally:
        for logger, (handlers, propagate, level) in zip(loggers, saved):
            logger.handlers, logger.propagate, logger.level = handlers, propagate, level


def _tensorstore_error(error: BaseException) -> ValueError | None:
    """The ValueError by which tensorstore reports missing or damaged data, if that is what
    `error` (or the error it wraps) is."""
    while error is not None and not isinstance(error, ValueError):
        error = error.__cause__ or error.__context__
    return error


def _short(message: str) -> str:
    return " ".join(message.split(" [tensorstore_spec=")[0].split())


def _parameter_named_in(message: str) -> str | None:
    found = re.search(r'"([\w.]+)/(?:zarr\.json|c/)', message)  # tensorstore names arrays "blocks.0.attn.wq"
    return found.group(1).replace(".", "/") if found else None


# ------------------------------------------------------------------------------- writing
def _describe(leaves: dict) -> str:
    keys = [leaf_key(p) for p in leaves]
    return keys[0] if len(keys) == 1 else f"{keys[0]} .. {keys[-1]}"


class WriteFailed(Exception):
    """Writing a group of parameters failed; `what` names them, `cause` is the error."""

    def __init__(self, what: str, cause: Exception):
        super().__init__(f"{what}: {cause}")
        self.what, self.cause = what, cause


class ParamsWriter:
    """Writes parameters into `directory` (an Orbax checkpoint) with orbax's partial saves, a
    group of about `group_bytes` at a time, so the host holds one group (or one larger
    parameter) at once. (Overlapping the next group's reads with a save was measured slower
    on a local disk: reads and writes then contend.)"""

    def __init__(self, directory: str | Path, group_bytes: int | None = None):
        self.directory = Path(directory).absolute()  # orbax takes absolute paths only
        self.group_bytes = group_bytes or GROUP_BYTES
        self.pending: dict[tuple, jax.Array] = {}
        self.pending_bytes = 0
        self.shard_axes: dict[tuple[str, ...], tuple[int, ...]] = {}

    def make_room(self, nbytes: int):
        """Saves the pending group if a parameter of `nbytes` would overfill it. Call it before
        creating that parameter, so the two never sit in memory together."""
        if self.pending and self.pending_bytes + nbytes > self.group_bytes:
            self.flush()

    def add(self, path: tuple, array: jax.Array, *, shard_axes: tuple[int, ...] = ()):
        """`shard_axes`: axes to store one index per chunk (see `chunk_axes`)."""
        nbytes = array.size * array.dtype.itemsize
        self.make_room(nbytes)
        self.pending[path] = array
        self.pending_bytes += nbytes
        if shard_axes:
            self.shard_axes[tuple(str(p) for p in path)] = tuple(shard_axes)

    def flush(self):
        if not self.pending:
            return
        try:
            with uninterrupted(), self._context():
                _ocp().partial.save(self.directory, nest(self.pending))
        except (OSError, ValueError) as e:  # tensorstore reports I/O errors as ValueError
            raise WriteFailed(_describe(self.pending), e) from None
        self.pending, self.pending_bytes = {}, 0
        return_free_memory()

    def finish(self):
        self.flush()
        try:
            with uninterrupted(), self._context():
                _ocp().partial.finalize(self.directory)
        except (OSError, ValueError) as e:
            raise WriteFailed("the checkpoint's metadata", e) from None

    def _context(self):
        ocp = _ocp()
        shard_axes = self.shard_axes

        def storage_options(keypath, value):
            axes = shard_axes.get(tuple(str(getattr(k, "key", k)) for k in keypath))
            return ocp.options.ArrayOptions.Saving.StorageOptions(shard_axes=axes) if axes else None

        context = ocp.Context()
        context.array.saving.use_compression = False  # MXFP4 bytes do not compress; bf16 gains ~20% at ~10x the time
        context.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
        context.array.saving.scoped_storage_options_creator = storage_options
        context.memory.deepcopy_host_arrays = False  # the writer drops its arrays only after the save
        return context


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("gptoss-jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def file_sizes(folder: Path) -> dict[str, int]:
    """The size of every file under `folder`, by its path relative to `folder`."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def write_marker(directory: Path, config: GptOssConfig, source: dict):
    """Writes the config and the marker; call it once the parameters are written."""
    marker = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "params": PARAMS,
        "fp4_storage": "uint8[..., blocks, 16]: MXFP4 bytes, element 2j in the low nibble, 2j+1 in the high",
        "tokenizer": {"encoding": ENCODING_NAME, "vocabulary": VOCABULARY_FILE.name,
                      "vocabulary_sha256": VOCABULARY_SHA256, "shipped_with": "gptoss_jax"},
        "source": source,
        "written_by": f"gptoss-jax {_package_version()}",
        "params_file_sizes": file_sizes(directory / PARAMS),
    }
    (directory / CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
    (directory / MARKER).write_text(json.dumps(marker, indent=2))


def save_model(model, path: str | Path, *, force: bool = False) -> Path:
    """Saves a model (for example a fine-tuned one) in this format, atomically. Each process
    writes the shards it holds; FP4 parameters are packed back into MXFP4 bytes on the device."""
    kinds = expected_leaves(model.config)
    with atomic_directory(Path(path), force=force) as tmp:
        writer = ParamsWriter(tmp / PARAMS)
        for path_, var in nnx.to_flat_state(nnx.state(model)):
            kind = kinds[path_][0]
            value = var.get_value()
            if kind == FP4_VALUES:
                value = jax.jit(mxfp4.fp4_to_blocks, out_shardings=value.sharding)(value)
            writer.add(path_, value, shard_axes=chunk_axes(var.get_metadata()["axes"], value.shape,
                                                           value.dtype.itemsize))
        writer.finish()
        write_marker(tmp, model.config, {"layout": None, "saved_from": "model"})
    return Path(path)


# ------------------------------------------------------------------------------- reading
def is_converted(path) -> bool:
    return (Path(path) / MARKER).is_file()


class ConvertedCheckpoint:
    """A converted checkpoint directory, validated against its config on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()  # orbax takes absolute paths only
        marker_path = self.path / MARKER
        if not marker_path.is_file():
            raise CheckpointError(f"{self.path}: not a converted gptoss-jax checkpoint (no {MARKER}); convert "
                                  f"one with `python -m gptoss_jax.convert SRC DST`")
        self.marker = read_json(marker_path)
        if not isinstance(self.marker, dict) or self.marker.get("format") != FORMAT:
            raise CheckpointError(f"{marker_path}: not a {FORMAT} marker")
        version = self.marker.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{marker_path}: format version {version!r}, but this gptoss-jax reads version "
                                  f"{FORMAT_VERSION}; use the gptoss-jax that wrote it or convert the source again")
        self.config = read_config(self.path / CONFIG)
        self.params = self.path / self.marker.get("params", PARAMS)
        self._check_file_sizes()
        self.leaves = self._validate()

    def damaged(self, what: str) -> CheckpointError:
        """The error for a checkpoint whose files are damaged: what is wrong, and how to
        write it again."""
        source = self.marker.get("source")
        source = source if isinstance(source, dict) else {}
        if source.get("path"):
            fix = f"convert the source again (python -m gptoss_jax.convert {source['path']} {self.path} --force)"
        elif source.get("saved_from"):
            fix = "save the model again"
        else:
            fix = "convert the source again"
        return CheckpointError(f"{self.path}: {what}; the converted checkpoint is damaged; {fix}")

    def _check_file_sizes(self):
        """Finds a missing or truncated file before anything is read, by the sizes recorded
        when it was written (checkpoints written without them are checked as they are read)."""
        sizes = self.marker.get("params_file_sizes", {})
        if not isinstance(sizes, dict):
            raise CheckpointError(f"{self.path / MARKER}: 'params_file_sizes' must be an object")
        for name, size in sizes.items():
            path = self.params / name
            try:
                found = path.stat().st_size
            except FileNotFoundError:
                raise self.damaged(f"its file {path} is missing") from None
            if found != size:
                raise self.damaged(f"its file {path} has {found} bytes, but {size} were written")

    def _validate(self) -> dict[tuple, StoredLeaf]:
        if not (self.params / "_CHECKPOINT_METADATA").is_file():
            raise CheckpointError(f"{self.params}: missing or incomplete Orbax checkpoint; convert the source again")
        try:
            with uninterrupted(), _orbax_logs_kept() as logs:  # orbax swallows even KeyboardInterrupt here
                metadata = _ocp().metadata(self.params).metadata
        except (ValueError, OSError, KeyError) as e:
            raise CheckpointError(f"{self.params}: unreadable Orbax metadata ({e})") from None
        if metadata is None:  # orbax logs why and returns None
            details = [m.split("Error details:")[-1] for m in logs if "Error details:" in m]
            reason = f" ({_short(details[0])})" if details else ""
            raise self.damaged(f"Orbax cannot read the parameters' metadata in {self.params}{reason}")
        stored = _flatten(metadata)
        expected = expected_leaves(self.config)
        by_key = {tuple(str(p) for p in path): path for path in expected}
        for key in stored:
            if key not in by_key:
                raise CheckpointError(f"{self.params}: unexpected parameter '{'/'.join(key)}' for this config")
        leaves = {}
        for key, path in by_key.items():
            kind, shape = expected[path]
            name = "/".join(key)
            if key not in stored:
                raise CheckpointError(f"{self.params}: missing parameter '{name}'")
            meta = stored[key]
            if tuple(meta.shape) != tuple(shape):
                raise CheckpointError(f"{self.params}: parameter '{name}' has shape {list(meta.shape)} but the "
                                      f"config implies {list(shape)}")
            dtype = np.dtype(meta.dtype)
            if (kind == DENSE and dtype not in STORED_FLOAT_DTYPES) or (kind != DENSE and dtype != stored_dtype(kind, None)):
                want = "a float dtype" if kind == DENSE else stored_dtype(kind, None).name
                raise CheckpointError(f"{self.params}: parameter '{name}' has dtype {dtype.name}, expected {want}")
            leaves[path] = StoredLeaf(path, kind, tuple(shape), dtype)
        return leaves

    def restore(self, targets: dict[tuple, object]) -> dict[tuple, object]:
        """Reads the named parameters. A `jax.ShapeDtypeStruct` target is read straight into
        its sharding (each process reads only the shards it holds) and dtype; a numpy array
        target (only its shape and dtype matter) is read into host memory. Reads in flight are
        capped, so the host stages at most a few shards at a time."""
        ocp = _ocp()

        def shard_bytes(target):
            shape = target.sharding.shard_shape(target.shape) if hasattr(target, "sharding") else target.shape
            return int(np.prod(shape, dtype=np.int64)) * 4

        largest_shard = max(shard_bytes(t) for t in targets.values())
        abstract = {path: ocp.PLACEHOLDER for path in self.leaves}
        abstract.update(targets)
        context = ocp.Context()
        context.memory.read_concurrent_bytes = max(1 << 30, 2 * largest_shard)
        try:
            with context, _orbax_logs_kept():
                restored = _flatten(ocp.load(self.params, nest(abstract)))
        except Exception as e:  # orbax wraps some of tensorstore's errors in a plain Exception
            error = _tensorstore_error(e)
            if error is None:
                raise
            message = _short(str(error))
            parameter = _parameter_named_in(message)
            what = f"parameter '{parameter}'" if parameter else f"a parameter in {self.params}"
            raise self.damaged(f"{what} cannot be read ({message})") from None
        return {path: restored[tuple(str(p) for p in path)] for path in targets}

    def read_host(self, paths) -> dict[tuple, np.ndarray]:
        """The named parameters as stored, in host memory (for export)."""
        # np.empty only describes the target: orbax returns a new array and the pages of this
        # one are never touched.
        return self.restore({p: np.empty(self.leaves[p].shape, self.leaves[p].dtype) for p in paths})
