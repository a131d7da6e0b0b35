"""Generated tokens shown as text while they arrive: raw UTF-8 text, or the harmony
channels of an assistant response (final to stdout, analysis to stderr)."""

from __future__ import annotations

import codecs
import sys

from gptoss_jax.chat_format import StreamingParser


def token_bytes(tokenizer, token: int) -> bytes:
    try:
        return tokenizer.decode_single_token_bytes(token)
    except KeyError:  # ids in unused gaps of the vocabulary
        return b""


def decode_tokens(tokenizer, tokens: list[int]) -> str:
    return b"".join(token_bytes(tokenizer, t) for t in tokens).decode("utf-8", errors="replace")


class TextStream:
    """Token ids in, text out, holding back the bytes of a UTF-8 character split across tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tokens: list[int]) -> str:
        return self.decoder.decode(b"".join(token_bytes(self.tokenizer, t) for t in tokens))


class HarmonyStream:
    """Feeds one sequence's tokens to a StreamingParser; collects (and, with `echo`, prints) the
    final channel to stdout and the analysis channel to stderr. Output that does not follow the
    harmony format (a malformed token, or a message header that never ends, as from random
    weights) is shown as raw text from then on, with a note."""

    MAX_HEADER_TOKENS = 32  # real headers ("<|channel|>final<|message|>", recipients) are far shorter

    def __init__(self, tokenizer, echo: bool, show_analysis: bool):
        self.parser, self.tokenizer = StreamingParser(), tokenizer
        self.echo, self.show_analysis = echo, show_analysis
        self.final, self.analysis, self.tokens = [], [], []
        self.header_tokens, self.not_harmony = 0, False
        self.raw = TextStream(tokenizer)

    def feed(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            if self.not_harmony:
                self._print_raw([token])
                continue
            try:
                delta = self.parser.feed(token)
            except ValueError:
                delta = None
            self.header_tokens = 0 if self.parser.channel else self.header_tokens + 1
            if delta is None or self.header_tokens > self.MAX_HEADER_TOKENS:
                self._give_up_on_harmony()
            elif delta and self.parser.channel == "final":
                if self.echo and self.show_analysis and self.analysis and not self.final:
                    print(file=sys.stderr, flush=True)  # the analysis shown ends its line
                self.final.append(delta)
                if self.echo:
                    print(delta, end="", flush=True)
            elif delta and self.parser.channel == "analysis":
                self.analysis.append(delta)
                if self.echo and self.show_analysis:
                    print(delta, end="", file=sys.stderr, flush=True)

    def _give_up_on_harmony(self) -> None:
        self.not_harmony = True
        if self.echo:
            print("note: the output does not follow the harmony format; showing the raw tokens",
                  file=sys.stderr, flush=True)
        self._print_raw(self.tokens)

    def _print_raw(self, tokens: list[int]) -> None:
        text = self.raw.feed(tokens)
        if self.echo and text:
            print(text, end="", flush=True)

    @property
    def printed_anything(self) -> bool:
        return bool(self.final) or self.not_harmony
