import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from gptoss_jax import chat as chat_module
from gptoss_jax.chat import Chat
from gptoss_jax.tokenizer import get_tokenizer


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
    chat = Chat(model=None, tokenizer=tokenizer, args=chat_args())
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
    chat = Chat(model=None, tokenizer=tokenizer, args=chat_args())
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
    result = run_chat("Hello!\n/effort high\nAnd again?\n", "--max-new-tokens", "40", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "built-in 'tiny' model" in result.stderr and "(reasoning effort: high)" in result.stderr
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
    chat = Chat(model=None, tokenizer=tokenizer, args=chat_args(python_tool=True))
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
        Chat(model=None, tokenizer=get_tokenizer(), args=chat_args(python_tool=True))
