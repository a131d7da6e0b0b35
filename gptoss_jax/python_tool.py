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

The child process runs gptoss_jax/sandbox.py, which applies the limits and runs the code.
"""

from __future__ import annotations

import contextlib
import json
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
from dataclasses import dataclass
from pathlib import Path

from gptoss_jax import sandbox
from gptoss_jax.chat_format import BuiltinTool, Message
from gptoss_jax.sandbox import landlock_problem, namespace_problem

TOOL_NAME = "python"
_MIB = 1 << 20
_AFTER_KILL_SECONDS = 5.0  # how long to collect the last output once the program is killed


class SandboxUnavailable(OSError):
    """The network cannot be blocked or file writes cannot be confined on this machine."""


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
        problems = [problem for problem in (namespace_problem(), landlock_problem()) if problem]
        if problems and not self.allow_unsandboxed:
            raise SandboxUnavailable(
                "the python tool cannot run sandboxed on this machine: " + "; ".join(problems) + ". "
                "Accept running without this protection with allow_unsandboxed=True."
            )

    @property
    def network_blocked(self) -> bool:
        return namespace_problem() is None

    @property
    def writes_confined(self) -> bool:
        return landlock_problem() is None

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
            command = [sys.executable, "-I", "-u", "-X", "utf8", os.path.abspath(sandbox.__file__), json.dumps(settings)]
            if self.network_blocked:
                command = [shutil.which("unshare"), *sandbox.UNSHARE_OPTIONS, "--", *command]
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
        if not is_python_call(call):
            raise ValueError(
                f"PythonTool.respond takes an assistant message addressed to {TOOL_NAME!r}, "
                f"got {getattr(call, 'role', call)!r} to {getattr(call, 'recipient', None)!r}."
            )
        return Message("tool", self.run(call.content), channel=call.channel, recipient="assistant", name=TOOL_NAME)


def is_python_call(message: Message | None) -> bool:
    """Whether `message` is an assistant message addressed to the python tool."""
    return message is not None and message.role == "assistant" and message.recipient == TOOL_NAME

