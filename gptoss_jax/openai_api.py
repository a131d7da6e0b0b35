"""The OpenAI HTTP API over harmony: request schemas, requests rendered as harmony prompts,
and completions parsed back into OpenAI chat completions, Responses and their stream events.

Requests: `ChatCompletionRequest` (/v1/chat/completions) and `ResponsesRequest` (/v1/responses)
refuse fields they do not know, so a misspelt setting never goes unnoticed; fields of OpenAI's
API that this server cannot honour are refused when set to anything but their default.
`chat_prompt` and `responses_prompt` turn a request into a `Prompt`: the harmony tokens for
the next assistant turn (system and developer messages from the settings, instructions and
tools; the history with reasoning, tool calls and tool results) plus the tokens the completion
is forced to begin with (`tool_choice` "required" or a named function, `continue_final_message`).

Completions: `HarmonyOutput` reads the sampled tokens as they arrive (on `chat_format`'s
StreamingParser) and reports assistant messages as reasoning, content or tool calls. It
accepts the forms models emit off the harmony spec: a tool call on the analysis channel, a
bare function name as recipient, the recipient in the role header, a message without channel
(content), plain text with no header at all (content). A completion that breaks the format
ends with finish reason "incomplete" and keeps what was parsed before; it never raises.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gptoss_jax import chat_format
from gptoss_jax.chat_format import Conversation, FunctionTool, Message, StreamingParser
from gptoss_jax.streaming import TextStream
from gptoss_jax.tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START, get_tokenizer


class APIError(Exception):
    """An error reported to the client as OpenAI's JSON error body with HTTP `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# ----------------------------------------------------------------------------------------
# Request schemas
# ----------------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Effort = Literal["low", "medium", "high"]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
MaxTokens = Annotated[int, Field(ge=1)]


class FunctionDefinition(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class ChatNamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(Strict):
    name: str
    arguments: str | dict[str, Any]


class ChatToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(BaseModel):
    """A part of a message's content; only text parts are taken (checked in `text_of`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # the reasoning of an earlier answer (vLLM's name)
    reasoning: str | None = None  # the same, under the other name clients use
    # Fields of the assistant messages this server returns, which clients send back as they got them.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(Strict):
    type: Literal["text"]


class ChatCompletionRequest(Strict):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChatNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Effort | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Extensions (as in vLLM)
    return_token_ids: bool = False
    continue_final_message: bool = False


class InputText(Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None


class ReasoningText(Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: None = None
    status: str | None = None


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None


InputItem = Annotated[Union[InputMessage, ReasoningItem, FunctionCallItem, FunctionCallOutputItem],
                      Field(discriminator="type")]


class ResponsesTool(Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedToolChoice(Strict):
    type: Literal["function"]
    name: str


class ReasoningSettings(Strict):
    effort: Effort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted; gpt-oss writes no summaries
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextSettings(Strict):
    format: ResponseFormat | None = None
    verbosity: None = None


class ResponsesRequest(Strict):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningSettings | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_output_tokens: MaxTokens | None = None
    stream: bool = False
    store: bool | None = None  # accepted; nothing is stored
    previous_response_id: None = None  # refused: nothing is stored
    background: Literal[False] | None = None
    include: Annotated[list[str], Field(max_length=0)] | None = None
    truncation: Literal["disabled"] | None = None
    text: TextSettings | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def messages_have_a_type(cls, body: Any) -> Any:
        """Input messages may leave out "type"; the items' union is told apart by it."""
        if isinstance(body, dict) and isinstance(body.get("input"), list):
            body = dict(body, input=[dict(item, type="message") if isinstance(item, dict) and "type" not in item
                                     else item for item in body["input"]])
        return body


# ----------------------------------------------------------------------------------------
# Requests -> harmony prompts
# ----------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """The tokens to prefill for one request: `tokens` ends with the assistant's turn header
    and `prefix`, the tokens its completion is forced to begin with."""

    tokens: list[int]
    prefix: list[int]


def text_of(content, where: str) -> str:
    """A message's content as text: a string, or the concatenated text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type not in ("text", "input_text", "output_text") or part.text is None:
            raise invalid(f"{where}[{i}] is a '{part.type}' part; this server takes text only", f"{where}[{i}]")
        texts.append(part.text)
    return "".join(texts)


def _plain(text: str) -> list[int]:
    """Text as tokens, special-token names included as plain text."""
    return get_tokenizer().encode(text, disallowed_special=())


def final_prefix(text: str) -> list[int]:
    """Completion tokens that open a final-channel message with `text` (as harmony renders it)."""
    return [CHANNEL, *_plain("final"), MESSAGE, *_plain(text)]


def tool_call_prefix(name: str | None) -> list[int]:
    """Completion tokens that open a call of function `name` (None: of some function, whose name
    the model completes), in the header form the model writes."""
    if name is None:
        return [CHANNEL, *_plain("commentary to=functions")]
    return [CHANNEL, *_plain(f"commentary to=functions.{name} "), CONSTRAIN, *_plain("json"), MESSAGE]


def normalised_arguments(arguments: str | dict) -> str | None:
    """Tool-call arguments as a JSON object text; None when they are not one. Accepts an empty
    text (no arguments: "{}") and a JSON object encoded twice (a JSON string holding it)."""
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    if not arguments.strip():
        return "{}"
    try:
        value = json.loads(arguments)
        if isinstance(value, str):
            value = json.loads(value)
    except json.JSONDecodeError:
        return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def function_name(recipient: str) -> str:
    return recipient.removeprefix("functions.")


class History:
    """Collects harmony messages and developer instructions from a request's history."""

    def __init__(self):
        self.messages: list[Message] = []
        self.instructions: list[str] = []
        self.calls: dict[str, str] = {}  # tool call id -> function name

    def assistant(self, where: str, content: str = "", reasoning: str | None = None, calls=()) -> None:
        if reasoning:
            self.messages.append(chat_format.assistant(reasoning, channel="analysis"))
        if content:
            # Text beside tool calls is the preamble gpt-oss writes on the commentary channel.
            self.messages.append(chat_format.assistant(content, channel="commentary" if calls else "final"))
        for i, (call_id, name, arguments) in enumerate(calls):
            normalised = normalised_arguments(arguments)
            if normalised is None:
                raise invalid(f"{where}: the arguments of tool call {i} are not a JSON object: {arguments!r}", where)
            self.calls[call_id] = name
            self.messages.append(chat_format.tool_call(f"functions.{name}", normalised))

    def render(self, *, effort: str | None, current_date: str | None, tools: list[FunctionTool], tool_choice: str,
               function: str | None = None, prefix: list[int] = ()) -> Prompt:
        """The prompt; `tool_choice` "none" (no tools offered), "auto", "required" (the answer
        starts with a call) or "function" (a call of `function`)."""
        if tool_choice in ("required", "function") and not tools:
            raise invalid("tool_choice asks for a tool call but no tools are given", "tool_choice")
        if tool_choice == "none":
            tools = []
        elif tool_choice == "required":
            prefix = tool_call_prefix(None)
        elif tool_choice == "function":
            if function not in [tool.name for tool in tools]:
                raise invalid(f"tool_choice names function {function!r}, which is not among the tools", "tool_choice")
            prefix = tool_call_prefix(function)
        try:
            conversation = Conversation(self.messages, reasoning_effort=effort or "medium", current_date=current_date,
                                        developer_instructions="\n\n".join(self.instructions) or None, tools=tools)
            tokens = chat_format.render_for_completion(conversation)
        except ValueError as error:
            raise invalid(str(error)) from None
        return Prompt(tokens + list(prefix), list(prefix))


def function_tools(specs: list[dict]) -> list[FunctionTool]:
    tools = []
    for i, spec in enumerate(specs):
        try:
            tools.append(FunctionTool.from_dict(spec))
        except ValueError as error:
            raise invalid(str(error), f"tools[{i}]") from None
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise invalid(f"tool names must be unique, got {names}", "tools")
    return tools


def chat_prompt(request: ChatCompletionRequest, current_date: str | None = None) -> Prompt:
    history = History()
    prefix: list[int] = []
    last = len(request.messages) - 1
    if request.continue_final_message and request.messages[last].role != "assistant":
        raise invalid("continue_final_message needs the last message to be the assistant's", "messages")
    if request.continue_final_message and request.tool_choice not in (None, "auto", "none"):
        raise invalid("continue_final_message cannot be combined with a forced tool_choice", "tool_choice")
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        text = text_of(message.content, f"{where}.content")
        if message.role in ("system", "developer"):
            history.instructions.append(text)
        elif message.role == "user":
            history.messages.append(chat_format.user(text))
        elif message.role == "tool":
            if message.tool_call_id is None and message.name is None:
                raise invalid(f"{where}: a tool message needs the tool_call_id of the call it answers", where)
            name = history.calls.get(message.tool_call_id) or (message.name and function_name(message.name))
            if name is None:
                raise invalid(f"{where}: tool_call_id {message.tool_call_id!r} matches no earlier tool call", where)
            history.messages.append(chat_format.tool_result(f"functions.{name}", text))
        else:
            reasoning = message.reasoning_content or message.reasoning
            calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
            if request.continue_final_message and i == last:
                if calls:
                    raise invalid("continue_final_message continues text, not tool calls", where)
                history.assistant(where, reasoning=reasoning)
                prefix = final_prefix(text)
            else:
                history.assistant(where, text, reasoning, calls)
    tools = function_tools([tool.function.model_dump(exclude_none=True) for tool in request.tools or []])
    choice = request.tool_choice
    named = isinstance(choice, ChatNamedToolChoice)
    return history.render(effort=request.reasoning_effort, current_date=current_date, tools=tools,
                          tool_choice="function" if named else choice or "auto",
                          function=choice.function.name if named else None, prefix=prefix)


def responses_prompt(request: ResponsesRequest, current_date: str | None = None) -> Prompt:
    history = History()
    if request.instructions:
        history.instructions.append(request.instructions)
    items = [InputMessage(role="user", content=request.input)] if isinstance(request.input, str) else request.input
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, InputMessage):
            text = text_of(item.content, f"{where}.content")
            if item.role in ("system", "developer"):
                history.instructions.append(text)
            elif item.role == "user":
                history.messages.append(chat_format.user(text))
            else:
                history.assistant(where, text)
        elif isinstance(item, ReasoningItem):
            parts = item.content if item.content else item.summary
            history.assistant(where, reasoning="".join(part.text for part in parts))
        elif isinstance(item, FunctionCallItem):
            history.assistant(where, calls=[(item.call_id, item.name, item.arguments)])
        else:
            output = text_of(item.output, f"{where}.output")
            name = history.calls.get(item.call_id)
            if name is None:
                raise invalid(f"{where}: call_id {item.call_id!r} matches no earlier function_call item", where)
            history.messages.append(chat_format.tool_result(f"functions.{name}", output))
    tools = function_tools([tool.model_dump(exclude_none=True, exclude={"type"}) for tool in request.tools or []])
    effort = request.reasoning.effort if request.reasoning else None
    choice = request.tool_choice
    named = isinstance(choice, ResponsesNamedToolChoice)
    return history.render(effort=effort, current_date=current_date, tools=tools,
                          tool_choice="function" if named else choice or "auto", function=choice.name if named else None)


# ----------------------------------------------------------------------------------------
# Completions -> messages
# ----------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass(eq=False)
class OutputMessage:
    """One assistant message of a completion: "reasoning" (the analysis channel), "content"
    (final or commentary channel, or no channel) or "tool_call" (any message to a recipient)."""

    kind: str
    text: str = ""
    name: str | None = None  # tool_call: the function
    arguments: str | None = None  # tool_call: the arguments as a JSON object text
    complete: bool = False  # False while it runs, and for a message cut off at the end
    id: str = field(init=False)
    call_id: str | None = field(init=False, default=None)

    def __post_init__(self):
        self.id = new_id({"reasoning": "rs", "content": "msg", "tool_call": "fc"}[self.kind])
        if self.kind == "tool_call":
            self.call_id = new_id("call")


@dataclass
class Event:
    """What a token (or a few) changed: `kind` "start" or "end" of `message`, or "delta" with
    the `text` added to it. Tool calls are reported whole: "start" and "end" together."""

    kind: str
    message: OutputMessage
    text: str = ""


class StopStrings:
    """Finds stop strings in text that arrives in pieces, holding back a tail that could be
    the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is certainly before any stop string, and whether one was found."""
        text = self.held + text
        found = [text.find(stop) for stop in self.stops if stop in text]
        if found:
            self.held = ""
            return text[:min(found)], True
        keep = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


STRUCTURE_TOKENS = (CHANNEL, MESSAGE, CONSTRAIN)
MESSAGE_END_TOKENS = (END, RETURN, CALL)
MAX_HEADER_TOKENS = 32  # real headers ("<|channel|>final<|message|>", tool recipients) are far shorter


class HarmonyOutput:
    """An assistant completion read token by token into `messages`, with `feed` returning the
    events each batch of tokens caused. `prefix`: tokens the completion was forced to begin
    with (part of the prompt; their text is not reported). `stop`: stop strings, looked for in
    the content (not in the reasoning): at one, the content ends before it and `done` is set.

    `finish(reason)` closes the completion given the engine's finish reason ("stop": a stop
    token, "length": the token limit) and sets `finish_reason`: "stop", "tool_calls",
    "length", or "incomplete" when the tokens broke the harmony format (`error` says how)."""

    def __init__(self, prefix: list[int] = (), stop: list[str] = ()):
        self.parser = StreamingParser()
        self.messages: list[OutputMessage] = []
        self.current: OutputMessage | None = None
        self.header: list[int] = []
        self.plain: TextStream | None = None  # set while reading a message that has no header
        self.stop = StopStrings(list(stop)) if stop else None
        self.done = False  # no later token matters: completed, stopped, or broken
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.reasoning_tokens = 0
        self.role_in_header = False  # the header being read started with <|start|> and a role
        self.reporting, self.pending = False, []
        self.pending = self.feed(list(prefix))  # the prefix's text is the client's own: not reported
        self.reporting = True

    @property
    def tool_calls(self) -> list[OutputMessage]:
        return [m for m in self.messages if m.kind == "tool_call"]

    def text(self, kind: str) -> str | None:
        """The text of every message of `kind` ("reasoning" or "content"), joined by a blank
        line; None when there is no such message."""
        texts = [m.text for m in self.messages if m.kind == kind]
        return "\n\n".join(t for t in texts if t) if texts else None

    def feed(self, tokens: list[int]) -> list[Event]:
        events, self.pending = self.pending, []
        for token in tokens:
            if self.done:
                break
            if self.current is not None and self.current.kind == "reasoning":
                self.reasoning_tokens += 1
            if self.plain is not None:
                self._plain_token(token, events)
            else:
                self._harmony_token(token, events)
        return events

    def finish(self, reason: str) -> list[Event]:
        """Closes the completion after the engine stopped for `reason`; returns the last events."""
        events, self.pending = self.pending, []
        if self.finish_reason is not None:
            return events
        if not self.done and self.current is None and self.header and not self._structured_header():
            self._start_plain(events)  # a short answer with no header, cut off
        if self.current is not None:
            self._end(events, complete=False)
        if self.error is not None:
            self.finish_reason = "incomplete"
        elif self.done or reason == "stop":
            self.finish_reason = "tool_calls" if self.tool_calls else "stop"
        else:
            self.finish_reason = "length"
        self.done = True
        return events

    # -- token handling -------------------------------------------------------------------

    def _harmony_token(self, token: int, events: list[Event]) -> None:
        try:
            delta = self.parser.feed(token)
        except ValueError as error:
            self._break(events, str(error))
            return
        # The parser's own state is not asked for: reading it costs ~100 us a token.
        if self.current is not None:  # in a message's content
            if delta:
                self._text(events, delta)
            if token in MESSAGE_END_TOKENS and self.current is not None:
                self._end(events, complete=True)
                self.done = token in (RETURN, CALL)
            return
        if token == MESSAGE:  # the header is complete
            self.header, self.role_in_header = [], False
            self._start(events, self._kind(), function_name(self.parser.recipient or ""))
            return
        if token == START:
            self.header, self.role_in_header = [], True
            return
        self.header.append(token)
        ended = token in MESSAGE_END_TOKENS
        if not self._structured_header():
            if ended or len(self.header) > MAX_HEADER_TOKENS:
                self._start_plain(events)
        elif ended or len(self.header) > 2 * MAX_HEADER_TOKENS:
            self._break(events, "a message header that never reaches <|message|>")

    def _plain_token(self, token: int, events: list[Event]) -> None:
        if token not in MESSAGE_END_TOKENS:
            self._text(events, self.plain.feed([token]))
            return
        self._end(events, complete=True)
        self.plain = None
        if token == END:  # more messages may follow, each starting with <|start|>
            self.parser = StreamingParser(role=None)
        else:
            self.done = True

    def _start_plain(self, events: list[Event]) -> None:
        """The header so far is text with no harmony structure: a message without header,
        read as content up to its end token."""
        header, self.header = self.header, []
        end = header[-1] if header[-1] in MESSAGE_END_TOKENS else None
        if end is not None:
            header = header[:-1]
        self.plain = TextStream(get_tokenizer())
        text = self.plain.feed(header)
        if self.role_in_header:
            text = text.removeprefix("assistant")
        self._start(events, "content")
        self._text(events, text)
        if end is not None:
            self._plain_token(end, events)

    def _structured_header(self) -> bool:
        return any(t in STRUCTURE_TOKENS for t in self.header)

    def _kind(self) -> str:
        if self.parser.recipient is not None:
            return "tool_call"
        return "reasoning" if self.parser.channel == "analysis" else "content"

    # -- events ---------------------------------------------------------------------------

    def _start(self, events: list[Event], kind: str, name: str | None = None) -> None:
        self.current = OutputMessage(kind, name=name if kind == "tool_call" else None)
        if kind != "tool_call":  # tool calls are reported once their arguments are complete
            self.messages.append(self.current)
            events.append(Event("start", self.current))

    def _text(self, events: list[Event], text: str) -> None:
        message = self.current
        if message.kind == "content" and self.stop is not None:
            text, stopped = self.stop.feed(text)
            if stopped:
                self._append(events, text)
                self._end(events, complete=True)
                self.done = True
                return
        self._append(events, text)

    def _append(self, events: list[Event], text: str) -> None:
        if text and self.reporting:
            self.current.text += text
            if self.current.kind != "tool_call":
                events.append(Event("delta", self.current, text))

    def _end(self, events: list[Event], complete: bool) -> None:
        message, self.current = self.current, None
        if message.kind == "content" and self.stop is not None and not self.done:
            held = self.stop.flush()
            if held and self.reporting:
                message.text += held
                events.append(Event("delta", message, held))
        message.complete = complete
        if message.kind != "tool_call":
            events.append(Event("end", message))
            return
        if not complete:
            return  # a call cut off in its arguments is no call
        message.arguments = normalised_arguments(message.text)
        if message.arguments is None:
            self._break(events, f"the call of {message.name} has arguments that are not a JSON object: "
                                f"{message.text[:200]!r}")
            return
        self.messages.append(message)
        events += [Event("start", message), Event("end", message)]

    def _break(self, events: list[Event], error: str) -> None:
        if self.current is not None:
            self._end(events, complete=False)
        self.error = self.error or error
        self.done = True


# ----------------------------------------------------------------------------------------
# Messages -> OpenAI chat completions
# ----------------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int

    def chat(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}

    def responses(self) -> dict:
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": self.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def chat_tool_call(message: OutputMessage, index: int | None = None) -> dict:
    call = {"id": message.call_id, "type": "function", "function": {"name": message.name, "arguments": message.arguments}}
    return call if index is None else {"index": index, **call}


def chat_completion(*, id: str, created: int, model: str, output: HarmonyOutput, usage: Usage,
                    prompt_token_ids: list[int] | None = None, token_ids: list[int] | None = None) -> dict:
    message = {"role": "assistant", "content": output.text("content"), "refusal": None,
               "reasoning_content": output.text("reasoning")}
    if output.tool_calls:
        message["tool_calls"] = [chat_tool_call(m) for m in output.tool_calls]
    choice = {"index": 0, "message": message, "finish_reason": output.finish_reason, "logprobs": None}
    body = {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage.chat(), "system_fingerprint": None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
        body["prompt_token_ids"] = prompt_token_ids
    return body


class ChatChunks:
    """The `chat.completion.chunk` objects of a streamed chat completion, from HarmonyOutput
    events: reasoning as `reasoning_content` deltas, content as `content` deltas (messages
    joined by a blank line, as in the whole completion), each tool call whole once complete."""

    def __init__(self, *, id: str, created: int, model: str, include_usage: bool, return_token_ids: bool):
        self.id, self.created, self.model = id, created, model
        self.include_usage, self.return_token_ids = include_usage, return_token_ids
        self.written: dict[str, OutputMessage | None] = {"reasoning": None, "content": None}
        self.calls = 0

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason, **extra}
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [choice], "system_fingerprint": None}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first(self, prompt_token_ids: list[int]) -> dict:
        chunk = self.chunk({"role": "assistant", "content": ""})
        if self.return_token_ids:
            chunk["prompt_token_ids"] = prompt_token_ids
        return chunk

    def deltas(self, events: list[Event], token_ids: list[int]) -> list[dict]:
        """The chunks for the events of one batch of tokens (consecutive text of one field
        merged); with return_token_ids the tokens ride on the first (or on an empty one)."""
        deltas: list[dict] = []
        for event in events:
            message = event.message
            if message.kind == "tool_call":
                if event.kind == "end":
                    deltas.append({"tool_calls": [chat_tool_call(message, self.calls)]})
                    self.calls += 1
                continue
            if event.kind != "delta":
                continue
            field = "reasoning_content" if message.kind == "reasoning" else "content"
            text = event.text
            previous = self.written[message.kind]
            if previous is not None and previous is not message:
                text = "\n\n" + text
            self.written[message.kind] = message
            if deltas and set(deltas[-1]) == {field}:
                deltas[-1][field] += text
            else:
                deltas.append({field: text})
        if self.return_token_ids and token_ids:
            deltas = deltas or [{}]
            return [self.chunk(d, token_ids=token_ids if i == 0 else []) for i, d in enumerate(deltas)]
        return [self.chunk(d) for d in deltas]

    def last(self, finish_reason: str, usage: Usage) -> list[dict]:
        chunks = [self.chunk({}, finish_reason)]
        if self.include_usage:
            chunks.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": [], "usage": usage.chat(), "system_fingerprint": None})
        return chunks


# ----------------------------------------------------------------------------------------
# Messages -> OpenAI Responses
# ----------------------------------------------------------------------------------------


def response_item(message: OutputMessage) -> dict:
    status = "completed" if message.complete else "incomplete"
    if message.kind == "reasoning":
        return {"type": "reasoning", "id": message.id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": message.text}]}
    if message.kind == "content":
        return {"type": "message", "id": message.id, "role": "assistant", "status": status,
                "content": [output_text(message.text)]}
    return {"type": "function_call", "id": message.id, "call_id": message.call_id, "name": message.name,
            "arguments": message.arguments, "status": status}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_status(output: HarmonyOutput | None) -> tuple[str, dict | None]:
    if output is None or output.finish_reason is None:
        return "in_progress", None
    if output.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if output.finish_reason == "incomplete":
        return "incomplete", {"reason": "invalid_output"}
    return "completed", None


def response(*, id: str, created_at: int, model: str, request: ResponsesRequest, output: HarmonyOutput | None,
             usage: Usage | None) -> dict:
    """A Response object; `output` None (or unfinished) for one still in progress."""
    status, incomplete_details = response_status(output)
    choice = request.tool_choice
    return {
        "id": id, "object": "response", "created_at": created_at, "model": model, "status": status,
        "error": None, "incomplete_details": incomplete_details, "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens, "metadata": request.metadata or {},
        "output": [response_item(m) for m in output.messages] if status != "in_progress" else [],
        "parallel_tool_calls": request.parallel_tool_calls is not False, "previous_response_id": None,
        "reasoning": {"effort": (request.reasoning.effort if request.reasoning else None) or "medium", "summary": None},
        "store": False, "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
        "tools": [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                   "strict": t.strict} for t in request.tools or []],
        "top_p": 1.0 if request.top_p is None else request.top_p, "truncation": "disabled",
        "usage": usage.responses() if usage is not None else None, "user": request.user,
    }


class ResponseEvents:
    """The server-sent events of a streamed Response (`response.created` ... `response.completed`
    or `response.incomplete`), numbered in order."""

    def __init__(self, **response_fields):
        self.fields = response_fields
        self.sequence = 0
        self.index: dict[OutputMessage, int] = {}

    def event(self, type: str, **fields) -> dict:
        event = {"type": type, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def first(self) -> list[dict]:
        body = response(output=None, usage=None, **self.fields)
        return [self.event("response.created", response=body), self.event("response.in_progress", response=body)]

    def events(self, events: list[Event]) -> list[dict]:
        out = []
        for event in events:
            message = event.message
            if event.kind == "start":
                self.index[message] = len(self.index)
            where = {"item_id": message.id, "output_index": self.index[message]}
            if message.kind == "tool_call":
                if event.kind == "start":
                    item = dict(response_item(message), arguments="", status="in_progress")
                    out.append(self.event("response.output_item.added", output_index=where["output_index"], item=item))
                else:
                    out += [self.event("response.function_call_arguments.delta", **where, delta=message.arguments),
                            self.event("response.function_call_arguments.done", **where, name=message.name,
                                       arguments=message.arguments),
                            self.event("response.output_item.done", output_index=where["output_index"],
                                       item=response_item(message))]
                continue
            reasoning = message.kind == "reasoning"
            part = {"type": "reasoning_text", "text": ""} if reasoning else output_text("")
            if event.kind == "start":
                item = dict(response_item(message), status="in_progress", content=[])
                out += [self.event("response.output_item.added", output_index=where["output_index"], item=item),
                        self.event("response.content_part.added", **where, content_index=0, part=part)]
            elif event.kind == "delta":
                kind = "response.reasoning_text.delta" if reasoning else "response.output_text.delta"
                extra = {} if reasoning else {"logprobs": []}
                out.append(self.event(kind, **where, content_index=0, delta=event.text, **extra))
            else:
                kind, extra = (("response.reasoning_text.done", {}) if reasoning
                               else ("response.output_text.done", {"logprobs": []}))
                out += [self.event(kind, **where, content_index=0, text=message.text, **extra),
                        self.event("response.content_part.done", **where, content_index=0,
                                   part=dict(part, text=message.text)),
                        self.event("response.output_item.done", output_index=where["output_index"],
                                   item=response_item(message))]
        return out

    def last(self, output: HarmonyOutput, usage: Usage) -> dict:
        body = response(output=output, usage=usage, **self.fields)
        return self.event("response.completed" if body["status"] == "completed" else "response.incomplete",
                          response=body)
