"""The built-in model (gptoss_jax.builtin): the shipped weights answer held-out arithmetic with
an analysis then a final message, call the weather tool and answer from its result, leave
next to no probability to tokens outside the task; the package file is small; a short run
of the training command gives a model that loads."""

import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax import builtin, builtin_data, chat_format
from gptoss_jax.chat_format import Conversation, FunctionTool, parse_completion, tool_result, user

# Measured on the 200 held-out questions (docs/finetuning.md): addition 94 of 95, subtraction 86 of 105.
ADDITION_BAR, SUBTRACTION_BAR = 0.95, 0.75


@pytest.fixture(scope="module")
def model():
    return gptoss_jax.load(None)


def test_the_built_in_model_is_a_full_vocabulary_gpt_oss_with_mxfp4_experts(model):
    c = model.config
    assert c.name == "builtin" and c.vocab_size == 201088
    assert c.layer_types[:2] == ("sliding_attention", "full_attention") and c.experts_per_token < c.num_experts
    assert model.blocks[0].mlp.mlp1_fp4.dtype == jax.numpy.float4_e2m1fn
    assert model.blocks[0].attn.sinks.shape == (c.num_attention_heads,)


def test_package_file_is_small_and_packaged():
    path = builtin.builtin_package_path()
    assert path.is_file() and path.stat().st_size < 4e6
    meta, arrays, tokens = builtin.read_builtin_package(path)
    assert arrays["embedding"].shape[0] == len(tokens) + 1 and meta["summary"]["final_loss"] < 0.5
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"gptoss_jax.data" = ["*.gz", "*.npz"]' in text


def test_held_out_arithmetic_is_answered_with_analysis_then_final(model):
    items = builtin_data.held_out_arithmetic(200)[::4]  # 50 questions training never saw
    _, results = builtin.arithmetic_accuracy(model, items)
    for kind, bar in (("add", ADDITION_BAR), ("subtract", SUBTRACTION_BAR)):
        mine = [(item, final, ok) for item, final, ok in results if item[0] == kind]
        wrong = [(item, final) for item, final, ok in mine if not ok]
        assert 1 - len(wrong) / len(mine) >= bar, wrong


def test_a_weather_question_calls_the_tool_and_the_answer_uses_its_result(model):
    tool = FunctionTool.from_dict(builtin_data.WEATHER_TOOL)
    conversation = Conversation([user("What is the weather in Tokyo?")], tools=[tool], reasoning_effort="low")
    (tokens,) = builtin.complete(model, [conversation])
    parsed = parse_completion(tokens)
    call = parsed.messages[-1]
    assert call.recipient == "functions.get_weather" and call.channel == "commentary"
    assert call.tool_arguments() == {"city": "Tokyo"}
    report = {"city": "Tokyo", "temperature_c": 27, "condition": "rainy"}
    conversation = Conversation([*conversation.messages, *parsed.messages, tool_result(call.recipient, report)],
                                tools=[tool], reasoning_effort="low")
    (tokens,) = builtin.complete(model, [conversation])
    final = parse_completion(tokens).messages[-1]
    assert final.channel == "final" and "27°C" in final.content and "rainy" in final.content


def test_tokens_outside_the_task_get_almost_no_probability(model):
    used = np.zeros(model.config.vocab_size, bool)
    used[builtin.read_builtin_package()[2]] = True
    rng = random.Random(7)
    conversations = [Conversation([user(builtin_data.question(*item))], reasoning_effort=rng.choice(["low", "high"]))
                     for item in builtin_data.held_out_arithmetic(200)[:4]]
    conversations.append(Conversation([user("Why is the sky blue?")]))
    masses = []
    for conversation, generated in zip(conversations, builtin.complete(model, conversations)):
        tokens = chat_format.render_for_completion(conversation) + generated
        logits, _ = model.forward(np.asarray([tokens], np.int32), np.arange(len(tokens))[None], None)
        probs = jax.nn.softmax(np.asarray(logits[0, -len(generated) - 1:-1], np.float32), axis=-1)
        unused_mass = np.asarray(probs)[:, ~used].sum(axis=-1)
        masses.append(unused_mass)
    masses = np.concatenate(masses)
    assert masses.max() < 2e-3 and masses.mean() < 2e-4, (masses.max(), masses.mean())


def test_a_short_training_run_writes_a_model_that_loads(tmp_path):
    settings = ["--steps", "4", "--examples", "40", "--batch-size", "2", "--warmup-steps", "1",
                "--quantization-aware-fraction", "0.5"]
    assert builtin.main(["--train", str(tmp_path), *settings]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    loaded = builtin.load_builtin(path=tmp_path / builtin.PACKAGE_FILE)
    assert loaded.config == builtin.config()
    tokens = chat_format.render_for_completion(Conversation([user("What is 1 + 2?")]))
    logits, _ = loaded.forward(np.asarray([tokens], np.int32), np.arange(len(tokens))[None], None)
    assert np.isfinite(np.asarray(logits, np.float32)).all()


def test_a_damaged_package_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "builtin.npz"
    np.savez(bad, __meta__=np.frombuffer(b'{"format": "other"}', np.uint8), __tokens__=np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="not a built-in model file"):
        builtin.load_builtin(path=bad)
    with pytest.raises(ValueError, match="missing; reinstall gptoss-jax"):
        builtin.load_builtin(path=tmp_path / "absent.npz")
