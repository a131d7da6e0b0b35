"""`python -m gptoss_jax.generate`: generate text for one prompt or a batch, streamed as it
arrives. The module is also callable: `gptoss_jax.generate(model, prompts, ...)` is
`gptoss_jax.engine.generate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

from gptoss_jax.chat_format import Conversation, render_for_completion, user
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
from gptoss_jax.streaming import HarmonyStream, TextStream, decode_tokens
from gptoss_jax.tokenizer import ENDOFTEXT, get_tokenizer

__all__ = ["generate", "main"]

EXAMPLE_PROMPT = "Why is the sky blue?"  # answered when no prompt is given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_jax.generate",
        description="Generate text with gpt-oss in JAX (harmony chat format unless --raw).",
        epilog=COMPILATION_CACHE_NOTE)
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append",
                        help=f"prompt text; repeat for a batch (with neither --prompt nor --prompt-file: the example "
                             f"prompt {EXAMPLE_PROMPT!r})")
    parser.add_argument("--prompt-file", help="UTF-8 text file with one prompt per line (blank lines are skipped)")
    add_sampling_arguments(parser, max_new_tokens=64)
    parser.add_argument("--raw", action="store_true",
                        help="no chat format: encode the prompt text as is and stop on <|endoftext|>")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (prompt_tokens, tokens, text)")
    parser.add_argument("--stats", action="store_true", help="print timing and tokens/s to stderr")
    return parser


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if any(not text.strip() for text in prompts):
        raise ValueError("--prompt is empty; give the text to answer")
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {e.start}: {e.reason}); "
                             f"save it as UTF-8") from None
        except OSError as e:
            raise ValueError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror or e}") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"--prompt-file {args.prompt_file} has no prompt (it is empty or blank); write one "
                             f"prompt per line")
        prompts += lines
    return prompts or [EXAMPLE_PROMPT]


def run(args) -> int:
    check_sampling_arguments(args)
    texts = _read_prompts(args)
    tokenizer = get_tokenizer()
    if args.raw:
        prompts = [tokenizer.encode(text, allowed_special="all") for text in texts]
        stop_tokens = [ENDOFTEXT]
    else:
        prompts = [render_for_completion(Conversation([user(text)], reasoning_effort=args.reasoning_effort))
                   for text in texts]
        stop_tokens = None
    check_positions(model_source(args)[1], max(map(len, prompts)), args.max_new_tokens,
                    "the longest prompt" if len(prompts) > 1 else "the prompt")
    model = load_model(args)
    if not args.prompt and not args.prompt_file:
        print(f"note: no --prompt given; answering the example prompt {EXAMPLE_PROMPT!r}", file=sys.stderr)

    stream_one = len(prompts) == 1 and not args.json
    streams = [HarmonyStream(tokenizer, echo=stream_one, show_analysis=args.show_analysis) for _ in prompts]
    raw_stream = TextStream(tokenizer)
    clock = {"first": None, "first_count": 0}

    def on_tokens(new):
        if clock["first"] is None:
            clock["first"], clock["first_count"] = time.perf_counter(), sum(map(len, new))
        if args.raw:
            if stream_one:
                print(raw_stream.feed([t for t in new[0] if t != ENDOFTEXT]), end="", flush=True)
        else:
            for stream, tokens in zip(streams, new):
                stream.feed(tokens)

    start = time.perf_counter()
    outputs = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop_tokens=stop_tokens,
                       on_tokens=on_tokens)
    elapsed = time.perf_counter() - start
    harmony = [not args.raw and finish_harmony_stream(stream) for stream in streams]
    if stream_one and (args.raw or streams[0].printed_anything):
        print()

    for i, (text, prompt, tokens, stream) in enumerate(zip(texts, prompts, outputs, streams)):
        raw_text = decode_tokens(tokenizer, tokens)
        final = None if args.raw or not stream.final else "".join(stream.final)
        if args.json:
            record = {"prompt": text, "prompt_tokens": prompt, "tokens": tokens,
                      "text": raw_text if args.raw else (final or "")}
            if not args.raw:
                record.update(final_found=final is not None, harmony=harmony[i],
                              raw_text=raw_text, analysis="".join(stream.analysis))
            print(json.dumps(record, ensure_ascii=False))
            continue
        if not stream_one:
            print(f"=== prompt {i}: {text}")
            print(raw_text if args.raw or stream.not_harmony else (final or ""))
        if not args.raw and final is None and not stream.not_harmony:
            print(f"note: prompt {i}: the model produced no final-channel message "
                  f"({len(tokens)} tokens generated)", file=sys.stderr)
            if stream_one:
                print(f"raw output: {raw_text!r}", file=sys.stderr)

    if args.stats:
        generated = sum(len(t) for t in outputs)
        first = (clock["first"] or start + elapsed) - start
        rest, rest_time = generated - clock["first_count"], elapsed - first
        rate = f"{rest / rest_time:.1f} tokens/s" if rest and rest_time > 0 else "n/a"
        print(f"stats: {generated} tokens in {elapsed:.2f}s; prefill + first chunk (includes compiling) "
              f"{first:.2f}s; after that {rate} (batch {len(prompts)})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return cli(run, build_parser(), argv)


class _CallableModule(types.ModuleType):
    """Makes `gptoss_jax.generate(model, prompts, ...)` call `engine.generate`."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
