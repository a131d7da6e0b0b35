import hashlib
import os
import sys
from pathlib import Path

import openai_harmony as harmony
import pytest

from gptoss_jax import chat_format
from gptoss_jax.chat_format import (
    CHANNELS,
    BuiltinTool,
    Conversation,
    FunctionTool,
    Message,
    StreamingParser,
    assistant,
    assistant_stop_tokens,
    drop_earlier_analysis,
    parse_completion,
    render_conversation,
    render_for_completion,
    render_for_training,
    tool_call,
    tool_result,
    user,
)
from gptoss_jax.tokenizer import CALL, END, RETURN, START, VOCABULARY_SHA256, get_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tokenizer import run_offline  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    """openai-harmony's own encoding, loaded the documented way."""
    previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(chat_format.harmony_vocabulary_dir())
    try:
        return harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_ENCODINGS_BASE"]
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


def encode(text):
    return get_tokenizer().encode(text, allowed_special="all")


def decode(ids):
    return get_tokenizer().decode(ids)


# --------------------------------------------------------------------------
# The same conversations, built with our API and with openai-harmony's API
# --------------------------------------------------------------------------

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City"},
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
    },
    "required": ["location"],
}
RICH_SCHEMA = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "What to look for.\nCan be long."},
        "limit": {"type": "integer", "description": "Maximum results", "default": 10},
        "sort": {"type": "string", "enum": ["relevance", "date"], "default": "relevance"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "filters": {
            "type": "object",
            "properties": {"after": {"type": "string"}, "exact": {"type": "boolean"}},
            "required": ["after"],
        },
        "cursor": {"type": "string", "nullable": True},
        "mode": {"oneOf": [{"type": "string"}, {"type": "number"}]},
        "label": {"type": "string", "title": "Label", "examples": ["inbox"], "default": "all"},
    },
    "required": ["query"],
}


def h_system(effort="Medium", date=None):
    content = harmony.SystemContent.new().with_reasoning_effort(harmony.ReasoningEffort(effort))
    if date is not None:
        content = content.with_conversation_start_date(date)
    return harmony.Message.from_role_and_content(harmony.Role.SYSTEM, content)


def h_developer(instructions=None, tools=()):
    content = harmony.DeveloperContent.new()
    if instructions is not None:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(
            [harmony.ToolDescription.new(name, description, parameters=schema) for name, description, schema in tools]
        )
    return harmony.Message.from_role_and_content(harmony.Role.DEVELOPER, content)


def h_user(text):
    return harmony.Message.from_role_and_content(harmony.Role.USER, text)


def h_assistant(text, channel):
    return harmony.Message.from_role_and_content(harmony.Role.ASSISTANT, text).with_channel(channel)


def h_call(recipient, arguments):
    return (
        harmony.Message.from_role_and_content(harmony.Role.ASSISTANT, arguments)
        .with_channel("commentary")
        .with_recipient(recipient)
        .with_content_type("<|constrain|>json")
    )


def h_result(tool, output):
    return (
        harmony.Message.from_author_and_content(harmony.Author.new(harmony.Role.TOOL, tool), output)
        .with_recipient("assistant")
        .with_channel("commentary")
    )


WEATHER_TOOLS = [("get_weather", "Gets weather.", WEATHER_SCHEMA), ("ping", "Ping.", None)]
OUR_WEATHER_TOOLS = [FunctionTool(*tool) for tool in WEATHER_TOOLS]


def case_system(effort, date):
    ours = Conversation([user("Hi")], reasoning_effort=effort, current_date=date)
    theirs = [h_system(effort.capitalize(), date), h_user("Hi")]
    return ours, theirs


def case_identity_and_cutoff():
    ours = Conversation([user("Hi")], model_identity="You are a helpful bot.", knowledge_cutoff="2023-10")
    content = harmony.SystemContent.new().with_model_identity("You are a helpful bot.").with_knowledge_cutoff("2023-10")
    return ours, [harmony.Message.from_role_and_content(harmony.Role.SYSTEM, content), h_user("Hi")]


def case_developer_instructions_only():
    ours = Conversation([user("Hi")], developer_instructions="Answer in French.")
    return ours, [h_system(), h_developer("Answer in French."), h_user("Hi")]


def case_function_tools():
    tools = WEATHER_TOOLS + [("search", "Searches the mail.\nReturns ids.", RICH_SCHEMA)]
    ours = Conversation(
        [user("Find it")],
        reasoning_effort="high",
        current_date="2025-06-28",
        developer_instructions="Be brief.",
        tools=[FunctionTool(*tool) for tool in tools],
    )
    return ours, [h_system("High", "2025-06-28"), h_developer("Be brief.", tools), h_user("Find it")]


def case_tools_without_instructions():
    ours = Conversation([user("Ping please")], tools=[FunctionTool("ping", "Ping.")])
    return ours, [h_system(), h_developer(None, [("ping", "Ping.", None)]), h_user("Ping please")]


def case_tool_sequence_in_progress():
    ours = Conversation(
        [
            user("Weather in Paris and Rome?"),
            assistant("Need two calls.", "analysis"),
            tool_call("functions.get_weather", {"location": "Paris"}),
            tool_result("functions.get_weather", {"temp": 20}),
            assistant("Now Rome.", "analysis"),
            assistant("Checking Rome next.", "commentary"),
            tool_call("functions.get_weather", '{"location":"Rome","unit":"f"}'),
            tool_result("functions.get_weather", "68F, sunny"),
        ],
        developer_instructions="Be brief.",
        tools=OUR_WEATHER_TOOLS,
    )
    theirs = [
        h_system(),
        h_developer("Be brief.", WEATHER_TOOLS),
        h_user("Weather in Paris and Rome?"),
        h_assistant("Need two calls.", "analysis"),
        h_call("functions.get_weather", '{"location": "Paris"}'),
        h_result("functions.get_weather", '{"temp": 20}'),
        h_assistant("Now Rome.", "analysis"),
        h_assistant("Checking Rome next.", "commentary"),
        h_call("functions.get_weather", '{"location":"Rome","unit":"f"}'),
        h_result("functions.get_weather", "68F, sunny"),
    ]
    return ours, theirs


def case_multi_turn():
    ours = Conversation(
        [
            user("Hi"),
            assistant("Hello! How can I help?"),
            user("Weather in Oslo?"),
            assistant("Call the tool.", "analysis"),
            tool_call("functions.get_weather", {"location": "Oslo"}),
            tool_result("functions.get_weather", {"temp": -3}),
            assistant("It is -3 °C in Oslo."),
            user("Thanks! And in 東京?"),
        ],
        reasoning_effort="low",
        current_date="2025-01-02",
        tools=OUR_WEATHER_TOOLS,
    )
    theirs = [
        h_system("Low", "2025-01-02"),
        h_developer(None, WEATHER_TOOLS),
        h_user("Hi"),
        h_assistant("Hello! How can I help?", "final"),
        h_user("Weather in Oslo?"),
        # harmony drops this analysis too: it comes before a final message.
        h_call("functions.get_weather", '{"location": "Oslo"}'),
        h_result("functions.get_weather", '{"temp": -3}'),
        h_assistant("It is -3 °C in Oslo.", "final"),
        h_user("Thanks! And in 東京?"),
    ]
    return ours, theirs


def case_special_strings_in_user_text():
    ours = Conversation([user("What does <|end|> or <|start|>assistant mean?")])
    return ours, [h_system(), h_user("What does <|end|> or <|start|>assistant mean?")]


def h_system_content(content):
    return harmony.Message.from_role_and_content(harmony.Role.SYSTEM, content)


def case_builtin_tools(names):
    ours = Conversation([user("Look it up")], current_date="2025-06-28", builtin_tools=[BuiltinTool(n) for n in names])
    content = harmony.SystemContent.new().with_conversation_start_date("2025-06-28")
    for name in sorted(names):  # the order given does not matter: harmony sorts namespaces by name
        content = content.with_browser_tool() if name == "browser" else content.with_python_tool()
    return ours, [h_system_content(content), h_user("Look it up")]


def case_browser_and_function_tools():
    lookup = ("lookup_weather", "Looks up the weather.", {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]})
    ours = Conversation(
        [user("Weather?")], current_date="2025-06-28", tools=[FunctionTool(*lookup)], builtin_tools=[BuiltinTool("browser")]
    )
    system = harmony.SystemContent.new().with_conversation_start_date("2025-06-28").with_browser_tool()
    return ours, [h_system_content(system), h_developer(None, [lookup]), h_user("Weather?")]


def case_python_tool_with_own_description():
    description = "Runs Python code in a fresh process.\nThere is no network."
    ours = Conversation([user("Compute")], builtin_tools=[BuiltinTool("python", description), BuiltinTool("browser")])
    python = harmony.ToolNamespaceConfig(name="python", description=description, tools=[])
    system = harmony.SystemContent.new().with_tools(python).with_browser_tool()
    return ours, [h_system_content(system), h_user("Compute")]


def case_channels(channels, required, with_function_tools):
    ours = Conversation(
        [user("Hi")], channels=channels, channel_required=required, tools=OUR_WEATHER_TOOLS if with_function_tools else []
    )
    system = harmony.SystemContent.new().with_channel_config(
        harmony.ChannelConfig(valid_channels=list(channels), channel_required=required)
    )
    theirs = [h_system_content(system)] + ([h_developer(None, WEATHER_TOOLS)] if with_function_tools else []) + [h_user("Hi")]
    return ours, theirs


CASES = {
    **{
        f"system-{effort}-{'date' if date else 'nodate'}": (case_system, (effort, date))
        for effort in ("low", "medium", "high")
        for date in (None, "2025-06-28")
    },
    "identity-and-cutoff": (case_identity_and_cutoff, ()),
    "developer-instructions-only": (case_developer_instructions_only, ()),
    "function-tools": (case_function_tools, ()),
    "tools-without-instructions": (case_tools_without_instructions, ()),
    "tool-sequence-in-progress": (case_tool_sequence_in_progress, ()),
    "multi-turn": (case_multi_turn, ()),
    "special-strings-in-user-text": (case_special_strings_in_user_text, ()),
    "browser-tool": (case_builtin_tools, (["browser"],)),
    "python-tool": (case_builtin_tools, (["python"],)),
    "python-and-browser-tools": (case_builtin_tools, (["python", "browser"],)),
    "browser-and-function-tools": (case_browser_and_function_tools, ()),
    "python-tool-with-own-description": (case_python_tool_with_own_description, ()),
    "required-channels-analysis-final": (case_channels, (("analysis", "final"), True, False)),
    "channels-not-required": (case_channels, (CHANNELS, False, False)),
    "channels-not-required-with-function-tools": (case_channels, (("analysis", "commentary", "final"), False, True)),
    "no-channels-line-with-function-tools": (case_channels, ((), True, True)),
}


@pytest.mark.parametrize("case", CASES)
def test_render_matches_openai_harmony(case, reference):
    build, arguments = CASES[case]
    ours, theirs = build(*arguments)
    expected = reference.render_conversation_for_completion(
        harmony.Conversation.from_messages(theirs), harmony.Role.ASSISTANT
    )
    rendered = render_for_completion(ours)
    assert rendered == expected
    assert rendered[-2:] == [200006, 173781]


# --------------------------------------------------------------------------
# The verified outputs of docs/architecture.md 4.4 and 4.5
# --------------------------------------------------------------------------

SPEC_SYSTEM = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-06-28

Reasoning: high

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.<|end|>"""

SPEC_DEVELOPER = """<|start|>developer<|message|># Instructions

Be brief.

# Tools

## functions

namespace functions {

// Gets weather.
type get_weather = (_: {
// City
location: string,
unit?: "c" | "f", // default: c
}) => any;

// Ping.
type ping = () => any;

} // namespace functions<|end|>"""

SPEC_TOOL_RESULT = '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>'


def test_spec_verified_outputs():
    conversation = Conversation(
        [
            user("Weather in Paris?"),
            tool_call("functions.get_weather", {"location": "Paris"}),
            tool_result("functions.get_weather", {"temp": 20}),
        ],
        reasoning_effort="high",
        current_date="2025-06-28",
        developer_instructions="Be brief.",
        tools=OUR_WEATHER_TOOLS,
    )
    text = decode(render_for_completion(conversation))
    assert text == (
        SPEC_SYSTEM
        + SPEC_DEVELOPER
        + "<|start|>user<|message|>Weather in Paris?<|end|>"
        + '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"location": "Paris"}<|call|>'
        + SPEC_TOOL_RESULT
        + "<|start|>assistant"
    )


def test_system_message_without_tools_has_no_functions_line():
    text = decode(render_for_completion(Conversation([user("Hi")], reasoning_effort="low")))
    assert text == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n\nReasoning: low\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


def test_system_message_tools_and_channels_text():
    text = decode(render_for_completion(Conversation([user("Hi")], builtin_tools=[BuiltinTool("python")], channel_required=False)))
    system = text[: text.index("<|end|>")]
    assert "\n\n# Tools\n\n## python\n\nUse this tool to execute Python code" in system
    assert system.endswith("\n\n# Valid channels: analysis, commentary, final.")

    no_line = decode(render_for_completion(Conversation([user("Hi")], channels=(), tools=OUR_WEATHER_TOOLS)))
    assert "Valid channels" not in no_line and "Calls to these tools" not in no_line


def test_date_object_and_effort_case():
    import datetime

    with_date = Conversation([user("Hi")], reasoning_effort="HIGH", current_date=datetime.date(2025, 6, 28))
    with_text = Conversation([user("Hi")], reasoning_effort="high", current_date="2025-06-28")
    assert render_for_completion(with_date) == render_for_completion(with_text)


def test_function_tool_from_dict():
    openai_style = {"type": "function", "function": {"name": "get_weather", "description": "Gets weather.", "parameters": WEATHER_SCHEMA}}
    assert FunctionTool.from_dict(openai_style) == OUR_WEATHER_TOOLS[0]
    assert FunctionTool.from_dict({"name": "ping", "description": "Ping."}) == OUR_WEATHER_TOOLS[1]


def test_assistant_stop_tokens():
    assert assistant_stop_tokens() == [200002, 200012] == [RETURN, CALL]
    assert END not in assistant_stop_tokens()


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

ANALYSIS = "<|channel|>analysis<|message|>User asks for weather in Paris. Call get_weather.<|end|>"
CALL_RECIPIENT_FIRST = (
    '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"location": "Paris"}<|call|>'
)
CALL_RECIPIENT_AFTER_CHANNEL = (
    '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location": "Paris"}<|call|>'
)
FINAL = (
    "<|start|>assistant<|channel|>analysis<|message|>Got 20 °C.<|end|>"
    "<|start|>assistant<|channel|>commentary<|message|>Here you go:<|end|>"
    "<|start|>assistant<|channel|>final<|message|>It is 20 °C in Paris ☀️ — 晴れ.<|return|>"
)
EXPECTED_CALL = Message(
    "assistant",
    '{"location": "Paris"}',
    channel="commentary",
    recipient="functions.get_weather",
    content_type="<|constrain|>json",
)


@pytest.mark.parametrize("call", [CALL_RECIPIENT_FIRST, CALL_RECIPIENT_AFTER_CHANNEL], ids=["recipient-first", "recipient-after-channel"])
def test_parse_tool_call(call):
    result = parse_completion(encode(ANALYSIS + call))
    assert result.complete
    assert result.partial_message is None
    assert result.messages == [
        Message("assistant", "User asks for weather in Paris. Call get_weather.", channel="analysis"),
        EXPECTED_CALL,
    ]
    assert result.tool_call == EXPECTED_CALL
    assert result.tool_call.tool_arguments() == {"location": "Paris"}
    assert result.final_text is None


def test_parse_final_answer():
    result = parse_completion(encode(FINAL.removeprefix("<|start|>assistant")))
    assert result.complete
    assert [(m.channel, m.content) for m in result.messages] == [
        ("analysis", "Got 20 °C."),
        ("commentary", "Here you go:"),
        ("final", "It is 20 °C in Paris ☀️ — 晴れ."),
    ]
    assert result.final_text == "It is 20 °C in Paris ☀️ — 晴れ."
    assert result.tool_call is None


FULL_COMPLETION = ANALYSIS + CALL_RECIPIENT_AFTER_CHANNEL + FINAL


def test_parse_matches_openai_harmony(reference):
    tokens = encode(FULL_COMPLETION)
    expected = reference.parse_messages_from_completion_tokens(tokens, harmony.Role.ASSISTANT)
    ours = parse_completion(tokens).messages
    assert len(ours) == len(expected) == 5
    for our_message, their_message in zip(ours, expected):
        assert our_message.content == their_message.content[0].text
        assert our_message.channel == their_message.channel
        assert our_message.recipient == their_message.recipient
        assert our_message.content_type == their_message.content_type


def test_parsed_messages_render_back_into_history():
    completion = parse_completion(encode(ANALYSIS + CALL_RECIPIENT_FIRST))
    conversation = Conversation([user("Weather in Paris?")], tools=OUR_WEATHER_TOOLS)
    conversation.messages.extend(completion.messages)
    conversation.messages.append(tool_result(completion.tool_call.recipient, {"temp": 20}))
    text = decode(render_for_completion(conversation))
    assert text.endswith(
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        + "<|start|>assistant" + ANALYSIS
        + CALL_RECIPIENT_FIRST
        + SPEC_TOOL_RESULT
        + "<|start|>assistant"
    )


def test_streaming_parser_matches_batch_parser():
    tokens = encode(FULL_COMPLETION)
    parser = StreamingParser()
    texts, channels, current_text, current_channels = [], [], "", set()
    for token in tokens:
        delta = parser.feed(token)
        assert delta == parser.delta
        if delta:
            current_text += delta
            current_channels.add(parser.channel)
        if len(parser.messages) > len(texts):
            texts.append(current_text)
            channels.append(current_channels)
            current_text, current_channels = "", set()

    batch = parse_completion(tokens)
    assert texts == [m.content for m in batch.messages]
    assert channels == [{m.channel} for m in batch.messages]
    assert parser.result() == batch


def test_streaming_exposes_channel_and_recipient():
    parser = StreamingParser()
    seen = set()
    for token in encode(ANALYSIS + CALL_RECIPIENT_AFTER_CHANNEL):
        parser.feed(token)
        if parser.channel is not None:
            seen.add((parser.channel, parser.recipient))
    assert seen == {("analysis", None), ("commentary", "functions.get_weather")}


def test_every_prefix_parses_without_error():
    tokens = encode(FULL_COMPLETION)
    full = parse_completion(tokens)
    for cut in range(len(tokens) + 1):
        result = parse_completion(tokens[:cut])
        assert result.complete == (cut > 0 and tokens[cut - 1] in (RETURN, CALL))
        assert result.messages == full.messages[: len(result.messages)]
        if result.partial_message is not None:
            next_message = full.messages[len(result.messages)]
            assert next_message.content.startswith(result.partial_message.content)
            assert result.partial_message.channel == next_message.channel


def test_truncated_completion_is_reported_incomplete():
    tokens = encode(ANALYSIS + "<|start|>assistant<|channel|>final<|message|>It is 20 degrees in Paris today.<|return|>")
    cut_in_content = parse_completion(tokens[:-3])
    assert not cut_in_content.complete
    assert cut_in_content.messages[0].channel == "analysis"
    assert cut_in_content.partial_message.channel == "final"
    assert cut_in_content.partial_message.content == "It is 20 degrees in Paris"
    assert cut_in_content.final_text == "It is 20 degrees in Paris"

    cut_in_header = parse_completion(encode("<|channel|>analy"))
    assert not cut_in_header.complete
    assert cut_in_header.messages == [] and cut_in_header.partial_message is None

    cut_between_messages = parse_completion(encode(ANALYSIS))
    assert not cut_between_messages.complete
    assert len(cut_between_messages.messages) == 1 and cut_between_messages.partial_message is None


# --------------------------------------------------------------------------
# Dropping earlier chain of thought
# --------------------------------------------------------------------------


def analysis(text):
    return assistant(text, "analysis")


def test_drops_analysis_of_a_finished_turn():
    messages = [user("Q1"), analysis("think1"), assistant("A1"), user("Q2")]
    assert drop_earlier_analysis(messages) == [user("Q1"), assistant("A1"), user("Q2")]


def test_keeps_analysis_during_a_tool_sequence():
    messages = [
        user("Q1"),
        analysis("think1"),
        tool_call("functions.get_weather", {"location": "Paris"}),
        tool_result("functions.get_weather", "20C"),
        analysis("think2"),
        tool_call("functions.ping", {}),
        tool_result("functions.ping", "pong"),
    ]
    assert drop_earlier_analysis(messages) == messages


def test_drops_every_earlier_turn_but_keeps_the_current_tool_sequence():
    messages = [
        user("Q1"), analysis("think1"), assistant("A1"),
        user("Q2"), analysis("think2"), assistant("A2"),
        user("Q3"), analysis("think3"), tool_call("functions.ping", {}), tool_result("functions.ping", "pong"),
    ]
    kept = drop_earlier_analysis(messages)
    assert [m.content for m in kept if m.channel == "analysis"] == ["think3"]
    assert [m for m in messages if m.channel != "analysis"] == [m for m in kept if m.channel != "analysis"]


def test_drops_analysis_of_an_interrupted_tool_sequence():
    messages = [
        user("Q1"), analysis("think1"), tool_call("functions.ping", {}), tool_result("functions.ping", "pong"),
        user("Never mind. Q2"),
    ]
    assert [m.content for m in drop_earlier_analysis(messages) if m.channel == "analysis"] == []


def test_drops_all_analysis_once_the_current_response_is_final():
    messages = [user("Q1"), analysis("think1"), assistant("A1")]
    assert drop_earlier_analysis(messages) == [user("Q1"), assistant("A1")]


def test_render_applies_our_rule_where_harmony_differs(reference):
    """Three finished turns: harmony keeps think2 (after the first final);
    our rule drops it, and keeps think3 of the tool sequence in progress."""
    messages = [
        user("Q1"), analysis("think1"), assistant("A1"),
        user("Q2"), analysis("think2"), assistant("A2"),
        user("Q3"), analysis("think3"), tool_call("functions.ping", {}), tool_result("functions.ping", "pong"),
    ]
    text = decode(render_for_completion(Conversation(messages, tools=OUR_WEATHER_TOOLS)))
    assert "think1" not in text and "think2" not in text and "think3" in text

    def harmony_messages(keep_analysis):
        result = [h_system(), h_developer(None, WEATHER_TOOLS)]
        for m in messages:
            if m.role == "user":
                result.append(h_user(m.content))
            elif m.role == "tool":
                result.append(h_result(m.name, m.content))
            elif m.recipient:
                result.append(h_call(m.recipient, m.content))
            elif m.channel != "analysis" or m.content in keep_analysis:
                result.append(h_assistant(m.content, m.channel))
        return harmony.Conversation.from_messages(result)

    no_drop = harmony.RenderConversationConfig(auto_drop_analysis=False)
    expected = reference.render_conversation_for_completion(harmony_messages({"think3"}), harmony.Role.ASSISTANT, no_drop)
    assert render_for_completion(Conversation(messages, tools=OUR_WEATHER_TOOLS)) == expected

    harmony_default = decode(
        reference.render_conversation_for_completion(harmony_messages({"think1", "think2", "think3"}), harmony.Role.ASSISTANT)
    )
    assert "think1" in harmony_default and "think2" in harmony_default  # harmony drops nothing here


def three_turns():
    return [
        user("Q1"), analysis("think1"), assistant("A1"),
        user("Q2"), analysis("think2"), assistant("A2"),
        user("Q3"), analysis("think3"), assistant("A3"),
    ]


def to_harmony(messages):
    result = []
    for m in messages:
        if m.role == "user":
            result.append(h_user(m.content))
        elif m.role == "tool":
            result.append(
                harmony.Message.from_author_and_content(harmony.Author.new(harmony.Role.TOOL, m.name), m.content)
                .with_recipient(m.recipient)
                .with_channel(m.channel)
            )
        elif m.recipient:
            result.append(h_call(m.recipient, m.content).with_channel(m.channel).with_content_type(m.content_type))
        else:
            result.append(h_assistant(m.content, m.channel))
    return result


NO_DROP = harmony.RenderConversationConfig(auto_drop_analysis=False)


def test_keep_analysis_matches_harmony_without_dropping(reference):
    messages = three_turns()[:-2]  # ends with the user's Q3
    expected = reference.render_conversation_for_completion(
        harmony.Conversation.from_messages([h_system()] + to_harmony(messages)), harmony.Role.ASSISTANT, NO_DROP
    )
    kept = render_for_completion(Conversation(messages), keep_analysis=True)
    assert kept == expected
    assert "think1" in decode(kept) and "think2" in decode(kept)
    assert "think1" not in decode(render_for_completion(Conversation(messages)))


def test_render_conversation_of_two_turns_matches_harmony_default(reference):
    """harmony's own vector: the first turn's analysis is dropped, the last turn keeps its analysis."""
    messages = three_turns()[3:]  # Q2, think2, A2, Q3, think3, A3
    expected = reference.render_conversation(harmony.Conversation.from_messages([h_system()] + to_harmony(messages)))
    rendered = render_conversation(Conversation(messages))
    assert rendered == expected
    assert "think2" not in decode(rendered) and "think3" in decode(rendered)
    assert rendered[-1] == END


def test_render_conversation_drops_every_earlier_turn(reference):
    messages = three_turns()
    kept = [m for m in messages if m.content not in ("think1", "think2")]
    expected = reference.render_conversation(harmony.Conversation.from_messages([h_system()] + to_harmony(kept)), NO_DROP)
    assert render_conversation(Conversation(messages)) == expected

    everything = reference.render_conversation(harmony.Conversation.from_messages([h_system()] + to_harmony(messages)), NO_DROP)
    assert render_conversation(Conversation(messages), keep_analysis=True) == everything


def test_render_conversation_is_the_completion_prompt_without_its_tail():
    conversation = Conversation(three_turns()[:-2], tools=OUR_WEATHER_TOOLS, builtin_tools=[BuiltinTool("browser")])
    assert render_for_completion(conversation) == render_conversation(conversation) + [START, 173781]


TOOL_SEQUENCE = [
    user("Q1"), analysis("think1"), assistant("A1"),
    user("Weather in Paris?"), analysis("Need the tool."),
    tool_call("functions.get_weather", {"location": "Paris"}),
    tool_result("functions.get_weather", {"temp": 20}),
    analysis("Got it."), assistant("It is 20 degrees."),
]


@pytest.mark.parametrize(
    "end, last_token", [(9, RETURN), (8, END), (6, CALL), (4, END)], ids=["final", "analysis", "tool-call", "user"]
)
@pytest.mark.parametrize("keep_analysis", [False, True])
def test_render_for_training_matches_harmony(end, last_token, keep_analysis, reference):
    messages = TOOL_SEQUENCE[:end]
    conversation = Conversation(messages, tools=OUR_WEATHER_TOOLS)
    kept = messages if keep_analysis else [m for m in messages if m.content != "think1"]
    expected = reference.render_conversation_for_training(
        harmony.Conversation.from_messages([h_system(), h_developer(None, WEATHER_TOOLS)] + to_harmony(kept)), NO_DROP
    )
    training = render_for_training(conversation, keep_analysis=keep_analysis)
    assert training.tokens == expected
    assert training.tokens[-1] == last_token
    assert len(training.loss_mask) == len(training.tokens)
    assert training.tokens[:-1] == render_conversation(conversation, keep_analysis=keep_analysis)[:-1]


def masked_runs(training):
    """The text of each run of consecutive tokens the loss mask marks."""
    runs, current = [], []
    for token, trained in zip(training.tokens, training.loss_mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(decode(current))
            current = []
    if current:
        runs.append(decode(current))
    return runs


def test_loss_mask_marks_what_the_model_generates():
    training = render_for_training(Conversation(TOOL_SEQUENCE, tools=OUR_WEATHER_TOOLS))
    assert masked_runs(training) == [
        "<|channel|>final<|message|>A1",  # its <|end|> stands for the <|return|> the model sampled
        (
            "<|channel|>analysis<|message|>Need the tool.<|end|>"
            '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"location": "Paris"}<|call|>'
        ),
        "<|channel|>analysis<|message|>Got it.<|end|><|start|>assistant<|channel|>final<|message|>It is 20 degrees.<|return|>",
    ]
    text = decode(training.tokens)
    assert "think1" not in text
    unmasked = decode([t for t, trained in zip(training.tokens, training.loss_mask) if not trained])
    assert "Weather in Paris?" in unmasked and '{"temp": 20}' in unmasked and "Reasoning: medium" in unmasked


def test_loss_mask_with_earlier_analysis_kept():
    training = render_for_training(Conversation(TOOL_SEQUENCE[:3]), keep_analysis=True)
    assert masked_runs(training) == [
        "<|channel|>analysis<|message|>think1<|end|><|start|>assistant<|channel|>final<|message|>A1<|return|>"
    ]
    earlier = render_for_training(Conversation(TOOL_SEQUENCE), keep_analysis=True)
    assert masked_runs(earlier)[0] == "<|channel|>analysis<|message|>think1<|end|><|start|>assistant<|channel|>final<|message|>A1"


def test_loss_mask_of_a_python_tool_exchange(reference):
    call = Message("assistant", "print(6 * 7)", channel="analysis", recipient="python", content_type="code")
    output = Message("tool", "42\n", channel="analysis", recipient="assistant", name="python")
    messages = [user("What is 6*7?"), call, output, assistant("42")]
    conversation = Conversation(messages, builtin_tools=[BuiltinTool("python")])
    training = render_for_training(conversation)
    expected = reference.render_conversation_for_training(
        harmony.Conversation.from_messages([h_system_content(harmony.SystemContent.new().with_python_tool())] + to_harmony(messages)),
        NO_DROP,  # harmony's default would drop the python exchange: it is analysis before the first final
    )
    assert training.tokens == expected
    assert masked_runs(training) == [
        " to=python<|channel|>analysis code<|message|>print(6 * 7)<|call|>",
        "<|channel|>final<|message|>42<|return|>",
    ]
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>42\n<|end|>" in decode(training.tokens)


# --------------------------------------------------------------------------
# Messages authored by tools
# --------------------------------------------------------------------------

TOOL_MESSAGES = {
    "function": ('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>', "functions.get_weather", "commentary"),
    "browser": ('<|start|>browser.search to=assistant<|channel|>commentary<|message|>{"result": "https://openai.com/"}<|end|>', "browser.search", "commentary"),
    "python": ("<|start|>python to=assistant<|channel|>analysis<|message|>42\n<|end|>", "python", "analysis"),
}


@pytest.mark.parametrize("kind", TOOL_MESSAGES)
def test_parse_tool_message(kind, reference):
    text, name, channel = TOOL_MESSAGES[kind]
    tokens = encode(text)
    result = parse_completion(tokens, role=None)
    content = text.split("<|message|>")[1].removesuffix("<|end|>")
    expected = Message("tool", content, channel=channel, recipient="assistant", name=name)
    assert result.messages == [expected]
    assert result.partial_message is None and not result.complete and result.tool_call is None

    [theirs] = reference.parse_messages_from_completion_tokens(tokens, None)
    assert (theirs.author.role.value, theirs.author.name, theirs.channel, theirs.recipient, theirs.content[0].text) == (
        "tool", name, channel, "assistant", content
    )
    # rendered back, it gives the same tokens
    rendered = render_conversation(Conversation([user("Hi"), expected]))
    assert rendered[-len(tokens):] == tokens


@pytest.mark.parametrize("kind", TOOL_MESSAGES)
def test_streaming_parser_reports_the_tool_author(kind):
    text, name, channel = TOOL_MESSAGES[kind]
    tokens = encode(text)
    parser = StreamingParser(role=None)
    seen = set()
    for token in tokens:
        if parser.feed(token):
            seen.add((parser.role, parser.name, parser.channel, parser.recipient))
    assert seen == {("tool", name, channel, "assistant")}
    assert parser.result() == parse_completion(tokens, role=None)

    cut = parse_completion(tokens[:-1], role=None)
    assert cut.messages == [] and cut.partial_message == parser.result().messages[0]


def test_parse_completion_with_a_browser_call_and_its_result(reference):
    """openai-harmony's streaming-parser vector: analysis, a browser call and the browser's answer."""
    text = (
        "<|channel|>analysis<|message|>Let's browse to confirm.<|end|>"
        '<|start|>assistant<|channel|>commentary to=browser.search code<|message|>{"query": "US president", "topn": 10}<|call|>'
        '<|start|>browser.search to=assistant<|channel|>commentary<|message|>{"result": "https://openai.com/"}<|end|>'
    )
    tokens = encode(text)
    ours = parse_completion(tokens).messages
    theirs = reference.parse_messages_from_completion_tokens(tokens, harmony.Role.ASSISTANT)
    assert len(ours) == len(theirs) == 3
    assert [(m.role, m.name, m.channel, m.recipient, m.content_type, m.content) for m in ours] == [
        (t.author.role.value, t.author.name, t.channel, t.recipient, t.content_type, t.content[0].text) for t in theirs
    ]
    assert ours[2] == Message("tool", '{"result": "https://openai.com/"}', channel="commentary", recipient="assistant", name="browser.search")


def test_parser_role_and_message_checks():
    with pytest.raises(ValueError, match="parser role must be 'assistant'"):
        StreamingParser(role="user")
    with pytest.raises(ValueError, match="the tokens hold a system message"):
        parse_completion(encode("<|start|>system<|message|>You are a bot.<|end|>"), role=None)
    with pytest.raises(ValueError, match="the tokens hold a developer message"):
        parse_completion(encode("<|start|>developer<|message|>Be brief."), role=None)
    with pytest.raises(ValueError, match="each starting with <|start|>"):
        parse_completion(encode("<|channel|>final<|message|>Hi<|return|>"), role=None)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("role, fragment", [("bogus", "unknown message role 'bogus'"), ("system", "Conversation's fields"), ("developer", "Conversation's fields")])
def test_unknown_role(role, fragment):
    with pytest.raises(ValueError, match=fragment):
        Message(role, "hello")


def test_bad_messages():
    with pytest.raises(ValueError, match="unknown channel 'thoughts'"):
        assistant("x", channel="thoughts")
    with pytest.raises(ValueError, match="content must be a str"):
        Message("user", {"text": "hi"})
    with pytest.raises(ValueError, match="tool message needs the tool's name"):
        Message("tool", "42", channel="commentary")
    with pytest.raises(ValueError, match="not a Message"):
        Conversation([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="invalid JSON arguments"):
        tool_call("functions.f", "{not json").tool_arguments()


@pytest.mark.parametrize(
    "parameters, fragment",
    [
        ({"type": "string"}, '"type": "object"'),
        ({}, "parameters=None"),
        ("location: string", '"type": "object"'),
        ({"type": "object", "properties": [{"name": "a"}]}, "'properties' must map"),
        ({"type": "object", "properties": {"a": "string"}}, r"parameters\.a must be a JSON schema"),
        ({"type": "object", "properties": {"a": {"type": "text"}}}, "unknown type 'text'"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"}, "'required' must list"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "'required' must list"),
        ({"type": "object", "properties": {"a": {"type": "string", "enum": []}}}, "'enum' must be a non-empty list"),
        ({"type": "object", "properties": {"a": {"type": "array", "items": "string"}}}, r"a\[items\] must be a JSON schema"),
        ({"type": "object", "properties": {"a": {"oneOf": {"type": "string"}}}}, "'oneOf' must be a list"),
        ({"type": "object", "properties": {"a": {"type": "string", "default": object()}}}, "not JSON-serializable"),
    ],
)
def test_malformed_tool_schema(parameters, fragment):
    with pytest.raises(ValueError, match=fragment):
        FunctionTool("f", "A function.", parameters)


@pytest.mark.parametrize("name", ["", "get weather", "functions.get_weather", None])
def test_bad_tool_name(name):
    with pytest.raises(ValueError, match="invalid tool name"):
        FunctionTool(name, "A function.")


def test_bad_tools_list():
    with pytest.raises(ValueError, match="FunctionTool objects"):
        Conversation(tools=[{"name": "f", "description": "x"}])
    with pytest.raises(ValueError, match="duplicates"):
        Conversation(tools=[FunctionTool("f", "x"), FunctionTool("f", "y")])
    with pytest.raises(ValueError, match="needs 'name'"):
        FunctionTool.from_dict({"description": "no name"})
    with pytest.raises(ValueError, match="description must be a str"):
        FunctionTool("f", None)


def test_bad_builtin_tools():
    with pytest.raises(ValueError, match="unknown built-in tool 'shell'"):
        BuiltinTool("shell")
    with pytest.raises(ValueError, match="description must be a str or None"):
        BuiltinTool("python", description=["Runs code."])
    with pytest.raises(ValueError, match="BuiltinTool objects"):
        Conversation(builtin_tools=["python"])
    with pytest.raises(ValueError, match="may appear once"):
        Conversation(builtin_tools=[BuiltinTool("python"), BuiltinTool("python", "Runs code.")])


@pytest.mark.parametrize("channels", [("analysis", "thoughts"), "analysis", ("final", "final"), None])
def test_bad_channels(channels):
    with pytest.raises(ValueError, match="channels must list distinct channels"):
        Conversation(channels=channels)


def test_bad_channel_required():
    with pytest.raises(ValueError, match="channel_required must be True or False"):
        Conversation(channel_required="yes")


@pytest.mark.parametrize("effort", ["extreme", "", None, 2, "Low "])
def test_bad_reasoning_effort(effort):
    with pytest.raises(ValueError, match="unknown reasoning effort"):
        Conversation([user("Hi")], reasoning_effort=effort)


def test_bad_reasoning_effort_set_after_construction():
    conversation = Conversation([user("Hi")])
    conversation.reasoning_effort = "max"
    with pytest.raises(ValueError, match="unknown reasoning effort 'max'"):
        render_for_completion(conversation)


@pytest.mark.parametrize("token", [-1, 201088, 201089, 2**32 + 5, -(2**40)])
def test_token_ids_outside_the_vocabulary(token):
    with pytest.raises(ValueError, match=rf"token id {token} at position 1 is outside the vocabulary"):
        parse_completion([200005, token])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        StreamingParser().feed(token)


def test_non_integer_token():
    with pytest.raises(ValueError, match="not an integer id"):
        parse_completion([200005, 1.5])


def test_tokens_that_do_not_follow_the_harmony_grammar():
    with pytest.raises(ValueError, match="does not fit the harmony format") as raised:
        parse_completion(encode("<|channel|>final<|message|>Hi<|return|>plain text"))
    assert not isinstance(raised.value, harmony.HarmonyError)
    assert isinstance(raised.value.__cause__, harmony.HarmonyError)


def test_rust_panic_becomes_value_error(monkeypatch):
    class PanicException(BaseException):  # the name PyO3 gives Rust panics
        pass

    def panic(*args, **kwargs):
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(chat_format.harmony_encoding(), "render_conversation_for_completion", panic)
    with pytest.raises(ValueError, match="rendering the conversation failed: called `Option::unwrap"):
        render_for_completion(Conversation([user("Hi")]))


def test_keyboard_interrupt_is_not_swallowed(monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_format.harmony_encoding(), "render_conversation_for_completion", interrupt)
    with pytest.raises(KeyboardInterrupt):
        render_for_completion(Conversation([user("Hi")]))


# --------------------------------------------------------------------------
# Offline loading and the vocabulary cache
# --------------------------------------------------------------------------

OFFLINE_RENDER = """
import json, os
from gptoss_jax import chat_format
prompt = chat_format.render_for_completion(chat_format.Conversation([chat_format.user("Hi")]))
parsed = chat_format.parse_completion([200005, 17196, 200008, 12194, 200002])
print(json.dumps({"prompt": prompt, "final": parsed.final_text,
                  "folder": str(chat_format.harmony_vocabulary_dir()),
                  "variable_left_set": "TIKTOKEN_ENCODINGS_BASE" in os.environ}))
"""


def test_harmony_loads_in_a_fresh_process_without_network(tmp_path):
    result = run_offline(OFFLINE_RENDER, tmp_path)
    assert result["prompt"] == render_for_completion(Conversation([user("Hi")]))
    assert result["final"] == decode([12194])
    assert result["folder"] == str(tmp_path / "gptoss_jax" / "encodings")
    cached = tmp_path / "gptoss_jax" / "encodings" / "o200k_base.tiktoken"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == VOCABULARY_SHA256
    assert result["variable_left_set"] is False


def test_unwritable_cache_falls_back_to_temp_dir(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should go")
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    result = run_offline(OFFLINE_RENDER, blocker, TMPDIR=str(temp_dir))
    assert result["prompt"] == render_for_completion(Conversation([user("Hi")]))
    assert Path(result["folder"]).parent.parent == temp_dir
    assert Path(result["folder"]).parent.name.startswith("gptoss_jax-")


def test_corrupted_cached_vocabulary_is_rewritten(tmp_path):
    path = tmp_path / "o200k_base.tiktoken"
    path.write_bytes(b"garbage")
    chat_format._write_vocabulary_if_needed(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VOCABULARY_SHA256
