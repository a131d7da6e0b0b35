"""Reading and writing safetensors files with validation and without loading whole files:
tensors are memory-mapped on read and streamed one at a time on write."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or disagrees with the model config."""


def read_json(path: str | Path):
    """A JSON file's value; a CheckpointError naming the file if it is missing, not UTF-8
    (as JSON files must be) or not JSON."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file does not exist") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it "
                              f"as UTF-8 or fetch it again") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class SafetensorsFile:
    """One safetensors file: a validated header and memory-mapped tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self.error(f"is too short to be safetensors ({size} bytes)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise self.error(f"has a corrupt header (declared length {header_len} bytes, file {size} bytes)")
                header_bytes = f.read(header_len)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file does not exist") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a directory, expected a .safetensors file") from None
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.error(f"has a corrupt header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise self.error("has a corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self.error(f"has a corrupt header entry for tensor '{name}': {entry!r}") from None
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise self.error(f"tensor '{name}' spans {end - begin} bytes but {entry['dtype']}{list(shape)} "
                                 f"needs {expected}")
            if end > data_size:
                raise self.error(f"is truncated: tensor '{name}' ends at byte {self.data_start + end} "
                                 f"but the file has {size} bytes")
            self.entries[name] = (dtype, shape, begin, end)

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype_name(self, name: str) -> str:
        return DTYPE_NAMES[self.entries[name][0]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (no copy)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read_bytes(self, name: str, start: int, stop: int) -> np.ndarray:
        """Bytes [start, stop) of a tensor's data, read into a new array (no memory map, so
        nothing stays mapped into the process once the caller drops the array)."""
        _, _, begin, end = self.entries[name]
        if not 0 <= start <= stop <= end - begin:
            raise ValueError(f"byte range [{start}, {stop}) is outside tensor '{name}' ({end - begin} bytes)")
        out = np.empty(stop - start, np.uint8)
        view, offset = memoryview(out), self.data_start + begin + start
        with open(self.path, "rb", buffering=0) as f:
            while view.nbytes:
                n = os.preadv(f.fileno(), [view], offset)
                if n == 0:
                    raise self.error(f"is truncated: tensor '{name}' ends past the end of the file")
                view, offset = view[n:], offset + n
        return out


def write_safetensors(path: str | Path, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors one at a time: `specs` fixes the header up front, `produce(name)` is
    called once per tensor, in order, and must return exactly that shape and dtype."""
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(produce(name))
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"tensor '{name}' came out as {array.dtype}{list(array.shape)}, "
                                 f"expected {np.dtype(dtype)}{list(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            del array  # before producing the next tensor
        f.flush()
        os.fsync(f.fileno())
