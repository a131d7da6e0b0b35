"""An optional, sandboxed ``python`` tool for gpt-oss chats.

gpt-oss was trained to send Python code to a ``python`` tool while it reasons
(``<|start|>assistant<|channel|>analysis to=python code<|message|>...<|call|>``)
and to read what the code printed in the tool's answer
(``<|start|>python to=assistant<|channel|>analysis<|message|>...<|end|>``).
``PythonTool.run`` executes such code in a child process of the current
interpreter:

- limits (``resource.setrlimit``): CPU time, address space, file size, number
  of processes, no core files; plus a wall-clock timeout;
- no network: the child runs in new user, network and PID namespaces
  (``unshare``): its only network interface is a loopback that is down, it
  cannot see or signal other processes, and all its processes die with it;
- file writes confined to a temporary working directory (Landlock), which is
  deleted afterwards; reading files stays allowed;
- stdin at end of file, an environment without the parent's variables,
  stdout and stderr captured together and cut to a size limit.

Where the namespaces or Landlock are unavailable, ``PythonTool()`` raises
``SandboxUnavailable`` (an ``OSError``) saying what is missing, unless the caller accepts
running without them (``allow_unsandboxed=True``). The process limit is not
enforced for root.

Each call is a new program: nothing is kept between calls. As in a notebook
cell, the value of a final expression is printed. Use::

    tool = PythonTool()
    conversation = Conversation(..., builtin_tools=[tool.builtin_tool()])
    completion = parse_completion(sampled_tokens)
    conversation.messages.extend(completion.messages)
    if is_python_call(completion.tool_call):
        conversation.messages.append(tool.respond(completion.tool_call))
        # render_for_completion(conversation) again: the model reads the output and goes on

This file is also the script the sandboxed child runs, so it imports only the
standard library at the top; ``chat_format`` is imported where it is used.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import functools
import json
import linecache
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gptoss_jax.chat_format import BuiltinTool, Message

TOOL_NAME = "python"
PROGRAM_NAME = "<python>"  # the file name tracebacks show for the model's code
_UNSHARE_OPTIONS = ["--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]
_MIB = 1 << 20
_AFTER_KILL_SECONDS = 5.0  # how long to collect the last output once the program is killed


class SandboxUnavailable(OSError):
    """The network cannot be blocked or file writes cannot be confined on this machine."""


@functools.cache
def _namespace_problem() -> str | None:
    """Why the child cannot run in new user, network and PID namespaces here, or None."""
    if sys.platform != "linux":
        return f"blocking the network needs Linux namespaces, and this is {sys.platform}"
    unshare = shutil.which("unshare")
    if unshare is None:
        return "the unshare command (util-linux) is not installed, so the network cannot be blocked"
    try:
        completed = subprocess.run(
            [unshare, *_UNSHARE_OPTIONS, "true"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`unshare {' '.join(_UNSHARE_OPTIONS)} true` failed ({error}), so the network cannot be blocked"
    if completed.returncode != 0:
        reason = completed.stderr.strip() or f"exit status {completed.returncode}"
        return (
            f"`unshare {' '.join(_UNSHARE_OPTIONS)} true` failed ({reason}), so the network cannot be blocked; "
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
def _landlock_problem() -> str | None:
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


# --------------------------------------------------------------------------
# The parent: start the child, collect its output, report
# --------------------------------------------------------------------------


class _HeadAndTail:
    """Keeps the first and the last bytes of a stream, up to `limit` in all."""

    def __init__(self, limit: int):
        self.head_limit, self.tail_limit = limit - limit // 2, limit // 2
        self.head, self.tail = bytearray(), bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        self.head += chunk[:room]
        self.tail += chunk[room:]
        if len(self.tail) > self.tail_limit:
            del self.tail[: len(self.tail) - self.tail_limit]

    def text(self) -> str:
        omitted = self.total - len(self.head) - len(self.tail)
        if omitted == 0:
            return (self.head + self.tail).decode("utf-8", "replace")
        return (
            self.head.decode("utf-8", "replace")
            + f"\n[... {omitted} bytes of output omitted ...]\n"
            + self.tail.decode("utf-8", "replace")
        )


def _read_until(stream, deadline: float, output: _HeadAndTail) -> bool:
    """Reads `stream` into `output` until end of file (True) or `deadline` (False)."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if selector.select(remaining):
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    return True
                output.add(chunk)


def _cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_captured(
    command: list[str], work_dir: Path, timeout: float, output: _HeadAndTail
) -> tuple[int, bool, float]:
    """Runs `command` with stdout and stderr into `output`; returns its exit
    status, whether it timed out, and the CPU seconds its processes used."""
    environment = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(work_dir),
        "TMPDIR": str(work_dir),
        "LANG": "C.UTF-8",
        # One thread per math library: the process limit counts threads.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    cpu_before = _cpu_seconds_of_children()
    process = subprocess.Popen(
        command,
        cwd=work_dir,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    timed_out = True
    try:
        if _read_until(process.stdout, deadline, output):
            process.wait(timeout=max(deadline - time.monotonic(), 0))
            timed_out = False
    except subprocess.TimeoutExpired:
        pass
    finally:
        if timed_out:  # or interrupted
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            _read_until(process.stdout, time.monotonic() + _AFTER_KILL_SECONDS, output)
            process.wait()
        process.stdout.close()
    return process.returncode, timed_out, _cpu_seconds_of_children() - cpu_before


@dataclass(frozen=True)
class PythonTool:
    """Runs the model's Python code in a sandbox (see the module docstring).

    ``timeout_seconds``: wall-clock limit; the CPU-time limit of each
    process is one second more, so it stops first only a process whose
    threads keep several cores busy. ``memory_mib``: address-space limit.
    ``file_size_mib``: largest file the code may write. ``max_processes``:
    processes and threads. ``max_output_bytes``: the output kept (its first
    and last halves) when the code prints more. ``allow_unsandboxed``: run
    even where the network cannot be blocked or file writes cannot be
    confined (then the code can reach the network, or write wherever this
    user can); otherwise ``SandboxUnavailable`` is raised.
    """

    timeout_seconds: float = 30.0
    memory_mib: int = 2048
    file_size_mib: int = 64
    max_processes: int = 64
    max_output_bytes: int = 16_000
    allow_unsandboxed: bool = False

    def __post_init__(self):
        if not isinstance(self.timeout_seconds, (int, float)) or not 0 < self.timeout_seconds < math.inf:
            raise ValueError(f"timeout_seconds must be a positive number, got {self.timeout_seconds!r}.")
        for name, minimum in (("memory_mib", 64), ("file_size_mib", 1), ("max_processes", 1), ("max_output_bytes", 64)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}.")
        problems = [problem for problem in (_namespace_problem(), _landlock_problem()) if problem]
        if problems and not self.allow_unsandboxed:
            raise SandboxUnavailable(
                "the python tool cannot run sandboxed on this machine: " + "; ".join(problems) + ". "
                "Accept running without this protection with allow_unsandboxed=True."
            )

    @property
    def network_blocked(self) -> bool:
        return _namespace_problem() is None

    @property
    def writes_confined(self) -> bool:
        return _landlock_problem() is None

    def description(self) -> str:
        """The python tool's description for the system message, stating this sandbox's limits."""
        network = "There is no internet access." if self.network_blocked else "Internet access is not blocked."
        return (
            "Use this tool to run Python code while you reason. The code and its output are not shown to the user.\n\n"
            "Each message you send to python runs as a new program in a fresh process: nothing is kept between "
            "calls, so include every import and definition each time. python answers with what the program "
            "printed to stdout and stderr, and the value of a final expression as in a notebook. "
            f"The program is stopped after {self.timeout_seconds:g} seconds, and it may use {self.memory_mib} MiB "
            f"of memory. {network} Files it writes are deleted when it ends."
        )

    def builtin_tool(self) -> BuiltinTool:
        """The ``python`` entry for ``Conversation.builtin_tools``, with ``description()``."""
        from gptoss_jax.chat_format import BuiltinTool

        return BuiltinTool(TOOL_NAME, self.description())

    def run(self, code: str) -> str:
        """Runs `code` and returns the text for the tool message: what it printed
        (stdout and stderr as they interleave), then a note in brackets if it
        was stopped, ran out of memory or printed nothing."""
        if not isinstance(code, str):
            raise ValueError(f"code must be a str, got {type(code).__name__}.")
        output = _HeadAndTail(self.max_output_bytes)
        with tempfile.TemporaryDirectory(prefix="gptoss_jax-python-") as root:
            work_dir = Path(root, "work")
            work_dir.mkdir()
            program = Path(root, "program.py")
            program.write_text(code, encoding="utf-8")
            settings = {
                "program": str(program),
                "work_dir": str(work_dir),
                "cpu_seconds": self._cpu_limit(),
                "memory_bytes": self.memory_mib * _MIB,
                "file_size_bytes": self.file_size_mib * _MIB,
                # Outside a user namespace the process limit would count all of this user's processes.
                "max_processes": self.max_processes if self.network_blocked else None,
                "confine_writes": self.writes_confined,
            }
            command = [sys.executable, "-I", "-u", "-X", "utf8", os.path.abspath(__file__), json.dumps(settings)]
            if self.network_blocked:
                command = [shutil.which("unshare"), *_UNSHARE_OPTIONS, "--", *command]
            status, timed_out, cpu_seconds = _run_captured(command, work_dir, self.timeout_seconds, output)
        return self._report(output.text(), status, timed_out, cpu_seconds)

    def _cpu_limit(self) -> int:
        return math.ceil(self.timeout_seconds) + 1

    def _report(self, text: str, status: int, timed_out: bool, cpu_seconds: float) -> str:
        notes = []
        cpu_limit = self._cpu_limit()
        if timed_out:
            notes.append(f"[python stopped the program at its time limit of {self.timeout_seconds:g} s]")
        elif status == -signal.SIGKILL and cpu_seconds >= 0.9 * cpu_limit:  # the kernel's CPU-limit kill
            notes.append(f"[python stopped the program at its CPU time limit of {cpu_limit} s]")
        elif status < 0:
            notes.append(f"[the program was killed by {signal.Signals(-status).name}]")
        lines = text.rstrip().splitlines()
        if lines and lines[-1].startswith("MemoryError"):
            notes.append(f"[the program ran out of memory: its limit is {self.memory_mib} MiB]")
        if not text and not notes:
            notes.append("[no output: print() what you want to see]")
        if text and not text.endswith("\n") and notes:
            text += "\n"
        return text + "\n".join(notes)

    def respond(self, call: Message) -> Message:
        """Runs the code of an assistant message addressed to ``python`` and
        returns the tool message to append to the conversation: author
        ``python``, addressed to the assistant, on the call's channel."""
        from gptoss_jax.chat_format import Message

        if not is_python_call(call):
            raise ValueError(
                f"PythonTool.respond takes an assistant message addressed to {TOOL_NAME!r}, "
                f"got {getattr(call, 'role', call)!r} to {getattr(call, 'recipient', None)!r}."
            )
        return Message("tool", self.run(call.content), channel=call.channel, recipient="assistant", name=TOOL_NAME)


def is_python_call(message: Message | None) -> bool:
    """Whether `message` is an assistant message addressed to the python tool."""
    return message is not None and message.role == "assistant" and message.recipient == TOOL_NAME


if __name__ == "__main__":
    _sandboxed_main(json.loads(sys.argv[1]))
