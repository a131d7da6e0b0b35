import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from gptoss_jax import chat as chat_module
from gptoss_jax.chat import Chat
from gptoss_jax.config import GptOssConfig
from gptoss_jax.tokenizer import get_tokenizer

# The chat reads only the model's config; the scripted tests replace the sampler.
MODEL = SimpleNamespace(config=GptOssConfig.preset("tiny"))


def chat_args(**overrides):
    return SimpleNamespace(**(dict(reasoning_effort="low", date="2026-11-23", developer=None, show_analysis=False,
                                   max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, seed=0, python_tool=False,
                                   python_tool_timeout=30.0, python_tool_unsandboxed=False) | overrides))


@pytest.fixture
def scripted_model(monkeypatch):
    """Replaces the sampler with scripted harmony completions and records each turn's prompt."""
    tokenizer = get_tokenizer()
    replies = iter([
        "<|channel|>analysis<|message|>SECRET-THOUGHT<|end|><|start|>assistant<|channel|>final<|message|>"
        "Paris.<|return|>",
        "<|channel|>final<|message|>About 2.1 million<|return|>",
        "<|channel|>final<|message|>cut off mid",
    ])
    prompts = []

    def fake_generate(model, batch, *, max_new_tokens, stop_tokens, on_tokens, **_):
        assert stop_tokens is None  # the harmony assistant stop set
        prompts.append(batch[0])
        tokens = tokenizer.encode(next(replies), allowed_special="all")
        on_tokens([tokens])
        return [tokens]

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    return tokenizer, prompts


def test_turns_keep_answers_and_drop_earlier_analysis(scripted_model, capsys):
    tokenizer, prompts = scripted_model
    chat = Chat(model=MODEL, tokenizer=tokenizer, args=chat_args())
    assert chat.turn("Capital of France?") == "Paris."
    assert chat.turn("Its population?") == "About 2.1 million"
    second_prompt = tokenizer.decode(prompts[1])
    assert "Capital of France?" in second_prompt and "Paris." in second_prompt
    assert "SECRET-THOUGHT" not in second_prompt  # chain of thought of finished turns is dropped
    assert second_prompt.endswith("Its population?<|end|><|start|>assistant")
    assert capsys.readouterr().out == "Paris.\nAbout 2.1 million\n"

    assert chat.turn("And?") == "cut off mid"
    assert "cut off" in capsys.readouterr().err
    assert chat.messages[-1].content == "cut off mid"


def test_commands(scripted_model):
    tokenizer, _ = scripted_model
    chat = Chat(model=MODEL, tokenizer=tokenizer, args=chat_args())
    chat.turn("hello")
    assert chat.command("/effort high") and chat.reasoning_effort == "high"
    assert chat.command("/reset") and chat.messages == []
    assert chat.command("/nonsense")
    assert not chat.command("/quit")


def run_chat(stdin, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "gptoss_jax.chat", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def test_chat_cli_runs_two_turns_on_the_tiny_model():
    result = run_chat("Hello!\n/effort high\nAnd again?\n", "--checkpoint", "tiny", "--max-new-tokens", "40",
                      "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "preset: random weights" in result.stderr and "(reasoning effort: high)" in result.stderr
    assert result.stderr.count("does not follow the harmony format") == 2  # random weights, two answers
    assert len(result.stdout.strip().splitlines()) >= 2


def test_chat_cli_bad_input():
    result = run_chat("", "--top-p", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: top_p must be in (0, 1], got 2.0"]


def test_python_tool_calls_continue_the_turn(monkeypatch):
    tokenizer = get_tokenizer()
    replies = iter([
        "<|channel|>analysis<|message|>Compute.<|end|>"
        "<|start|>assistant<|channel|>analysis to=python code<|message|>print(sum(range(10)))<|call|>",
        "<|channel|>analysis<|message|>It printed 45.<|end|><|start|>assistant<|channel|>final<|message|>45<|return|>",
    ])
    prompts = []

    def fake_generate(model, batch, *, on_tokens, **_):
        prompts.append(batch[0])
        tokens = tokenizer.encode(next(replies), allowed_special="all")
        on_tokens([tokens])
        return [tokens]

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    chat = Chat(model=MODEL, tokenizer=tokenizer, args=chat_args(python_tool=True))
    assert chat.turn("Sum of 0..9?") == "45"
    first, second = (tokenizer.decode(p) for p in prompts)
    assert "## python" in first and "There is no internet access." in first
    assert second.endswith(
        "<|start|>assistant to=python<|channel|>analysis code<|message|>print(sum(range(10)))<|call|>"
        "<|start|>python to=assistant<|channel|>analysis<|message|>45\n<|end|><|start|>assistant"
    )
    assert [m.role for m in chat.messages] == ["user", "assistant", "assistant", "tool", "assistant", "assistant"]


def test_python_tool_refused_where_it_cannot_be_sandboxed(monkeypatch):
    from gptoss_jax import python_tool

    monkeypatch.setattr(python_tool, "namespace_problem", lambda: "the unshare command (util-linux) is not installed")
    with pytest.raises(python_tool.SandboxUnavailable, match="--python-tool-unsandboxed"):
        Chat(model=MODEL, tokenizer=get_tokenizer(), args=chat_args(python_tool=True))


# ----------------------------------------------------------------------- interrupts, limits, end of input
def scripted(monkeypatch, *replies, interrupt_after: int | None = None):
    """chat.generate replaced: each call streams the next reply; with `interrupt_after`, the
    call of that index streams its reply and then raises KeyboardInterrupt, as Ctrl-C in the
    middle of an answer does. Returns the keyword arguments of each call."""
    tokenizer = get_tokenizer()
    replies = iter(replies)
    calls = []

    def fake_generate(model, batch, *, on_tokens, **kwargs):
        calls.append(dict(kwargs, prompt=batch[0]))
        tokens = tokenizer.encode(next(replies), allowed_special="all")
        on_tokens([tokens])
        if interrupt_after == len(calls) - 1:
            raise KeyboardInterrupt
        return [tokens]

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    return calls


def test_ctrl_c_during_an_answer_keeps_the_conversation(monkeypatch, capsys):
    calls = scripted(monkeypatch, "<|channel|>final<|message|>Half an ans",
                     "<|channel|>final<|message|>Whole.<|return|>", interrupt_after=0)
    chat = Chat(model=MODEL, tokenizer=get_tokenizer(), args=chat_args())
    assert chat.turn("Tell me a story") == "Half an ans"
    err = capsys.readouterr().err
    assert "note: answer interrupted (Ctrl-C); the conversation keeps what was said so far" in err
    assert [(m.role, m.content) for m in chat.messages] == [("user", "Tell me a story"), ("assistant", "Half an ans")]
    assert chat.turn("Go on") == "Whole."
    assert "Tell me a story" in get_tokenizer().decode(calls[1]["prompt"])
    assert "Half an ans" in get_tokenizer().decode(calls[1]["prompt"])


def run_chat_main(monkeypatch, capsys, stdin, *argv, tty=False):
    """chat's main in this process, on `stdin` (an object with readline), the model not loaded."""
    monkeypatch.setattr(chat_module, "load_model", lambda args: MODEL)
    stdin.isatty = lambda: tty
    monkeypatch.setattr(sys, "stdin", stdin)
    code = chat_module.main(["--no-compilation-cache", "--temperature", "0", *argv])
    return code, capsys.readouterr()


def test_the_chat_goes_on_after_an_interrupted_answer(monkeypatch, capsys):
    import io

    scripted(monkeypatch, "<|channel|>final<|message|>One", "<|channel|>final<|message|>Two.<|return|>",
             interrupt_after=0)
    code, out = run_chat_main(monkeypatch, capsys, io.StringIO("first\nsecond\n"))
    assert code == 0 and out.out == "One\nTwo.\n", out
    assert "answer interrupted" in out.err and "Traceback" not in out.err


def test_ctrl_c_at_the_prompt_ends_with_status_130(monkeypatch, capsys):
    class Interrupting:
        def readline(self):
            raise KeyboardInterrupt

    code, out = run_chat_main(monkeypatch, capsys, Interrupting(), tty=True)
    assert code == 130
    assert out.err.endswith("> \ninterrupted\n") and "Traceback" not in out.err


def test_ctrl_d_at_the_prompt_ends_the_line(monkeypatch, capsys):
    import io

    code, out = run_chat_main(monkeypatch, capsys, io.StringIO(""), tty=True)
    assert code == 0 and out.err.endswith("> \n")


def test_a_conversation_longer_than_the_models_positions(monkeypatch, capsys):
    """The cache of a turn stops at the model's positions; a conversation that fills them is
    refused with a note, and the chat goes on (after /reset it has room again)."""
    small = SimpleNamespace(config=GptOssConfig.preset("tiny").replace(initial_context_length=100,
                                                                      rope_scaling_factor=1.0))
    calls = scripted(monkeypatch, "<|channel|>final<|message|>Short.<|return|>", "<|channel|>final<|message|>Again.<|return|>")
    chat = Chat(model=small, tokenizer=get_tokenizer(), args=chat_args(max_new_tokens=64))
    assert chat.turn("Hi") == "Short."
    assert calls[0]["max_len"] == 100
    assert chat.turn("word " * 60) == ""
    assert "note: the conversation (1" in capsys.readouterr().err
    assert [m.content for m in chat.messages] == ["Hi", "Short."]  # the message that did not fit is dropped
    chat.command("/reset")
    assert chat.turn("Hi") == "Again."


def test_chat_short_output_that_is_not_harmony_is_shown(monkeypatch, capsys):
    scripted(monkeypatch, "snow snow")  # no harmony header: random weights, cut off early
    chat = Chat(model=MODEL, tokenizer=get_tokenizer(), args=chat_args())
    assert chat.turn("Hi") == "snow snow"
    out = capsys.readouterr()
    assert out.out == "snow snow\n" and "does not follow the harmony format" in out.err


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "200000"], "exceed the model's 131072 positions"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32)"),
])
def test_chat_cli_refuses_numbers_out_of_range(args, message):
    result = run_chat("", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_chat_cli_ctrl_c_mid_answer_goes_on():
    import signal

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "gptoss_jax.chat", "--checkpoint", "tiny", "--max-new-tokens", "100000",
                             "--temperature", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc.stdin.write("Hello!\n")
    proc.stdin.flush()
    line = ""
    while "does not follow the harmony format" not in line:  # answering
        line = proc.stderr.readline()
        assert line, "the chat ended before answering"
    proc.send_signal(signal.SIGINT)
    line = ""
    while "answer interrupted" not in line:
        line = proc.stderr.readline()
        assert line, "the chat ended at the interrupt"
    out, err = proc.communicate("/quit\n", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
