"""`python -m gptoss_jax.chat`: an interactive multi-turn chat in the harmony format.

Each turn renders the whole conversation (earlier chain of thought dropped, see chat_format),
generates until `<|return|>` / `<|call|>` with the same engine as `gptoss_jax.generate`, streams
the final channel, and keeps the parsed assistant messages for the next turn.
"""

from __future__ import annotations

import argparse
import sys

from gptoss_jax import chat_format
from gptoss_jax.cli import (
    COMPILATION_CACHE_NOTE,
    add_model_arguments,
    add_sampling_arguments,
    check_positions,
    check_sampling_arguments,
    cli,
    finish_harmony_stream,
    load_model,
    model_source,
)
from gptoss_jax.engine import generate
from gptoss_jax.python_tool import PythonTool, SandboxUnavailable, is_python_call
from gptoss_jax.streaming import HarmonyStream, decode_tokens
from gptoss_jax.tokenizer import get_tokenizer

COMMANDS = ("commands: /reset (forget the conversation), /effort low|medium|high, /quit (or Ctrl-D); "
            "Ctrl-C stops an answer")
MAX_TOOL_CALLS = 16  # python calls answered within one turn


class ConversationFull(Exception):
    """The conversation leaves no room for an answer in the model's positions."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_jax.chat",
        description="Chat with gpt-oss in JAX: one user message per line on stdin. " + COMMANDS,
        epilog=COMPILATION_CACHE_NOTE)
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=1024)
    parser.add_argument("--developer", help="developer instructions (the harmony developer message)")
    parser.add_argument("--date", help="current date for the system message, e.g. 2026-11-23")
    parser.add_argument("--python-tool", action="store_true",
                        help="let the model run Python code while it reasons, in a sandbox: no network, file "
                             "writes only in a temporary directory, time and memory limits")
    parser.add_argument("--python-tool-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="with --python-tool: stop each program after this long (default 30)")
    parser.add_argument("--python-tool-unsandboxed", action="store_true",
                        help="with --python-tool: run the code even where the network cannot be blocked or file "
                             "writes cannot be confined")
    return parser


class Chat:
    """The conversation state and one `turn` per user message."""

    def __init__(self, model, tokenizer, args, echo: bool = True):
        self.model, self.tokenizer, self.args, self.echo = model, tokenizer, args, echo
        self.reasoning_effort = args.reasoning_effort
        self.messages: list[chat_format.Message] = []
        self.turns = 0
        self.python_tool = python_tool_from_args(args)

    def conversation(self) -> chat_format.Conversation:
        return chat_format.Conversation(list(self.messages), reasoning_effort=self.reasoning_effort,
                                        current_date=self.args.date,
                                        developer_instructions=self.args.developer,
                                        builtin_tools=[self.python_tool.builtin_tool()] if self.python_tool else [])

    def turn(self, text: str) -> str:
        """Answers one user message; returns the final-channel text (or the raw text when the
        model's output is not harmony). With --python-tool, each call to python is run, its
        output appended as a tool message, and the model continues the same turn from there.
        Ctrl-C stops the answer and keeps what was said so far, as --max-new-tokens does; a
        message for which the model's positions leave no room is dropped with a note."""
        start = len(self.messages)
        self.messages.append(chat_format.user(text))
        try:
            return self._answer()
        except KeyboardInterrupt:
            if self.echo:
                print("note: answer interrupted (Ctrl-C); the conversation keeps what was said so far",
                      file=sys.stderr, flush=True)
            return self._answer_so_far()
        except ConversationFull as full:
            del self.messages[start:]
            if self.echo:
                print(f"note: {full}", file=sys.stderr, flush=True)
            return ""

    def _answer(self) -> str:
        for _ in range(MAX_TOOL_CALLS + 1):
            parsed, tokens = self._generate()
            if parsed is None:  # not harmony
                return self.messages[-1].content
            call = parsed.tool_call
            if self.python_tool is None or not is_python_call(call):
                break
            output = self.python_tool.respond(call)
            if self.echo and self.args.show_analysis:
                print(f"\n[python]\n{call.content}\n[output]\n{output.content}", file=sys.stderr, flush=True)
            self.messages.append(output)
        if not parsed.complete and self.echo:
            print(f"note: the answer was cut off after {len(tokens)} tokens (--max-new-tokens)", file=sys.stderr)
        answer = parsed.final_text
        if answer is None and self.echo:
            print("note: the model produced no final-channel message", file=sys.stderr)
        return answer or ""

    def _answer_so_far(self) -> str:
        """The text of the last answer since the last user message ('' if none)."""
        for message in reversed(self.messages):
            if message.role == "user":
                break
            if message.role == "assistant" and message.channel == "final":
                return message.content
        return ""

    def _generate(self):
        """Samples one assistant completion for the conversation so far and appends its
        messages, also when interrupted; returns the parsed completion (None when the output
        is not harmony) and its tokens."""
        prompt = chat_format.render_for_completion(self.conversation())
        positions = self.model.config.max_position_embeddings
        if len(prompt) >= positions:
            raise ConversationFull(f"the conversation ({len(prompt)} tokens) leaves no room for an answer in the "
                                   f"model's {positions} positions; the message is dropped; /reset to start a new one")
        stream = HarmonyStream(self.tokenizer, echo=self.echo, show_analysis=self.args.show_analysis)
        a = self.args
        seed = (a.seed + self.turns) % 2**32
        self.turns += 1
        try:
            generate(self.model, [prompt], max_new_tokens=a.max_new_tokens,
                     max_len=min(len(prompt) + a.max_new_tokens, positions), temperature=a.temperature, top_p=a.top_p,
                     top_k=a.top_k, seed=seed, stop_tokens=None, on_tokens=lambda new: stream.feed(new[0]))
        finally:  # what was said so far, also when interrupted
            parsed = self._keep(stream)
        return parsed, stream.tokens

    def _keep(self, stream: HarmonyStream):
        """Appends the messages of a (possibly cut off) completion; returns it parsed (None
        when it is not harmony)."""
        harmony = finish_harmony_stream(stream)
        if self.echo and stream.printed_anything:
            print(flush=True)
        if not harmony:
            self.messages.append(chat_format.assistant(decode_tokens(self.tokenizer, stream.tokens)))
            return None
        parsed = stream.parser.result()
        self.messages.extend(parsed.messages)
        if parsed.partial_message is not None:  # cut off by --max-new-tokens or Ctrl-C: keep what was said
            self.messages.append(parsed.partial_message)
        return parsed

    def command(self, line: str) -> bool:
        """Handles a /command; returns False to quit."""
        name, _, value = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.messages.clear()
            print("(conversation cleared)", file=sys.stderr)
        elif name == "/effort" and value.strip() in chat_format.REASONING_EFFORTS:
            self.reasoning_effort = value.strip()
            print(f"(reasoning effort: {self.reasoning_effort})", file=sys.stderr)
        else:
            print(f"unknown command {line!r}; {COMMANDS}", file=sys.stderr)
        return True


def python_tool_from_args(args) -> PythonTool | None:
    if not args.python_tool:
        return None
    try:
        return PythonTool(timeout_seconds=args.python_tool_timeout, allow_unsandboxed=args.python_tool_unsandboxed)
    except SandboxUnavailable as error:
        raise SandboxUnavailable(f"--python-tool: {error} In the chat, pass --python-tool-unsandboxed.") from None


def run(args) -> int:
    check_sampling_arguments(args)
    chat = Chat(None, get_tokenizer(), args)  # a machine that cannot sandbox the tool fails before the model loads
    check_positions(model_source(args)[1], len(chat_format.render_for_completion(chat.conversation())),
                    args.max_new_tokens, "the system prompt")
    chat.model = load_model(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"gptoss-jax chat. {COMMANDS}", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        chat.turn(line)


def main(argv=None) -> int:
    return cli(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
