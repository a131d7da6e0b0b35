"""Training data (gptoss_jax.dataset): JSONL records onto the harmony format, loss masks,
packing with segment ids or padding, deterministic batches, and bad records."""

import json

import numpy as np
import pytest

from gptoss_jax import chat_format as cf
from gptoss_jax.dataset import Batches, DataError, conversation_from_record, example_from_record, read_dataset
from gptoss_jax.kernels.common import NO_POSITION
from gptoss_jax.tokenizer import get_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL_RECORD = {
    "developer": "Answer briefly.",
    "reasoning_effort": "high",
    "tools": [{"name": "get_weather", "description": "Current weather in a city.", "parameters": WEATHER}],
    "messages": [
        {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "channel": "analysis", "content": "Need the weather tool."},
        {"role": "assistant", "channel": "commentary", "recipient": "functions.get_weather", "content_type": "json",
         "content": "{\"city\": \"Paris\"}"},
        {"role": "tool", "name": "functions.get_weather", "content": "{\"temp_c\": 21}"},
        {"role": "assistant", "channel": "analysis", "content": "21 C."},
        {"role": "assistant", "channel": "final", "content": "It is 21 C in Paris."},
    ],
}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def qa(question, reasoning, answer):
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "channel": "analysis", "content": reasoning},
                         {"role": "assistant", "content": answer}]}


def test_a_record_maps_onto_the_chat_format():
    conversation = conversation_from_record(TOOL_RECORD)
    want = cf.Conversation(
        [cf.user("Weather in Paris?"), cf.assistant("Need the weather tool.", "analysis"),
         cf.tool_call("functions.get_weather", {"city": "Paris"}),
         cf.tool_result("functions.get_weather", {"temp_c": 21}), cf.assistant("21 C.", "analysis"),
         cf.assistant("It is 21 C in Paris.")],
        reasoning_effort="high", developer_instructions="Answer briefly.\n\nUse metric units.",
        tools=[cf.FunctionTool("get_weather", "Current weather in a city.", WEATHER)])
    assert conversation == want
    assert cf.render_for_training(conversation).tokens == cf.render_for_training(want).tokens


def test_a_record_may_set_the_current_date():
    record = qa("Q?", "R.", "A") | {"current_date": "2025-06-28"}
    conversation = conversation_from_record(record)
    assert conversation.current_date == "2025-06-28"
    assert "Current date: 2025-06-28" in get_tokenizer().decode(example_from_record(record).tokens.tolist())


def test_the_loss_falls_on_what_the_model_generates():
    decode = get_tokenizer().decode
    example = example_from_record(TOOL_RECORD)
    trained = decode([int(t) for t, m in zip(example.tokens, example.loss_mask) if m])
    untrained = decode([int(t) for t, m in zip(example.tokens, example.loss_mask) if not m])
    for text in ("Need the weather tool.", '{"city": "Paris"}', "21 C.", "It is 21 C in Paris.<|return|>"):
        assert text in trained
    for text in ("Weather in Paris?", "temp_c", "Answer briefly", "Use metric units"):
        assert text in untrained and text not in trained


def test_earlier_analysis_is_dropped_unless_kept():
    record = {"messages": qa("One?", "Think one.", "1")["messages"] + qa("Two?", "Think two.", "2")["messages"]}
    decode = get_tokenizer().decode
    dropped = decode(list(example_from_record(record).tokens))
    kept = example_from_record(record, keep_analysis=True)
    assert "Think one." not in dropped and "Think two." in dropped
    assert "Think one." in decode([int(t) for t, m in zip(kept.tokens, kept.loss_mask) if m])


@pytest.mark.parametrize("packing", [True, False])
def test_rows_hold_shifted_documents_with_restarting_positions(tmp_path, packing):
    path = write_lines(tmp_path / "d.jsonl", [qa(f"Q{i}?", f"R{i}.", f"A{i}") for i in range(5)])
    dataset = read_dataset(path)
    lengths = [e.length for e in dataset.examples]
    seq_len = 2 * max(lengths) + 3
    batches = Batches(dataset, batch_size=2, seq_len=seq_len, packing=packing, shuffle=False)
    rows = [tuple(None if x is None else x[r] for x in b) for b in batches.one_epoch() for r in range(2)]
    documents = [e for r in batches.epoch_rows(0) for e in r]
    assert [e.line for e in documents] == [1, 2, 3, 4, 5]
    assert len(batches.epoch_rows(0)) == (3 if packing else 5)  # two conversations fit a packed row
    first = dataset.examples[0]
    tokens, positions, segments, loss_positions, targets, loss_mask = rows[0]
    n = first.length
    np.testing.assert_array_equal(tokens[:n], first.tokens[:-1])
    np.testing.assert_array_equal(positions[:n], np.arange(n))
    kept = loss_mask > 0
    np.testing.assert_array_equal(loss_positions[kept], np.flatnonzero(first.loss_mask[1:]) if not packing else
                                  np.concatenate([np.flatnonzero(first.loss_mask[1:]),
                                                  n + np.flatnonzero(dataset.examples[1].loss_mask[1:])]))
    np.testing.assert_array_equal(targets[kept][:int(first.loss_mask[1:].sum())],
                                  first.tokens[1:][first.loss_mask[1:]])
    if packing:
        second = dataset.examples[1]
        np.testing.assert_array_equal(positions[n:n + second.length], np.arange(second.length))
        np.testing.assert_array_equal(segments[:n + second.length], [1] * n + [2] * second.length)
        assert (segments[n + second.length:] == 0).all()
    else:
        assert segments is None
    assert (positions[n + (dataset.examples[1].length if packing else 0):] == NO_POSITION).all()
    last = rows[-1]  # the last batch is filled up with an empty row
    assert (last[1] == NO_POSITION).all() and not last[5].any()


def test_batches_are_the_same_in_every_run_and_reshuffled_each_epoch(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [qa(f"Q{i}?", f"R{i}.", f"A{i}") for i in range(6)])
    make = lambda: Batches(read_dataset(path), batch_size=2, seq_len=128, packing=False, seed=4)
    a, b = make(), make()
    assert a.batches_in_epoch(0) == 3 and a.locate(4) == (1, 1)
    for i in (5, 0, 3):
        for x, y in zip(a[i], b[i]):
            np.testing.assert_array_equal(x, y)
    order = lambda epoch: [e.line for r in a.epoch_rows(epoch) for e in r]
    assert sorted(order(0)) == sorted(order(1)) == list(range(1, 7)) and order(0) != order(1)


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "unknown keys ['colour']"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message to train on"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]}, "needs 'name'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}]}, "must come before"),
    ({"messages": [{"role": "assistant", "channel": "thoughts", "content": "x"}]}, "unknown channel 'thoughts'"),
    ({"messages": [{"role": "assistant", "content": "x"}], "reasoning_effort": "max"}, "unknown reasoning effort"),
    ({"messages": [{"role": "assistant", "content": "x"}], "tools": [{"name": "bad name"}]}, "invalid tool name"),
    ({"messages": [{"role": "assistant", "content": "x " * 300}]}, "tokens long; rows hold 100"),
    ({"messages": [{"role": "assistant", "content": "x"}], "current_date": 20250628}, "'current_date' must be a string"),
])
def test_a_bad_record_is_named_by_its_line_or_skipped(tmp_path, line, reason):
    path = write_lines(tmp_path / "d.jsonl", [qa("Q?", "R.", "A"), "", line, qa("Q2?", "R2.", "A2")])
    with pytest.raises(DataError) as error:
        read_dataset(path, max_length=99)
    assert str(error.value).startswith(f"{path}:3: ") and reason in str(error.value)
    assert "--skip-bad-records" in str(error.value)
    dataset = read_dataset(path, max_length=99, skip_bad_records=True)
    assert [e.line for e in dataset.examples] == [1, 4] and [n for n, _ in dataset.skipped] == [3]
    assert reason in dataset.skipped[0][1]


def test_unusable_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="no such training file"):
        read_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        read_dataset(tmp_path / "binary.jsonl")
    with pytest.raises(DataError, match="holds no records"):
        read_dataset(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="all 2 records are bad"):
        read_dataset(write_lines(tmp_path / "bad.jsonl", ["{", "["]), skip_bad_records=True)
