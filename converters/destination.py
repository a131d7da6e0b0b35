"""Where conversions and saves write: a destination folder that appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from gptoss_jax.converters.interrupts import uninterrupted

SPACE_MARGIN = 64 << 20


class ConversionError(ValueError):
    """The conversion cannot go ahead (destination, disk space, a failed write)."""


# --------------------------------------------------------------------------- destination
def check_destination(src: Path, dst: Path, force: bool):
    src, dst = src.resolve(), dst.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ConversionError(f"{dst}: the destination must not be, contain or lie inside the source {src}")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise ConversionError(f"{dst}: already exists; pass --force to replace it or choose another DST")
        if not dst.is_dir():
            raise ConversionError(f"{dst}: exists and is not a directory; remove it or choose another DST")


def check_free_space(dst: Path, needed: int):
    parent = _existing_parent(dst)
    free = shutil.disk_usage(parent).free
    if free < needed + SPACE_MARGIN:
        raise ConversionError(f"{dst}: needs {(needed + SPACE_MARGIN) / 2**30:.2f} GiB ({needed / 2**30:.2f} GiB of "
                              f"data and a {SPACE_MARGIN / 2**30:.2f} GiB margin) but {parent} has "
                              f"{free / 2**30:.2f} GiB free; free some space or choose another DST")


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def atomic_directory(dst: Path, *, force: bool = False):
    """Yields an empty temporary sibling of `dst`, `DST.incomplete-PID-TAG`; renames it to
    `dst` when the block ends normally (replacing an existing `dst` only with `force`) and
    deletes it otherwise. Temporary siblings of `dst` whose process has ended (killed before
    it could delete its own) are deleted first."""
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise ConversionError(f"{dst}: already exists; pass --force to replace it or choose another DST")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(dst)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.with_name(f"{dst.name}.incomplete-{tag}")
    try:
        tmp.mkdir()
        yield tmp
        with uninterrupted(deliver=False):  # the work is done; a signal now must not split the renames
            if dst.exists():
                old = dst.with_name(f"{dst.name}.replaced-{tag}")
                dst.rename(old)
                tmp.rename(dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dst)
    except BaseException:
        _remove_tree(tmp)
        raise


def _remove_abandoned_temporaries(dst: Path):
    pattern = re.compile(rf"{re.escape(dst.name)}\.incomplete-(\d+)-[0-9a-f]{{8}}")
    for path in dst.parent.iterdir():
        found = pattern.fullmatch(path.name)
        if found and not _process_exists(int(found.group(1))):
            _remove_tree(path, settle=0)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _remove_tree(path: Path, settle: float = 1.0):
    """Deletes `path`, and again if it reappears within `settle` seconds: after a failed
    save, tensorstore may still finish a metadata write that it had already started."""
    deadline = time.monotonic() + settle
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
