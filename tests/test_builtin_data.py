"""The built-in model's synthetic task: records render through the harmony format and parse
back, the worked arithmetic is right, and the task's vocabulary covers what it renders."""

import json
import random
import re

import pytest

from gptoss_jax import builtin_data, chat_format
from gptoss_jax.dataset import conversation_from_record
from gptoss_jax.tokenizer import get_tokenizer


def worked(analysis: str) -> int:
    """The number the analysis ends with ("... Answer 42.")."""
    return int(re.search(r"Answer (\d+)\.$", analysis).group(1))


@pytest.mark.parametrize("a,b", [(0, 0), (23, 19), (99, 99), (50, 50), (9, 1), (7, 85)])
def test_addition_is_worked_digit_by_digit(a, b):
    text = builtin_data.addition_analysis(a, b)
    assert worked(text) == a + b
    assert text.startswith(f"{a // 10} {a % 10} + {b // 10} {b % 10}: {a % 10}+{b % 10}={a % 10 + b % 10}")
    assert ("carry 1" in text) == (a % 10 + b % 10 >= 10)
    assert builtin_data.addition_analysis(23, 19) == "2 3 + 1 9: 3+9=12, carry 1; 2+1+1=4. Answer 42."


@pytest.mark.parametrize("a,b", [(0, 0), (52, 17), (99, 0), (40, 39), (58, 17), (10, 10)])
def test_subtraction_is_worked_digit_by_digit(a, b):
    text = builtin_data.subtraction_analysis(a, b)
    assert worked(text) == a - b
    assert ("borrow" in text) == (a % 10 < b % 10)
    assert builtin_data.subtraction_analysis(52, 17) == "5 2 - 1 7: 2<7, borrow: 12-7=5; 5-1-1=3. Answer 35."


def test_every_kind_renders_and_parses_back():
    tokenizer = get_tokenizer()
    rng = random.Random(5)
    for kind in builtin_data.KINDS:
        record = builtin_data.make_record(rng, kind)
        example = builtin_data.example(record)
        prompt_end = int(example.loss_mask.argmax())  # the first generated token
        parsed = chat_format.parse_completion(example.tokens[prompt_end:].tolist())
        channels = [m.channel for m in parsed.messages if m.role == "assistant"]
        assert channels[0] == "analysis" and channels[-1] == "final", (kind, channels)
        assert parsed.messages[-1].content == record["messages"][-1]["content"]
        assert "Reasoning: " + record["reasoning_effort"] in tokenizer.decode(example.tokens.tolist())


def test_weather_records_call_the_tool_with_the_city_and_answer_from_its_result():
    record = builtin_data.make_record(random.Random(1), "weather")
    conversation = conversation_from_record(record)
    assert [t.name for t in conversation.tools] == ["get_weather"]
    call, result, final = conversation.messages[2], conversation.messages[3], conversation.messages[4]
    city = call.tool_arguments()["city"]
    assert call.recipient == "functions.get_weather" and city in conversation.messages[0].content
    report = json.loads(result.content)
    assert report["city"] == city and f"{report['temperature_c']}°C" in final.content and report["condition"] in final.content


def test_records_are_seeded_and_leave_out_the_held_out_questions():
    held_out = builtin_data.held_out_arithmetic(50)
    assert len(held_out) == 50 and all(kind != "subtract" or a >= b for kind, a, b in held_out)
    records = builtin_data.records(400, seed=3, exclude=frozenset(held_out))
    assert records == builtin_data.records(400, seed=3, exclude=frozenset(held_out))
    finals = {r["messages"][-1]["content"] for r in records}  # "23 + 19 = 42" whatever the question's words
    assert sum(f.endswith(f" = {int(f.split()[0]) + int(f.split()[2])}") for f in finals if " + " in f) > 50
    for kind, a, b in held_out:
        assert not any(f.startswith(f"{a} {'+' if kind == 'add' else '-'} {b} = ") for f in finals)
    with pytest.raises(ValueError, match="unknown record kind 'poem'"):
        builtin_data.make_record(random.Random(0), "poem")


def test_the_vocabulary_covers_the_rendered_task_and_the_cli_prompt():
    vocabulary = set(builtin_data.vocabulary_tokens())
    assert 300 < len(vocabulary) < 1000
    for record in builtin_data.records(300, seed=11):
        assert set(builtin_data.example(record).tokens.tolist()) <= vocabulary
    for effort, date in zip(builtin_data.REASONING_EFFORTS, (None, "2026-12-07", "2031-02-28")):
        conversation = chat_format.Conversation([chat_format.user("What is 23 + 19?")], reasoning_effort=effort,
                                                current_date=date)
        assert set(chat_format.render_for_completion(conversation)) <= vocabulary
    assert set(chat_format.assistant_stop_tokens()) <= vocabulary
