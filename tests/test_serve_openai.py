"""The OpenAI <-> harmony mapping of the server (gptoss_jax.openai_api), on real harmony token
sequences: requests rendered as prompts, completions (well-formed, off-spec and broken) read
back as chat completions, Responses and their stream events, checked against the official
client's types."""

import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from gptoss_jax import chat_format
from gptoss_jax.chat_format import Conversation, FunctionTool, render_for_completion
from gptoss_jax.openai_api import (
    APIError,
    ChatChunks,
    ChatCompletionRequest,
    HarmonyOutput,
    ResponseEvents,
    ResponsesRequest,
    StopStrings,
    Usage,
    chat_completion,
    chat_prompt,
    final_prefix,
    normalised_arguments,
    response,
    responses_prompt,
    tool_call_prefix,
)
from gptoss_jax.tokenizer import CALL, RETURN, START, get_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Gets the weather.",
                                                 "parameters": WEATHER}}]
DATE = "2026-01-01"


def tokens(text):
    return get_tokenizer().encode(text, allowed_special="all")


def read(completion, engine_reason=None, prefix=(), stop=(), step=1):
    """A completion fed `step` tokens at a time, as decode chunks deliver them."""
    ids = tokens(completion) if isinstance(completion, str) else completion
    output = HarmonyOutput(list(prefix), list(stop))
    events = []
    for i in range(0, len(ids), step):
        events += output.feed(ids[i:i + step])
    if engine_reason is None:
        engine_reason = "stop" if ids and ids[-1] in (RETURN, CALL) else "length"
    events += output.finish(engine_reason)
    return output, events


def summary(output):
    return (output.finish_reason, output.text("reasoning"), output.text("content"),
            [(m.name, json.loads(m.arguments)) for m in output.tool_calls])


CALL_BODY = '<|constrain|>json<|message|>{"city": "Paris"}<|call|>'
FORMS = {
    "reasoning then answer": ("<|channel|>analysis<|message|>User greets.<|end|><|start|>assistant<|channel|>final"
                              "<|message|>Hello!<|return|>", ("stop", "User greets.", "Hello!", [])),
    "tool call": ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
                  "to=functions.get_weather " + CALL_BODY,
                  ("tool_calls", "Need weather.", None, [("get_weather", {"city": "Paris"})])),
    "recipient in the role header": ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant "
                                     "to=functions.get_weather<|channel|>commentary " + CALL_BODY,
                                     ("tool_calls", "Need weather.", None, [("get_weather", {"city": "Paris"})])),
    "recipient in the first header": (" to=functions.get_weather<|channel|>commentary " + CALL_BODY,
                                      ("tool_calls", None, None, [("get_weather", {"city": "Paris"})])),
    "tool call on the analysis channel": ("<|channel|>analysis to=functions.get_weather " + CALL_BODY,
                                          ("tool_calls", None, None, [("get_weather", {"city": "Paris"})])),
    "bare function name": ("<|channel|>commentary to=get_weather " + CALL_BODY,
                           ("tool_calls", None, None, [("get_weather", {"city": "Paris"})])),
    "content type without <|constrain|>": ('<|channel|>commentary to=functions.get_weather json<|message|>'
                                           '{"city": "Paris"}<|call|>',
                                           ("tool_calls", None, None, [("get_weather", {"city": "Paris"})])),
    "arguments encoded twice": ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                                '"{\\"city\\": \\"Paris\\"}"<|call|>',
                                ("tool_calls", None, None, [("get_weather", {"city": "Paris"})])),
    "no arguments": ("<|channel|>commentary to=functions.now <|constrain|>json<|message|><|call|>",
                     ("tool_calls", None, None, [("now", {})])),
    "preamble before the call": ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>"
                                 "commentary to=functions.get_weather " + CALL_BODY,
                                 ("tool_calls", None, "Checking.", [("get_weather", {"city": "Paris"})])),
    "refusal without channel": ("<|message|>I can't help with that.<|return|>",
                                ("stop", None, "I can't help with that.", [])),
    "refusal without any header": ("I can't help with that.<|return|>", ("stop", None, "I can't help with that.", [])),
    "plain text, then harmony": ("Sorry.<|end|><|start|>assistant<|channel|>final<|message|>Hi.<|return|>",
                                 ("stop", None, "Sorry.\n\nHi.", [])),
    "cut off in the answer": ("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>"
                              "The answer is", ("length", "Hm.", "The answer is", [])),
    "cut off in a call": ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"ci',
                          ("length", None, None, [])),
    "text after <|end|> instead of a new message": ("<|channel|>final<|message|>Hi.<|end|>oops",
                                                    ("incomplete", None, "Hi.", [])),
    "end token inside a header": ("<|channel|>final<|return|>", ("incomplete", None, None, [])),
    "arguments that are not JSON": ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                                    "{city: Paris<|call|>", ("incomplete", None, None, [])),
    "arguments that are not an object": ("<|channel|>commentary to=functions.get_weather <|constrain|>json"
                                         "<|message|>[1, 2]<|call|>", ("incomplete", None, None, [])),
}


@pytest.mark.parametrize("name", FORMS)
def test_completion_forms(name):
    completion, expected = FORMS[name]
    whole, _ = read(completion, step=1000)
    assert summary(whole) == expected
    streamed, events = read(completion, step=1)
    assert summary(streamed) == expected
    if expected[0] == "incomplete":
        assert streamed.error
    # The events rebuild the messages: every delta of a message, in order.
    texts = {}
    for event in events:
        if event.kind == "delta":
            texts[event.message.id] = texts.get(event.message.id, "") + event.text
    assert texts == {m.id: m.text for m in streamed.messages if m.kind != "tool_call" and m.text}


def test_commentary_arrives_as_two_tokens():
    ids = tokens("<|channel|>commentary to=functions.get_weather " + CALL_BODY)
    pieces = [get_tokenizer().decode([t]) for t in ids[1:3]]
    assert pieces == ["comment", "ary"]
    assert summary(read(ids, step=1)[0])[3] == [("get_weather", {"city": "Paris"})]


def test_rendered_tool_call_reads_back():
    """The tool call as chat_format renders it into a history (recipient in the role header)."""
    conversation = Conversation([chat_format.user("Weather?"), chat_format.tool_call("functions.get_weather",
                                                                                      {"city": "Paris"})])
    history = chat_format.render_conversation(conversation)
    last_start = max(i for i, token in enumerate(history) if token == START)
    completion = history[last_start + 2:]  # after <|start|>assistant
    assert summary(read(completion)[0]) == ("tool_calls", None, None, [("get_weather", {"city": "Paris"})])


def test_random_tokens_never_raise():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 201088, 200)
        ids[rng.integers(0, 200, 10)] = rng.choice([200002, 200003, 200005, 200006, 200007, 200008, 200012], 10)
        ids = [int(t) for t in ids]
        for step in (1, 7):
            output, _ = read(ids, engine_reason="length", step=step)
            assert output.finish_reason in ("length", "stop", "incomplete", "tool_calls")


def test_stop_strings_in_content_only():
    completion = ("<|channel|>analysis<|message|>Say STOP now.<|end|><|start|>assistant<|channel|>final<|message|>"
                  "One STOP two<|return|>")
    for step in (1, 3, 100):
        output, _ = read(completion, engine_reason="length", stop=["STOP"], step=step)
        assert (output.finish_reason, output.text("reasoning"), output.text("content")) == ("stop", "Say STOP now.", "One ")
        assert output.done
    stops = StopStrings(["abc", "bd"])
    assert stops.feed("xxa") == ("xx", False)
    assert stops.feed("b") == ("", False)
    assert stops.feed("d") == ("a", True)


def test_prefix_text_is_not_reported():
    prefix = final_prefix("The sky is")
    output, events = read(" blue.<|return|>", prefix=prefix)
    assert output.text("content") == " blue." and output.finish_reason == "stop"
    assert [e.kind for e in events][:2] == ["start", "delta"]
    output, _ = read('{"city": "Oslo"}<|call|>', prefix=tool_call_prefix("get_weather"))
    assert summary(output) == ("tool_calls", None, None, [("get_weather", {"city": "Oslo"})])
    output, _ = read('.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>', prefix=tool_call_prefix(None))
    assert summary(output) == ("tool_calls", None, None, [("get_weather", {"city": "Oslo"})])


def test_forced_prefixes_tokenize_as_the_model_writes_them():
    named = tokens("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")
    assert tool_call_prefix("get_weather") == named
    assert named[:len(tool_call_prefix(None))] == tool_call_prefix(None)
    assert final_prefix("Hi <|end|>") == tokens("<|channel|>final<|message|>") + get_tokenizer().encode(
        "Hi <|end|>", disallowed_special=())


@pytest.mark.parametrize("arguments, expected", [
    ('{"a": 1}', '{"a": 1}'), ('  ', "{}"), ('"{\\"a\\": 1}"', '{"a": 1}'), ({"a": "é"}, '{"a": "é"}'),
    ("[1]", None), ("{a}", None), ('"text"', None)])
def test_normalised_arguments(arguments, expected):
    assert normalised_arguments(arguments) == expected


def chat_request(**fields):
    return ChatCompletionRequest.model_validate({"model": "tiny", **fields})


def test_chat_history_renders_as_harmony():
    request = chat_request(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "Need weather.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '"{\\"city\\": \\"Paris\\"}"'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20.", "reasoning": "Tell it.", "tool_calls": []},
        {"role": "user", "content": "Thanks"}], tools=CHAT_TOOLS, reasoning_effort="low")
    expected = Conversation([
        chat_format.user("Weather in Paris?"), chat_format.assistant("Need weather.", "analysis"),
        chat_format.tool_call("functions.get_weather", {"city": "Paris"}),
        chat_format.tool_result("functions.get_weather", '{"temp": 20}'),
        chat_format.assistant("Tell it.", "analysis"), chat_format.assistant("It is 20."), chat_format.user("Thanks")],
        reasoning_effort="low", current_date=DATE, developer_instructions="Be brief.",
        tools=[FunctionTool("get_weather", "Gets the weather.", WEATHER)])
    prompt = chat_prompt(request, DATE)
    assert prompt.tokens == render_for_completion(expected) and prompt.prefix == []


@pytest.mark.parametrize("choice, prefix", [("required", tool_call_prefix(None)),
                                            ({"type": "function", "function": {"name": "get_weather"}},
                                             tool_call_prefix("get_weather")), ("auto", []), ("none", [])])
def test_chat_tool_choice(choice, prefix):
    request = chat_request(messages=[{"role": "user", "content": "Weather?"}], tools=CHAT_TOOLS, tool_choice=choice)
    prompt = chat_prompt(request, DATE)
    tools = [] if choice == "none" else [FunctionTool("get_weather", "Gets the weather.", WEATHER)]
    assert prompt.tokens == render_for_completion(Conversation([chat_format.user("Weather?")], current_date=DATE,
                                                               tools=tools)) + prefix
    assert prompt.prefix == prefix


def test_continue_final_message():
    request = chat_request(messages=[{"role": "user", "content": "Sky?"},
                                     {"role": "assistant", "reasoning_content": "Easy.", "content": "The sky is"}],
                           continue_final_message=True)
    prompt = chat_prompt(request, DATE)
    expected = Conversation([chat_format.user("Sky?"), chat_format.assistant("Easy.", "analysis")], current_date=DATE)
    assert prompt.tokens == render_for_completion(expected) + final_prefix("The sky is")


def test_tool_call_round_trip_through_the_mapping():
    """Turn 1: the model's tool call (real harmony tokens) becomes OpenAI tool_calls; the
    client sends the returned message back with the tool's result; turn 2's prompt is the
    harmony history of the call and result, and the model's answer comes back as content."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = chat_prompt(chat_request(messages=messages, tools=CHAT_TOOLS), DATE)
    output, _ = read("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
                     "to=functions.get_weather " + CALL_BODY)
    body = chat_completion(id="chatcmpl_1", created=1, model="tiny", output=output, usage=Usage(len(first.tokens), 30, 5))
    completion = ChatCompletion.model_validate(body)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert choice.message.model_extra["reasoning_content"] == "Need weather."

    messages += [choice.message.model_dump(exclude_unset=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 20}'}]
    second = chat_prompt(chat_request(messages=messages, tools=CHAT_TOOLS), DATE)
    history = [chat_format.user("Weather in Paris?"), chat_format.assistant("Need weather.", "analysis"),
               chat_format.tool_call("functions.get_weather", {"city": "Paris"}),
               chat_format.tool_result("functions.get_weather", '{"temp": 20}')]
    tools = [FunctionTool("get_weather", "Gets the weather.", WEATHER)]
    assert second.tokens == render_for_completion(Conversation(history, current_date=DATE, tools=tools))

    answer, _ = read("<|channel|>analysis<|message|>20 degrees.<|end|><|start|>assistant<|channel|>final"
                     "<|message|>It is 20 °C in Paris.<|return|>")
    body = chat_completion(id="chatcmpl_2", created=1, model="tiny", output=answer, usage=Usage(1, 1, 1))
    message = ChatCompletion.model_validate(body).choices[0].message
    assert message.content == "It is 20 °C in Paris." and message.tool_calls is None


def test_responses_round_trip_through_the_mapping():
    request = ResponsesRequest.model_validate({"model": "tiny", "input": "Weather in Paris?", "instructions": "Be brief.",
                                               "tools": [{"type": "function", "name": "get_weather",
                                                          "parameters": WEATHER}],
                                               "reasoning": {"effort": "high"}})
    first = responses_prompt(request, DATE)
    tools = [FunctionTool("get_weather", "", WEATHER)]
    assert first.tokens == render_for_completion(Conversation(
        [chat_format.user("Weather in Paris?")], reasoning_effort="high", current_date=DATE,
        developer_instructions="Be brief.", tools=tools))
    output, _ = read("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
                     "to=functions.get_weather " + CALL_BODY)
    body = Response.model_validate(response(id="resp_1", created_at=1, model="tiny", request=request, output=output,
                                            usage=Usage(10, 20, 5)))
    assert body.status == "completed" and [item.type for item in body.output] == ["reasoning", "function_call"]
    call = body.output[1]
    follow_up = ResponsesRequest.model_validate({
        "model": "tiny", "instructions": "Be brief.", "reasoning": {"effort": "high"},
        "tools": [{"type": "function", "name": "get_weather", "parameters": WEATHER}],
        "input": [{"role": "user", "content": "Weather in Paris?"}]
        + [item.model_dump(exclude_unset=True) for item in body.output]
        + [{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 20}'}]})
    history = [chat_format.user("Weather in Paris?"), chat_format.assistant("Need weather.", "analysis"),
               chat_format.tool_call("functions.get_weather", {"city": "Paris"}),
               chat_format.tool_result("functions.get_weather", '{"temp": 20}')]
    assert responses_prompt(follow_up, DATE).tokens == render_for_completion(Conversation(
        history, reasoning_effort="high", current_date=DATE, developer_instructions="Be brief.", tools=tools))


def test_chat_chunks_match_the_whole_completion():
    completion = ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>commentary<|message|>"
                  "Checking.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    ids = tokens(completion)
    output = HarmonyOutput()
    chunks = ChatChunks(id="c", created=1, model="tiny", include_usage=True, return_token_ids=True)
    streamed = [chunks.first([1, 2])]
    for i in range(0, len(ids), 4):
        streamed += chunks.deltas(output.feed(ids[i:i + 4]), ids[i:i + 4])
    streamed += chunks.deltas(output.finish("stop"), [])
    streamed += chunks.last(output.finish_reason, Usage(2, len(ids), 3))
    parsed = [ChatCompletionChunk.model_validate(c) for c in streamed]
    deltas = [c.choices[0].delta for c in parsed if c.choices]
    assert "".join(d.content or "" for d in deltas) == output.text("content") == "Checking.\n\nDone."
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Think."
    token_ids = [c.choices[0].model_extra.get("token_ids") or [] for c in parsed[1:] if c.choices]
    assert sum(token_ids, []) == ids
    assert parsed[-2].choices[0].finish_reason == "stop" and parsed[-1].usage.completion_tokens == len(ids)


def test_response_events_are_valid_and_complete():
    request = ResponsesRequest.model_validate({"model": "tiny", "input": "Hi", "tools": [
        {"type": "function", "name": "get_weather", "parameters": WEATHER}]})
    completion = ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>commentary<|message|>"
                  "Checking.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather " + CALL_BODY)
    ids = tokens(completion)
    output = HarmonyOutput()
    events = ResponseEvents(id="resp_1", created_at=1, model="tiny", request=request)
    stream = events.first()
    for i in range(0, len(ids), 3):
        stream += events.events(output.feed(ids[i:i + 3]))
    stream += events.events(output.finish("stop"))
    stream.append(events.last(output, Usage(1, len(ids), 2)))
    adapter = TypeAdapter(ResponseStreamEvent)
    parsed = [adapter.validate_python(event) for event in stream]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert parsed[0].type == "response.created" and parsed[-1].type == "response.completed"
    final = parsed[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    done = [e.item for e in parsed if e.type == "response.output_item.done"]
    assert [item.id for item in done] == [item.id for item in final.output]
    text = "".join(e.delta for e in parsed if e.type == "response.output_text.delta")
    assert text == final.output[1].content[0].text == "Checking."
    assert "".join(e.delta for e in parsed if e.type == "response.reasoning_text.delta") == "Think."


def test_incomplete_responses_say_why():
    request = ResponsesRequest.model_validate({"model": "tiny", "input": "Hi"})
    for completion, reason in [("<|channel|>final<|message|>Cut", "max_output_tokens"),
                               ("<|channel|>final<|message|>Hi<|end|>oops", "invalid_output")]:
        output, _ = read(completion)
        body = response(id="r", created_at=1, model="tiny", request=request, output=output, usage=Usage(1, 1, 0))
        assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": reason}
        assert Response.model_construct(**body).status == "incomplete"


@pytest.mark.parametrize("fields, message", [
    ({"messages": []}, "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "tempreature": 1}, "tempreature"),
])
def test_chat_request_schema_refuses(fields, message):
    with pytest.raises(ValidationError, match=message):
        chat_request(**fields)


@pytest.mark.parametrize("fields, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": CHAT_TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "bad name", "parameters": WEATHER}}]}, "tools[0]"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, "messages"),
])
def test_chat_requests_that_cannot_be_rendered(fields, param):
    with pytest.raises(APIError) as error:
        chat_prompt(chat_request(**fields), DATE)
    assert error.value.status == 400 and error.value.param == param


def test_responses_request_schema():
    assert ResponsesRequest.model_validate({"model": "m", "input": [{"role": "user", "content": "x"}]})
    for fields, message in [({"previous_response_id": "resp_1"}, "previous_response_id"),
                            ({"input": [{"type": "image", "url": "x"}]}, "image"),
                            ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include")]:
        with pytest.raises(ValidationError, match=message):
            ResponsesRequest.model_validate({"model": "m", "input": "x", **fields})
    request = ResponsesRequest.model_validate({"model": "m", "input": [
        {"type": "function_call_output", "call_id": "nope", "output": "x"}]})
    with pytest.raises(APIError, match="call_id"):
        responses_prompt(request, DATE)
