"""Harmony chat format for gpt-oss: build conversations, render prompts, parse completions.

Rendering and parsing are done by OpenAI's ``openai-harmony`` library; this
module gives it a small API and feeds it the vocabulary shipped with the
package (see ``harmony_vocabulary_dir``), so nothing is downloaded and users
set no environment variable.

Typical loop::

    conversation = Conversation(reasoning_effort="low", current_date="2025-08-05",
                                tools=[FunctionTool("get_weather", "Gets weather.", schema)])
    conversation.messages.append(user("Weather in Paris?"))
    prompt = render_for_completion(conversation)          # ends with <|start|>assistant
    parser = StreamingParser()
    for token in sample(prompt, stop=assistant_stop_tokens()):
        text = parser.feed(token)
        if parser.channel == "final":
            print(text, end="")
    completion = parser.result()
    conversation.messages.extend(completion.messages)     # then tool_result(...) if it called a tool

The system message
------------------
``Conversation`` fields set the system message: model identity, knowledge
cutoff, current date, reasoning effort, the built-in tools gpt-oss was trained
on (``BuiltinTool("browser")``, ``BuiltinTool("python")``, described with the
text ``openai-harmony`` renders unless given another description) and the
valid channels (``channels``; ``channel_required`` adds "Channel must be
included for every message."). Function tools and developer instructions go
to the developer message.

Rendering
---------
``render_for_completion`` gives a prompt ending with ``<|start|>assistant``;
``render_conversation`` gives the messages alone, as they appear in a
history; ``render_for_training`` ends a trailing final message with
``<|return|>``, as the model generated it, and returns a loss mask that marks
the tokens the model generates.

Dropping earlier chain of thought
---------------------------------
``render_for_completion`` keeps ``analysis`` messages only in the assistant
response still in progress: the messages after the last user message, as long
as none of them is on the ``final`` channel. Every other analysis message is
dropped. So the chain of thought of a turn that ended in a final answer is
never shown to the model again, while a tool-calling sequence (analysis, tool
call, tool result, more analysis, ...) keeps its reasoning until the final
answer. This is the rule of harmony's ``format.md`` and of gpt-oss's Responses
API server. It differs from ``openai-harmony``'s own ``auto_drop_analysis``,
which only drops analysis before the *first* final message of the whole
conversation and only when the last assistant message is final; that is why we
render with ``auto_drop_analysis=False`` after applying our rule
(``drop_earlier_analysis``). ``render_conversation`` and
``render_for_training`` keep the analysis of the last response even when it
ended in a final message: that response is rendered as it was generated.
Every render function takes ``keep_analysis=True`` to drop nothing.

Invalid input (unknown role, malformed tool schema, unknown reasoning effort,
token ids outside the 201088-entry vocabulary, tokens that do not follow the
harmony grammar) raises ``ValueError`` saying what was wrong; errors from the
Rust layer are re-raised as ``ValueError``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import getpass
import hashlib
import json
import operator
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai_harmony as harmony

from gptoss_jax.tokenizer import CALL, END, N_VOCAB, RETURN, START, VOCABULARY_SHA256, read_vocabulary

REASONING_EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
MESSAGE_ROLES = ("user", "assistant", "tool")
BUILTIN_TOOLS = ("browser", "python")
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"

# openai-harmony loads its vocabulary from $TIKTOKEN_ENCODINGS_BASE/<this name>.
HARMONY_VOCABULARY_NAME = "o200k_base.tiktoken"
_ENCODINGS_DIR_VARIABLE = "TIKTOKEN_ENCODINGS_BASE"

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]+")
_JSON_SCHEMA_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


# --------------------------------------------------------------------------
# Conversation building blocks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One user, assistant or tool message.

    ``channel``: ``analysis``, ``commentary`` or ``final``; every assistant
    message should have one. ``recipient``: for an assistant tool call, the
    tool, e.g. ``functions.get_weather``. ``name``: for a tool message, the
    tool that produced it. ``content_type``: ``<|constrain|>json`` on JSON
    tool calls.
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    name: str | None = None
    content_type: str | None = None

    def __post_init__(self):
        if self.role not in MESSAGE_ROLES:
            hint = ""
            if self.role in ("system", "developer"):
                hint = (
                    " The system and developer messages are built from Conversation's fields"
                    " (reasoning_effort, current_date, developer_instructions, tools)."
                )
            raise ValueError(f"unknown message role {self.role!r}: use one of {MESSAGE_ROLES}.{hint}")
        if not isinstance(self.content, str):
            raise ValueError(
                f"message content must be a str, got {type(self.content).__name__}; "
                "serialize structured content (e.g. with json.dumps) first."
            )
        if self.channel is not None and self.channel not in CHANNELS:
            raise ValueError(f"unknown channel {self.channel!r}: use one of {CHANNELS}.")
        if self.role == "tool" and not self.name:
            raise ValueError("a tool message needs the tool's name, e.g. name='functions.get_weather'.")

    def tool_arguments(self) -> Any:
        """The content of a tool call, parsed as JSON."""
        try:
            return json.loads(self.content)
        except json.JSONDecodeError as error:
            raise ValueError(f"the tool call to {self.recipient} has invalid JSON arguments {self.content!r}: {error}") from None


def user(text: str) -> Message:
    return Message("user", text)


def assistant(text: str, channel: str = "final") -> Message:
    return Message("assistant", text, channel=channel)


def tool_call(recipient: str, arguments: Any, channel: str = "commentary") -> Message:
    """An assistant call of ``recipient`` (e.g. ``functions.get_weather``) with JSON arguments."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return Message("assistant", arguments, channel=channel, recipient=recipient, content_type="<|constrain|>json")


def tool_result(tool_name: str, output: Any) -> Message:
    """The output of tool ``tool_name`` (e.g. ``functions.get_weather``), sent back to the assistant."""
    if not isinstance(output, str):
        output = json.dumps(output)
    return Message("tool", output, channel="commentary", recipient="assistant", name=tool_name)


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call as ``functions.<name>``.

    ``parameters`` is the JSON schema of the arguments: an object schema, or
    None for a function without parameters.
    """

    name: str
    description: str
    parameters: dict | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _TOOL_NAME.fullmatch(self.name):
            raise ValueError(
                f"invalid tool name {self.name!r}: use letters, digits, '_' and '-' only "
                "(the model calls it as functions.<name>)."
            )
        if not isinstance(self.description, str):
            raise ValueError(f"tool {self.name!r}: description must be a str, got {type(self.description).__name__}.")
        if self.parameters is not None:
            _check_parameters_schema(self.parameters, self.name)

    @classmethod
    def from_dict(cls, spec: dict) -> "FunctionTool":
        """Build from ``{"name", "description", "parameters"}``, bare or in OpenAI's
        ``{"type": "function", "function": {...}}`` wrapper."""
        if not isinstance(spec, dict):
            raise ValueError(f"a tool spec must be a dict, got {type(spec).__name__}.")
        if spec.get("type") == "function" and isinstance(spec.get("function"), dict):
            spec = spec["function"]
        unknown_keys = set(spec) - {"name", "description", "parameters", "strict"}
        if "name" not in spec or unknown_keys:
            raise ValueError(
                f"a tool spec needs 'name' and may have 'description' and 'parameters'; got keys {sorted(spec)}."
            )
        return cls(spec["name"], spec.get("description", ""), spec.get("parameters"))


def _check_parameters_schema(parameters: Any, tool_name: str) -> None:
    where = f"tool {tool_name!r} parameters"
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ValueError(
            f"{where} must be a JSON schema with \"type\": \"object\", got {parameters!r}; "
            "use parameters=None for a function without parameters."
        )
    _check_schema(parameters, where)
    try:
        json.dumps(parameters)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} is not JSON-serializable: {error}.") from None


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON schema (a dict), got {schema!r}.")
    types = schema.get("type", [])
    for type_name in types if isinstance(types, list) else [types]:
        if type_name not in _JSON_SCHEMA_TYPES:
            raise ValueError(f"{where} has unknown type {type_name!r}: use one of {_JSON_SCHEMA_TYPES}.")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise ValueError(f"{where}: 'properties' must map property names to schemas, got {properties!r}.")
    for name, property_schema in properties.items():
        _check_schema(property_schema, f"{where}.{name}")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(name not in properties for name in required):
        raise ValueError(f"{where}: 'required' must list names from 'properties', got {required!r}.")
    if "items" in schema:
        _check_schema(schema["items"], f"{where}[items]")
    for keyword in ("oneOf", "anyOf", "allOf"):
        if keyword in schema:
            if not isinstance(schema[keyword], list):
                raise ValueError(f"{where}: '{keyword}' must be a list of schemas, got {schema[keyword]!r}.")
            for option in schema[keyword]:
                _check_schema(option, f"{where}.{keyword}")
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        raise ValueError(f"{where}: 'enum' must be a non-empty list, got {schema['enum']!r}.")


@dataclass(frozen=True)
class BuiltinTool:
    """A tool gpt-oss was trained on, described in the system message.

    ``browser``: the model calls ``browser.search``, ``browser.open`` and
    ``browser.find`` with JSON arguments. ``python``: the model sends Python
    code to ``python`` (see ``gptoss_jax.python_tool``). ``description``: None
    renders the text openai-harmony has for the tool (what gpt-oss was trained
    on); a str replaces it, e.g. to describe where the code really runs.
    """

    name: str
    description: str | None = None

    def __post_init__(self):
        if self.name not in BUILTIN_TOOLS:
            raise ValueError(
                f"unknown built-in tool {self.name!r}: use one of {BUILTIN_TOOLS}, "
                "or FunctionTool(...) in Conversation.tools for your own functions."
            )
        if self.description is not None and not isinstance(self.description, str):
            raise ValueError(
                f"built-in tool {self.name!r}: description must be a str or None (openai-harmony's text), "
                f"got {type(self.description).__name__}."
            )


@dataclass
class Conversation:
    """A chat: the system and developer settings plus the user/assistant/tool messages.

    The system message always comes first; it holds ``builtin_tools`` and the
    ``channels`` line ("# Valid channels: analysis, commentary, final." plus
    "Channel must be included for every message." when ``channel_required``;
    no line when ``channels`` is empty). The developer message is rendered
    when there are ``developer_instructions`` or ``tools``.
    """

    messages: list[Message] = field(default_factory=list)
    reasoning_effort: str = "medium"
    current_date: str | datetime.date | None = None
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    developer_instructions: str | None = None
    tools: list[FunctionTool] = field(default_factory=list)
    builtin_tools: list[BuiltinTool] = field(default_factory=list)
    channels: tuple[str, ...] = CHANNELS
    channel_required: bool = True

    def __post_init__(self):
        _check_conversation(self)


def _check_conversation(conversation: Conversation) -> None:
    effort = conversation.reasoning_effort
    if not isinstance(effort, str) or effort.lower() not in REASONING_EFFORTS:
        raise ValueError(f"unknown reasoning effort {effort!r}: use one of {REASONING_EFFORTS}.")
    for position, message in enumerate(conversation.messages):
        if not isinstance(message, Message):
            raise ValueError(
                f"conversation.messages[{position}] is a {type(message).__name__}, not a Message; "
                "build messages with user(), assistant(), tool_call(), tool_result() or Message(...)."
            )
    tool_names = []
    for tool in conversation.tools:
        if not isinstance(tool, FunctionTool):
            raise ValueError(
                f"tools must be FunctionTool objects, got {type(tool).__name__}; "
                "use FunctionTool(name, description, parameters) or FunctionTool.from_dict(spec)."
            )
        tool_names.append(tool.name)
    duplicates = sorted({name for name in tool_names if tool_names.count(name) > 1})
    if duplicates:
        raise ValueError(f"tool names must be unique, got duplicates {duplicates}.")
    builtin_names = []
    for tool in conversation.builtin_tools:
        if not isinstance(tool, BuiltinTool):
            raise ValueError(
                f"builtin_tools must be BuiltinTool objects, got {type(tool).__name__}; "
                "use BuiltinTool('browser') or BuiltinTool('python')."
            )
        builtin_names.append(tool.name)
    if len(set(builtin_names)) != len(builtin_names):
        raise ValueError(f"each built-in tool may appear once, got {builtin_names}.")
    channels = conversation.channels
    if (
        not isinstance(channels, (list, tuple))
        or any(channel not in CHANNELS for channel in channels)
        or len(set(channels)) != len(channels)
    ):
        raise ValueError(
            f"channels must list distinct channels from {CHANNELS}, got {channels!r}; "
            "use an empty tuple for no channels line."
        )
    if not isinstance(conversation.channel_required, bool):
        raise ValueError(f"channel_required must be True or False, got {conversation.channel_required!r}.")


def drop_earlier_analysis(messages: list[Message], *, keep_last_response: bool = False) -> list[Message]:
    """Remove analysis messages outside the last assistant response (see module docstring).

    The last response is the messages after the last user message. It keeps
    its analysis while it is in progress (none of its messages is final), or
    always with ``keep_last_response=True``.
    """
    user_positions = [i for i, message in enumerate(messages) if message.role == "user"]
    response_start = user_positions[-1] + 1 if user_positions else 0
    last_response = messages[response_start:]
    finished = any(message.role == "assistant" and message.channel == "final" for message in last_response)
    if finished and not keep_last_response:
        response_start = len(messages)
    return [
        message
        for position, message in enumerate(messages)
        if message.channel != "analysis" or position >= response_start
    ]


# --------------------------------------------------------------------------
# openai-harmony plumbing
# --------------------------------------------------------------------------


def _cache_dir_candidates() -> list[Path]:
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    user_cache = Path(xdg_cache) if xdg_cache else Path.home() / ".cache"
    return [
        user_cache / "gptoss_jax" / "encodings",
        Path(tempfile.gettempdir()) / f"gptoss_jax-{getpass.getuser()}" / "encodings",
    ]


def _write_vocabulary_if_needed(path: Path) -> None:
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == VOCABULARY_SHA256:
        return
    vocabulary = read_vocabulary()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial_path.write_bytes(vocabulary)
    os.replace(partial_path, path)  # atomic, so concurrent processes never read half a file


@functools.cache
def harmony_vocabulary_dir() -> Path:
    """The folder holding the uncompressed vocabulary that openai-harmony reads.

    ``$XDG_CACHE_HOME/gptoss_jax/encodings`` (default ``~/.cache/gptoss_jax/encodings``),
    or ``<tempdir>/gptoss_jax-<user>/encodings`` if that is not writable. The
    file is written from the package's copy on first use and rewritten if its
    hash is wrong.
    """
    problems = []
    for folder in _cache_dir_candidates():
        try:
            _write_vocabulary_if_needed(folder / HARMONY_VOCABULARY_NAME)
            return folder
        except OSError as error:
            problems.append(f"{folder}: {error}")
    raise RuntimeError("cannot write the tokenizer vocabulary to a cache folder: " + "; ".join(problems))


@functools.cache
def harmony_encoding() -> harmony.HarmonyEncoding:
    """openai-harmony's gpt-oss encoding, loaded from the shipped vocabulary."""
    folder = harmony_vocabulary_dir()
    previous = os.environ.get(_ENCODINGS_DIR_VARIABLE)
    os.environ[_ENCODINGS_DIR_VARIABLE] = str(folder)
    try:
        return harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if previous is None:
            del os.environ[_ENCODINGS_DIR_VARIABLE]
        else:
            os.environ[_ENCODINGS_DIR_VARIABLE] = previous


def _is_rust_error(error: BaseException) -> bool:
    # PyO3 turns a Rust panic into pyo3_runtime.PanicException, which derives
    # from BaseException and cannot be imported by name.
    return isinstance(error, (harmony.HarmonyError, OverflowError)) or type(error).__name__ == "PanicException"


@contextlib.contextmanager
def _rust_errors_as_value_error(what_failed: str, how_to_fix: str):
    try:
        yield
    except BaseException as error:
        if not _is_rust_error(error):
            raise
        raise ValueError(f"{what_failed}: {error}. {how_to_fix}") from error


def _to_harmony_message(message: Message) -> harmony.Message:
    author = harmony.Author(role=harmony.Role(message.role), name=message.name)
    result = harmony.Message.from_author_and_content(author, message.content)
    result.channel = message.channel
    result.recipient = message.recipient
    result.content_type = message.content_type
    return result


def _parsed_message(role: str, text: str, **header) -> Message:
    if role not in MESSAGE_ROLES:
        raise ValueError(
            f"the tokens hold a {role} message; parse only the messages that follow the system and developer messages."
        )
    return Message(role, text, **header)


def _from_harmony_message(message: harmony.Message) -> Message:
    text = "".join(part.text for part in message.content if isinstance(part, harmony.TextContent))
    return _parsed_message(
        message.author.role.value,
        text,
        channel=message.channel,
        recipient=message.recipient,
        name=message.author.name,
        content_type=message.content_type,
    )


_BUILTIN_TOOL_CONFIGS = {"browser": harmony.ToolNamespaceConfig.browser, "python": harmony.ToolNamespaceConfig.python}


def _to_harmony_conversation(conversation: Conversation, messages: list[Message]) -> harmony.Conversation:
    system = harmony.SystemContent(
        model_identity=conversation.model_identity,
        reasoning_effort=harmony.ReasoningEffort(conversation.reasoning_effort.lower().capitalize()),
        knowledge_cutoff=conversation.knowledge_cutoff,
        channel_config=harmony.ChannelConfig(
            valid_channels=list(conversation.channels), channel_required=conversation.channel_required
        ),
    )
    date = conversation.current_date
    if date is not None:
        system = system.with_conversation_start_date(date.isoformat() if isinstance(date, datetime.date) else date)
    for tool in conversation.builtin_tools:
        config = _BUILTIN_TOOL_CONFIGS[tool.name]()
        if tool.description is not None:
            config.description = tool.description
        system = system.with_tools(config)
    harmony_messages = [harmony.Message.from_role_and_content(harmony.Role.SYSTEM, system)]

    if conversation.developer_instructions or conversation.tools:
        developer = harmony.DeveloperContent(instructions=conversation.developer_instructions)
        if conversation.tools:
            descriptions = [
                harmony.ToolDescription.new(tool.name, tool.description, parameters=tool.parameters)
                for tool in conversation.tools
            ]
            developer = developer.with_function_tools(descriptions)
        harmony_messages.append(harmony.Message.from_role_and_content(harmony.Role.DEVELOPER, developer))

    harmony_messages += [_to_harmony_message(message) for message in messages]
    return harmony.Conversation.from_messages(harmony_messages)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _kept_messages(conversation: Conversation, keep_analysis: bool, keep_last_response: bool) -> list[Message]:
    _check_conversation(conversation)
    if keep_analysis:
        return list(conversation.messages)
    return drop_earlier_analysis(conversation.messages, keep_last_response=keep_last_response)


_NO_DROP = harmony.RenderConversationConfig(auto_drop_analysis=False)
_RENDER_FAILED = ("rendering the conversation failed", "Check the conversation's messages.")


def render_for_completion(conversation: Conversation, *, keep_analysis: bool = False) -> list[int]:
    """Prompt token ids for the next assistant turn; they end with ``<|start|>assistant``.

    Earlier chain of thought is dropped by ``drop_earlier_analysis`` unless
    ``keep_analysis``.
    """
    messages = _kept_messages(conversation, keep_analysis, keep_last_response=False)
    with _rust_errors_as_value_error(*_RENDER_FAILED):
        return harmony_encoding().render_conversation_for_completion(
            _to_harmony_conversation(conversation, messages), harmony.Role.ASSISTANT, _NO_DROP
        )


def render_conversation(conversation: Conversation, *, keep_analysis: bool = False) -> list[int]:
    """Token ids of the system and developer messages and every message, with no
    completion prompt after them; each message ends as it does in a history
    (a final answer with ``<|end|>``).

    Analysis before the last user message is dropped unless ``keep_analysis``;
    the last response keeps its analysis.
    """
    messages = _kept_messages(conversation, keep_analysis, keep_last_response=True)
    with _rust_errors_as_value_error(*_RENDER_FAILED):
        return harmony_encoding().render_conversation(_to_harmony_conversation(conversation, messages), _NO_DROP)


@dataclass(frozen=True)
class TrainingTokens:
    """A conversation rendered for training: ``tokens`` and, per token, ``loss_mask``
    (True where the model generates the token)."""

    tokens: list[int]
    loss_mask: list[bool]


def render_for_training(conversation: Conversation, *, keep_analysis: bool = False) -> TrainingTokens:
    """Tokens as ``render_conversation``, except that a trailing final message
    ends with ``<|return|>`` as the model generated it, and their loss mask.

    ``loss_mask`` is True for the tokens the model generates: in each assistant
    message, everything after ``<|start|>assistant`` (channel, recipient and
    content type header, ``<|message|>``, content, and the end token
    ``<|end|>``, ``<|call|>`` or ``<|return|>``). ``<|start|>assistant`` itself
    counts too when the message follows an assistant message that ended with
    ``<|end|>``: the model starts such a message on its own. False for the
    system, developer, user and tool messages, and for the ``<|end|>`` of a
    final message that is not the last message: the model ended that turn with
    ``<|return|>``, which a history shows as ``<|end|>``.

    Earlier turns: their analysis is dropped by default, so it is neither in
    the tokens nor trained on, while their final answers and tool calls are.
    With ``keep_analysis=True`` their analysis is rendered and trained on like
    any assistant message: every assistant token then follows exactly the
    context the model saw when it generated it.
    """
    messages = _kept_messages(conversation, keep_analysis, keep_last_response=True)
    harmony_conversation = _to_harmony_conversation(conversation, messages)
    with _rust_errors_as_value_error(*_RENDER_FAILED):
        tokens = harmony_encoding().render_conversation_for_training(harmony_conversation, _NO_DROP)
    settings_messages = len(harmony_conversation.messages) - len(messages)
    return TrainingTokens(tokens, _loss_mask(tokens, messages, settings_messages))


def _loss_mask(tokens: list[int], messages: list[Message], settings_messages: int) -> list[bool]:
    # Text never renders as <|start|>, so each message begins at one of these.
    starts = [position for position, token in enumerate(tokens) if token == START]
    spans = list(zip(starts, starts[1:] + [len(tokens)]))[settings_messages:]
    if len(spans) != len(messages):
        raise RuntimeError(f"found {len(spans)} rendered messages where {len(messages)} were expected.")
    header_length = 1 + len(harmony_encoding().encode("assistant"))  # <|start|>assistant
    mask = [False] * len(tokens)
    previous = None
    for message, (start, end) in zip(messages, spans):
        if message.role == "assistant":
            continues_output = (
                previous is not None
                and previous.role == "assistant"
                and previous.recipient is None
                and previous.channel != "final"
            )
            first = start if continues_output else start + header_length
            last = end - 1 if message.channel == "final" and tokens[end - 1] == END else end
            mask[first:last] = [True] * (last - first)
        previous = message
    return mask


def assistant_stop_tokens() -> list[int]:
    """Stop sampling an assistant turn at ``<|return|>`` or ``<|call|>``; not at ``<|end|>``,
    which only ends one message (e.g. the analysis before the final answer)."""
    return [RETURN, CALL]


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedCompletion:
    """Messages parsed from sampled tokens.

    ``messages``: the messages that were finished. ``partial_message``: the
    message cut off in its content, if any. ``complete``: True when the tokens
    end with ``<|return|>`` or ``<|call|>``, i.e. the assistant handed control
    back; False when generation was cut off.
    """

    messages: list[Message]
    partial_message: Message | None
    complete: bool

    @property
    def final_text(self) -> str | None:
        """The text of the last final-channel message (finished or partial), if any."""
        finals = [m for m in self.messages + [self.partial_message] if m is not None and m.channel == "final"]
        return finals[-1].content if finals else None

    @property
    def tool_call(self) -> Message | None:
        """The tool call that ended the completion, if it ended with ``<|call|>``."""
        if self.complete and self.messages and self.messages[-1].recipient is not None:
            return self.messages[-1]
        return None


def _check_token_id(token: Any, position: int) -> int:
    try:
        token_id = operator.index(token)
    except TypeError:
        raise ValueError(f"token at position {position} is {token!r}, not an integer id.") from None
    if not 0 <= token_id < N_VOCAB:
        raise ValueError(
            f"token id {token_id} at position {position} is outside the vocabulary: "
            f"ids must be in [0, {N_VOCAB})."
        )
    return token_id


_PARSER_ROLES = ("assistant", None)


class StreamingParser:
    """Parses an assistant completion one sampled token at a time.

    Feed it the tokens sampled after ``render_for_completion``'s prompt (they
    start with ``<|channel|>``). ``feed`` returns the text the token added to
    the current message ('' for header tokens, message ends, and bytes of an
    unfinished UTF-8 character); ``role``, ``name``, ``channel`` and
    ``recipient`` describe the message being generated. After a ``ValueError``
    the parser is unusable.

    ``role=None`` parses tokens that start with ``<|start|>``, whose headers
    name their author, e.g. a tool's output
    ``<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>...<|end|>``
    (a tool message with ``name="functions.get_weather"``).
    """

    def __init__(self, role: str | None = "assistant"):
        if role not in _PARSER_ROLES:
            raise ValueError(
                f"parser role must be 'assistant' (tokens sampled after render_for_completion's prompt) or None "
                f"(tokens that start with <|start|>, e.g. a tool's message), got {role!r}."
            )
        self._parser = harmony.StreamableParser(harmony_encoding(), None if role is None else harmony.Role(role))
        self._grammar_hint = (
            "Pass only the tokens sampled after render_for_completion's prompt."
            if role is not None
            else "Pass whole messages, each starting with <|start|>."
        )
        self._token_count = 0
        self._last_token: int | None = None
        self.delta = ""

    def feed(self, token: int) -> str:
        token_id = _check_token_id(token, self._token_count)
        with _rust_errors_as_value_error(
            f"token {token_id} at position {self._token_count} does not fit the harmony format",
            self._grammar_hint,
        ):
            self._parser.process(token_id)
        self._token_count += 1
        self._last_token = token_id
        self.delta = self._parser.last_content_delta or ""
        return self.delta

    def _content_header(self) -> dict | None:
        state = self._parser.state_data
        return state["header"] if state["state"] == harmony.StreamState.CONTENT.value else None

    @property
    def role(self) -> str | None:
        """The role of the message whose content is being generated, else None."""
        header = self._content_header()
        return header["author"]["role"] if header else None

    @property
    def name(self) -> str | None:
        """The author name of the message whose content is being generated (a tool's name), else None."""
        header = self._content_header()
        return header["author"].get("name") if header else None

    @property
    def channel(self) -> str | None:
        """The channel of the message whose content is being generated, else None."""
        return self._parser.current_channel

    @property
    def recipient(self) -> str | None:
        return self._parser.current_recipient

    @property
    def messages(self) -> list[Message]:
        """The finished messages so far."""
        with _rust_errors_as_value_error("reading the parsed messages failed", "Check the completion tokens."):
            return [_from_harmony_message(message) for message in self._parser.messages]

    def result(self) -> ParsedCompletion:
        state = self._parser.state_data
        partial_message = None
        header = self._content_header()
        if header is not None:
            partial_message = _parsed_message(
                header["author"]["role"],
                self._parser.current_content,
                channel=header.get("channel"),
                recipient=header.get("recipient"),
                name=header["author"].get("name"),
                content_type=header.get("content_type"),
            )
        complete = state["state"] == harmony.StreamState.EXPECT_START.value and self._last_token in (RETURN, CALL)
        return ParsedCompletion(self.messages, partial_message, complete)


def parse_completion(tokens, role: str | None = "assistant") -> ParsedCompletion:
    """Parse the tokens sampled after ``render_for_completion``'s prompt, or,
    with ``role=None``, messages that each start with ``<|start|>`` (e.g. a
    tool's output; see ``StreamingParser``).

    A completion cut off mid-message gives ``complete=False`` and the text so
    far in ``partial_message``; it does not raise.
    """
    parser = StreamingParser(role)
    for token in tokens:
        parser.feed(token)
    return parser.result()
