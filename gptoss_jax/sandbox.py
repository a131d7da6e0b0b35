"""The sandboxed side of the python tool (gptoss_jax/python_tool.py): run as a script in a
child process, it applies the resource limits and the Landlock write confinement, then runs
the model's program like a notebook cell. It imports only the standard library, so the child
starts fast; the parent imports it for the checks of what this machine supports.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import json
import linecache
import os
import resource
import shutil
import subprocess
import sys
import traceback
import types
from pathlib import Path

PROGRAM_NAME = "<python>"  # the file name tracebacks show for the model's code
UNSHARE_OPTIONS = ["--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]


@functools.cache
def namespace_problem() -> str | None:
    """Why the child cannot run in new user, network and PID namespaces here, or None."""
    if sys.platform != "linux":
        return f"blocking the network needs Linux namespaces, and this is {sys.platform}"
    unshare = shutil.which("unshare")
    if unshare is None:
        return "the unshare command (util-linux) is not installed, so the network cannot be blocked"
    try:
        completed = subprocess.run(
            [unshare, *UNSHARE_OPTIONS, "true"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`unshare {' '.join(UNSHARE_OPTIONS)} true` failed ({error}), so the network cannot be blocked"
    if completed.returncode != 0:
        reason = completed.stderr.strip() or f"exit status {completed.returncode}"
        return (
            f"`unshare {' '.join(UNSHARE_OPTIONS)} true` failed ({reason}), so the network cannot be blocked; "
            "unprivileged user namespaces may be disabled (sysctl user.max_user_namespaces, "
            "kernel.unprivileged_userns_clone or kernel.apparmor_restrict_unprivileged_userns)"
        )
    return None


# --------------------------------------------------------------------------
# Landlock: only the working directory (and /dev/null) may be changed
# --------------------------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_ACCESS_WRITE_FILE = 1 << 1
_ACCESS_TRUNCATE = 1 << 14  # Landlock ABI 3
_ACCESS_REFER = 1 << 13  # ABI 2: renaming and linking across directories
# ABI 1: write a file, remove a directory or file, make a char device, directory, regular file,
# socket, fifo, block device or symlink.
_WRITE_ACCESS_ABI_1 = _ACCESS_WRITE_FILE | sum(1 << bit for bit in range(4, 13))


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(number: int, *arguments) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(ctypes.c_long(number), *arguments)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


def _landlock_abi() -> int:
    if sys.platform != "linux":
        return 0
    try:
        return _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_long(0), ctypes.c_long(_LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return 0


@functools.cache
def landlock_problem() -> str | None:
    """Why file writes cannot be confined to the working directory here, or None."""
    if _landlock_abi() < 1:
        return (
            "Landlock (Linux 5.13 or newer, with landlock in the kernel's lsm= list) is not available, "
            "so file writes cannot be confined to the working directory"
        )
    return None


def _confine_writes(directory: str) -> None:
    """Allows creating, changing and removing files only under `directory` and writing to /dev/null."""
    abi = _landlock_abi()
    handled = _WRITE_ACCESS_ABI_1 | (_ACCESS_REFER if abi >= 2 else 0) | (_ACCESS_TRUNCATE if abi >= 3 else 0)
    ruleset = _RulesetAttr(handled)
    ruleset_fd = _syscall(
        _SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(ruleset), ctypes.c_long(ctypes.sizeof(ruleset)), ctypes.c_long(0)
    )
    for path, allowed in ((directory, handled), ("/dev/null", handled & (_ACCESS_WRITE_FILE | _ACCESS_TRUNCATE))):
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneathAttr(allowed, path_fd)
        _syscall(
            _SYS_LANDLOCK_ADD_RULE,
            ctypes.c_long(ruleset_fd),
            ctypes.c_long(_LANDLOCK_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_long(0),
        )
        os.close(path_fd)
    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_long(ruleset_fd), ctypes.c_long(0))
    os.close(ruleset_fd)


# --------------------------------------------------------------------------
# The sandboxed child: this file run as a script
# --------------------------------------------------------------------------


def _set_limit(limit: int, value: int) -> None:
    hard = resource.getrlimit(limit)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(limit, (value, value))


def _sandboxed_main(settings: dict) -> None:
    # At the CPU hard limit the kernel sends SIGKILL (soft = hard: no SIGXCPU first).
    _set_limit(resource.RLIMIT_CPU, settings["cpu_seconds"])
    _set_limit(resource.RLIMIT_AS, settings["memory_bytes"])
    _set_limit(resource.RLIMIT_FSIZE, settings["file_size_bytes"])
    _set_limit(resource.RLIMIT_CORE, 0)
    if settings["max_processes"] is not None:
        _set_limit(resource.RLIMIT_NPROC, settings["max_processes"])
    if settings["confine_writes"]:
        _confine_writes(settings["work_dir"])
    _run_program(Path(settings["program"]).read_text(encoding="utf-8"))


def _run_program(source: str) -> None:
    """Runs `source` as ``__main__`` and prints the value of a final expression
    like a notebook cell. An uncaught exception prints its traceback without
    this function's frame and exits with status 1."""
    try:
        tree = ast.parse(source, PROGRAM_NAME)
    except (SyntaxError, ValueError) as error:  # ValueError: null bytes
        traceback.print_exception(type(error), error, None)
        sys.exit(1)
    final_expression = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        final_expression = ast.Expression(tree.body.pop().value)
    linecache.cache[PROGRAM_NAME] = (len(source), None, source.splitlines(keepends=True), PROGRAM_NAME)
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    try:
        exec(compile(tree, PROGRAM_NAME, "exec"), main.__dict__)
        if final_expression is not None:
            value = eval(compile(final_expression, PROGRAM_NAME, "eval"), main.__dict__)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except BaseException as error:
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        sys.exit(1)


if __name__ == "__main__":
    _sandboxed_main(json.loads(sys.argv[1]))
