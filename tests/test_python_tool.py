import os
import socket
from pathlib import Path

import openai_harmony as harmony
import pytest

from gptoss_jax import python_tool
from gptoss_jax.chat_format import (
    Conversation,
    Message,
    harmony_encoding,
    parse_completion,
    render_for_completion,
    user,
)
from gptoss_jax.python_tool import PythonTool, SandboxUnavailable, is_python_call
from gptoss_jax.tokenizer import get_tokenizer


def sandbox_problems():
    return [problem for problem in (python_tool.namespace_problem(), python_tool.landlock_problem()) if problem]


@pytest.fixture(scope="module")
def needs_sandbox():
    if sandbox_problems():
        pytest.skip("this machine cannot sandbox the python tool: " + "; ".join(sandbox_problems()))


@pytest.fixture(scope="module")
def tool(needs_sandbox):
    return PythonTool(timeout_seconds=20)


@pytest.fixture
def listener():
    """A TCP socket listening on 127.0.0.1 (its port is listener.getsockname()[1])."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        yield server


CONNECT = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
    print("connected")
except OSError as error:
    print("blocked:", error)
"""


def accepted_a_connection(server) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


# --------------------------------------------------------------------------
# Running code
# --------------------------------------------------------------------------


def test_prints_and_the_value_of_a_final_expression(tool):
    assert tool.run("print('hello')\nx = 6 * 7\nprint(x, 'é', flush=False)\nx + 1") == "hello\n42 é\n43\n"
    assert tool.run("'text'") == "'text'\n"
    assert tool.run("print('x', end='')") == "x"


def test_no_output_gets_a_note(tool):
    assert tool.run("x = 1") == "[no output: print() what you want to see]"
    assert tool.run("None") == "[no output: print() what you want to see]"


def test_exception_traceback_shows_only_the_program(tool):
    output = tool.run("print('before')\ndef f():\n    return 1 / 0\nf()")
    assert output.startswith("before\nTraceback (most recent call last):\n")
    assert '  File "<python>", line 4, in <module>\n    f()\n' in output
    assert '  File "<python>", line 3, in f\n    return 1 / 0\n' in output
    assert output.endswith("ZeroDivisionError: division by zero\n")
    assert "python_tool" not in output


def test_syntax_error(tool):
    output = tool.run("def f(:\n    pass")
    assert output.startswith('  File "<python>", line 1\n    def f(:\n')
    assert output.endswith("SyntaxError: invalid syntax\n")


def test_stdin_is_at_end_of_file(tool):
    assert tool.run("input()").endswith("EOFError: EOF when reading a line\n")


def test_the_parent_environment_is_not_passed(tool, monkeypatch):
    monkeypatch.setenv("GPTOSS_JAX_TEST_SECRET", "s3cret")
    assert tool.run("import os\nprint(os.environ.get('GPTOSS_JAX_TEST_SECRET'))") == "None\n"


def test_each_call_is_a_new_program(tool):
    assert tool.run("x = 41") == "[no output: print() what you want to see]"
    assert tool.run("x + 1").endswith("NameError: name 'x' is not defined\n")


# --------------------------------------------------------------------------
# Limits and isolation
# --------------------------------------------------------------------------


@pytest.mark.usefixtures("needs_sandbox")
def test_limits_are_set_in_the_child():
    limited = PythonTool(timeout_seconds=2.5, memory_mib=300, file_size_mib=3, max_processes=7)
    code = "import resource\nfor name in ('CPU', 'AS', 'FSIZE', 'NPROC', 'CORE'):\n    print(resource.getrlimit(getattr(resource, 'RLIMIT_' + name)))"
    assert limited.run(code).splitlines() == [
        "(4, 4)", f"({300 * 2**20}, {300 * 2**20})", f"({3 * 2**20}, {3 * 2**20})", "(7, 7)", "(0, 0)"
    ]


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(600)"], ids=["busy", "sleeping"])
def test_time_limit_stops_the_program(code):
    output = PythonTool(timeout_seconds=1, allow_unsandboxed=bool(sandbox_problems())).run("print('started')\n" + code)
    assert output == "started\n[python stopped the program at its time limit of 1 s]"


@pytest.mark.parametrize(
    "code", ["x = bytearray(8 * 1024**3)", "chunks = []\nwhile True:\n    chunks.append(bytearray(2**20))"], ids=["at-once", "growing"]
)
def test_memory_limit_stops_the_program(code):
    output = PythonTool(memory_mib=256, allow_unsandboxed=bool(sandbox_problems())).run(code)
    assert "MemoryError" in output
    assert output.endswith("[the program ran out of memory: its limit is 256 MiB]")


@pytest.mark.usefixtures("needs_sandbox")
def test_file_size_limit():
    limited = PythonTool(file_size_mib=1)
    output = limited.run("with open('big.bin', 'wb') as f:\n    f.write(bytes(2 * 2**20))")
    assert "OSError: [Errno 27] File too large" in output


def test_file_writes_stay_in_a_temporary_directory_that_is_deleted(tool, tmp_path):
    outside = tmp_path / "outside.txt"
    code = f"""
import os
open("inside.txt", "w").write("hello")
print(os.getcwd())
print(sorted(os.listdir(".")))
try:
    open({str(outside)!r}, "w").write("escaped")
except PermissionError as error:
    print("refused:", error)
"""
    cwd, listing, refused = tool.run(code).splitlines()
    assert listing == "['inside.txt']"
    assert refused == f"refused: [Errno 13] Permission denied: {str(outside)!r}"
    assert not outside.exists()
    assert Path(cwd).name == "work" and not Path(cwd).parent.exists()


def test_network_is_blocked(tool, listener):
    output = tool.run(CONNECT.format(port=listener.getsockname()[1]))
    assert output.startswith("blocked:")
    assert not accepted_a_connection(listener)


def test_other_processes_are_invisible(tool):
    output = tool.run(f"import os\ntry:\n    os.kill({os.getpid()}, 0)\n    print('visible')\nexcept ProcessLookupError:\n    print('invisible')")
    assert output == "invisible\n"


def test_output_is_cut_to_its_first_and_last_bytes():
    output = PythonTool(max_output_bytes=200, allow_unsandboxed=bool(sandbox_problems())).run("for i in range(100000):\n    print(i)")
    full = "".join(f"{i}\n" for i in range(100000))
    assert output == full[:100] + f"\n[... {len(full) - 200} bytes of output omitted ...]\n" + full[-100:]


# --------------------------------------------------------------------------
# Where the sandbox is unavailable
# --------------------------------------------------------------------------


def test_refuses_to_run_without_network_isolation(monkeypatch, listener):
    monkeypatch.setattr(python_tool, "namespace_problem", lambda: "the unshare command (util-linux) is not installed")
    with pytest.raises(SandboxUnavailable, match=r"cannot run sandboxed .*: the unshare command .* allow_unsandboxed=True"):
        PythonTool()

    unsandboxed = PythonTool(allow_unsandboxed=True)
    assert not unsandboxed.network_blocked
    assert "Internet access is not blocked." in unsandboxed.description()
    # The same connection the sandbox blocks goes through without it.
    assert unsandboxed.run(CONNECT.format(port=listener.getsockname()[1])) == "connected\n"
    assert accepted_a_connection(listener)


def test_refuses_to_run_without_confined_writes(monkeypatch, tmp_path):
    monkeypatch.setattr(python_tool, "landlock_problem", lambda: "Landlock is not available")
    with pytest.raises(SandboxUnavailable, match="Landlock is not available"):
        PythonTool()

    outside = tmp_path / "outside.txt"
    assert PythonTool(allow_unsandboxed=True).run(f"open({str(outside)!r}, 'w').write('escaped')") == "7\n"
    assert outside.read_text() == "escaped"


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"timeout_seconds": 0}, "timeout_seconds must be a positive number"),
        ({"timeout_seconds": float("inf")}, "timeout_seconds must be a positive number"),
        ({"memory_mib": 10}, "memory_mib must be an integer of at least 64"),
        ({"max_output_bytes": "big"}, "max_output_bytes must be an integer"),
        ({"max_processes": True}, "max_processes must be an integer"),
    ],
)
def test_bad_settings(settings, fragment):
    with pytest.raises(ValueError, match=fragment):
        PythonTool(allow_unsandboxed=True, **settings)


def test_code_must_be_text(tool):
    with pytest.raises(ValueError, match="code must be a str, got bytes"):
        tool.run(b"print(1)")


# --------------------------------------------------------------------------
# In a harmony conversation
# --------------------------------------------------------------------------


def test_the_system_message_describes_this_sandbox(tool):
    conversation = Conversation([user("Hi")], builtin_tools=[tool.builtin_tool()])
    text = get_tokenizer().decode(render_for_completion(conversation))
    assert "# Tools\n\n## python\n\n" + tool.description() + "\n\n# Valid channels" in text
    assert "stopped after 20 seconds" in text and "There is no internet access." in text


def test_respond_to_a_parsed_call(tool):
    completion = get_tokenizer().encode(
        "<|channel|>analysis<|message|>Compute it.<|end|>"
        "<|start|>assistant<|channel|>analysis to=python code<|message|>print(sum(range(10)))<|call|>",
        allowed_special="all",
    )
    parsed = parse_completion(completion)
    assert is_python_call(parsed.tool_call)
    answer = tool.respond(parsed.tool_call)
    assert answer == Message("tool", "45\n", channel="analysis", recipient="assistant", name="python")

    conversation = Conversation([user("Sum 0..9"), *parsed.messages, answer], builtin_tools=[tool.builtin_tool()])
    prompt = render_for_completion(conversation)
    text = get_tokenizer().decode(prompt)
    assert text.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Compute it.<|end|>"
        "<|start|>assistant to=python<|channel|>analysis code<|message|>print(sum(range(10)))<|call|>"
        "<|start|>python to=assistant<|channel|>analysis<|message|>45\n<|end|><|start|>assistant"
    )

    python = harmony.ToolNamespaceConfig(name="python", description=tool.description(), tools=[])
    reference = harmony.Conversation.from_messages(
        [
            harmony.Message.from_role_and_content(harmony.Role.SYSTEM, harmony.SystemContent.new().with_tools(python)),
            harmony.Message.from_role_and_content(harmony.Role.USER, "Sum 0..9"),
            harmony.Message.from_role_and_content(harmony.Role.ASSISTANT, "Compute it.").with_channel("analysis"),
            harmony.Message.from_role_and_content(harmony.Role.ASSISTANT, "print(sum(range(10)))")
            .with_channel("analysis")
            .with_recipient("python")
            .with_content_type("code"),
            harmony.Message.from_author_and_content(harmony.Author.new(harmony.Role.TOOL, "python"), "45\n")
            .with_channel("analysis")
            .with_recipient("assistant"),
        ]
    )
    assert prompt == harmony_encoding().render_conversation_for_completion(reference, harmony.Role.ASSISTANT)


def test_respond_takes_only_calls_to_python(tool):
    weather = Message("assistant", "{}", channel="commentary", recipient="functions.get_weather")
    assert not is_python_call(weather) and not is_python_call(None)
    with pytest.raises(ValueError, match="an assistant message addressed to 'python', got 'assistant' to 'functions.get_weather'"):
        tool.respond(weather)
    with pytest.raises(ValueError, match="got 'user' to None"):
        tool.respond(user("print(1)"))
