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
(``drop_earlier_analysis``).

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

from gptoss_jax.tokenizer import CALL, N_VOCAB, RETURN, VOCABULARY_SHA256, read_vocabulary

REASONING_EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
MESSAGE_ROLES = ("user", "assistant", "tool")
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


@dataclass
class Conversation:
    """A chat: the system and developer settings plus the user/assistant/tool messages.

    The system message always comes first. The developer message is rendered
    when there are ``developer_instructions`` or ``tools``.
    """

    messages: list[Message] = field(default_factory=list)
    reasoning_effort: str = "medium"
    current_date: str | datetime.date | None = None
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    developer_instructions: str | None = None
    tools: list[FunctionTool] = field(default_factory=list)

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


def drop_earlier_analysis(messages: list[Message]) -> list[Message]:
    """Remove analysis messages outside the assistant response in progress (see module docstring)."""
    user_positions = [i for i, message in enumerate(messages) if message.role == "user"]
    response_start = user_positions[-1] + 1 if user_positions else 0
    in_progress = messages[response_start:]
    if any(message.role == "assistant" and message.channel == "final" for message in in_progress):
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


def _from_harmony_message(message: harmony.Message) -> Message:
    text = "".join(part.text for part in message.content if isinstance(part, harmony.TextContent))
    return Message(
        message.author.role.value,
        text,
        channel=message.channel,
        recipient=message.recipient,
        name=message.author.name,
        content_type=message.content_type,
    )


def _to_harmony_conversation(conversation: Conversation, messages: list[Message]) -> harmony.Conversation:
    system = harmony.SystemContent(
        model_identity=conversation.model_identity,
        reasoning_effort=harmony.ReasoningEffort(conversation.reasoning_effort.lower().capitalize()),
        knowledge_cutoff=conversation.knowledge_cutoff,
    )
    date = conversation.current_date
    if date is not None:
        system = system.with_conversation_start_date(date.isoformat() if isinstance(date, datetime.date) else date)
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


def render_for_completion(conversation: Conversation) -> list[int]:
    """Prompt token ids for the next assistant turn; they end with ``<|start|>assistant``.

    Earlier chain of thought is dropped by ``drop_earlier_analysis``.
    """
    _check_conversation(conversation)
    harmony_conversation = _to_harmony_conversation(conversation, drop_earlier_analysis(conversation.messages))
    with _rust_errors_as_value_error("rendering the conversation failed", "Check the conversation's messages."):
        return harmony_encoding().render_conversation_for_completion(
            harmony_conversation,
            harmony.Role.ASSISTANT,
            harmony.RenderConversationConfig(auto_drop_analysis=False),
        )


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


class StreamingParser:
    """Parses an assistant completion one sampled token at a time.

    Feed it the tokens sampled after ``render_for_completion``'s prompt (they
    start with ``<|channel|>``). ``feed`` returns the text the token added to
    the current message ('' for header tokens, message ends, and bytes of an
    unfinished UTF-8 character); ``channel`` and ``recipient`` describe the
    message being generated. After a ``ValueError`` the parser is unusable.
    """

    def __init__(self):
        self._parser = harmony.StreamableParser(harmony_encoding(), harmony.Role.ASSISTANT)
        self._token_count = 0
        self._last_token: int | None = None
        self.delta = ""

    def feed(self, token: int) -> str:
        token_id = _check_token_id(token, self._token_count)
        with _rust_errors_as_value_error(
            f"token {token_id} at position {self._token_count} does not fit the harmony format",
            "Pass only the tokens sampled after render_for_completion's prompt.",
        ):
            self._parser.process(token_id)
        self._token_count += 1
        self._last_token = token_id
        self.delta = self._parser.last_content_delta or ""
        return self.delta

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
        if state["state"] == harmony.StreamState.CONTENT.value:
            header = state["header"]
            partial_message = Message(
                header["author"]["role"],
                self._parser.current_content,
                channel=header.get("channel"),
                recipient=header.get("recipient"),
                name=header["author"].get("name"),
                content_type=header.get("content_type"),
            )
        complete = state["state"] == harmony.StreamState.EXPECT_START.value and self._last_token in (RETURN, CALL)
        return ParsedCompletion(self.messages, partial_message, complete)


def parse_completion(tokens) -> ParsedCompletion:
    """Parse the tokens sampled after ``render_for_completion``'s prompt.

    A completion cut off mid-message gives ``complete=False`` and the text so
    far in ``partial_message``; it does not raise.
    """
    parser = StreamingParser()
    for token in tokens:
        parser.feed(token)
    return parser.result()
