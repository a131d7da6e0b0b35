"""Batched text generation with the KV cache, and the `python -m gptoss_jax.generate` CLI.

`generate` prefills all (ragged, right-padded) prompts in one jitted call, then decodes in
chunks of `chunk` tokens: each chunk is one jitted `lax.while_loop` on the device, and the
host only sees the tokens between chunks (for streaming and to stop once every sequence
has finished). Padding and finished sequences use position -1, which the model neither
attends nor writes into the cache.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
import types
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.model import CACHE_AXES, NO_POSITION, GptOss, LayerCache
from gptoss_jax.sharding.mesh import make_mesh, parse_mesh_spec
from gptoss_jax.sharding.placement import fetch, put
from gptoss_jax.sharding.rules import DATA, named_sharding

DEFAULT_CHUNK = 8
PAD_TOKEN = 0  # fed at position -1, so its value never matters
COMPILATION_CACHE_DIR = Path(os.environ.get("GPTOSS_JAX_CACHE_DIR") or
                             Path.home() / ".cache" / "gptoss_jax" / "jax_cache")


# --------------------------------------------------------------------------- validation
def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filtering), got {top_k}")


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"prompt {i} must be a flat list of integer token ids")
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")
        checked.append([int(t) for t in ids])
    return checked


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(n: int, multiple: int) -> int:
    """n rounded up to 2^k times 1, 1.25, 1.5 or 1.75, then to a multiple of `multiple`:
    calls whose prompt lengths or cache lengths differ a little (the turns of a chat) share
    compiled code, at the cost of at most ~25% padding."""
    quarter_octave = 1 << max(0, n.bit_length() - 3)
    return _round_up(_round_up(n, quarter_octave), multiple)


# ------------------------------------------------------------------------------ sampling
def sample(logits, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """logits [b, vocab] -> token ids [b]. temperature and top_p are traced scalars."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly larger tokens
        kept = jnp.where(before < top_p, ordered, jnp.inf)  # the first token is always kept
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------ jitted kernels
@partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(graphdef, state, tokens, positions, caches, last_index):
    model = nnx.merge(graphdef, state)
    logits, caches = model.extend(tokens, positions, caches)
    last = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0]
    return last.astype(jnp.float32), caches


@partial(jax.jit, static_argnames=("graphdef", "chunk", "greedy", "top_k", "use_top_p"),
         donate_argnames=("caches",))
def _decode_chunk(graphdef, state, caches, logits, position, count, done, step, limit, stop_tokens,
                  key, temperature, top_p, *, chunk, greedy, top_k, use_top_p):
    """Samples up to `chunk` tokens per sequence. `position`: where each sequence's next token
    goes; `count`: tokens generated so far; `limit`: how many it may generate; `step`: the
    global decode step (the sampling key is `fold_in(key, step)`). Returns the new state
    and the tokens [b, chunk] (-1 where a sequence produced none)."""
    model = nnx.merge(graphdef, state)
    batch = logits.shape[0]

    def body(carry):
        i, caches, logits, position, count, done, step, out = carry
        token = sample(logits, jax.random.fold_in(key, step), temperature, top_p,
                       greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        active = ~done
        out = out.at[:, i].set(jnp.where(active, token, -1))
        count = count + active
        hit_stop = jnp.any(token[:, None] == stop_tokens[None, :], axis=-1)
        now_done = done | (active & (hit_stop | (count >= limit)))
        # Only tokens whose successor is still wanted go through the model.
        feed = ~now_done
        tokens = jnp.where(feed, token, PAD_TOKEN)[:, None]
        positions = jnp.where(feed, position, NO_POSITION)[:, None]
        new_logits, caches = model.extend(tokens, positions, caches)
        logits = jnp.where(feed[:, None], new_logits[:, 0].astype(jnp.float32), logits)
        return i + 1, caches, logits, position + feed, count, now_done, step + 1, out

    # A fixed trip count: XLA then queues the steps back to back, where a data-dependent
    # exit (all sequences done) would copy the predicate to the host and wait for the device
    # after every step. Steps after every sequence is done change nothing.
    out = jnp.full((batch, chunk), -1, jnp.int32)
    carry = (jnp.int32(0), caches, logits, position, count, done, step, out)
    _, caches, logits, position, count, done, step, out = jax.lax.while_loop(lambda c: c[0] < chunk, body, carry)
    return caches, logits, position, count, done, step, out


# ---------------------------------------------------------------------------- generate
def generate(
    model: GptOss,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    max_len: int | None = None,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> list[list[int]]:
    """Generates up to `max_new_tokens` tokens after each prompt (a list of token ids; the
    batch may be ragged). Returns the new ids per prompt, the stop token included when one
    was hit. `stop_tokens=None` means the harmony assistant stops (<|return|>, <|call|>),
    `[]` means none. `temperature=0` is greedy; otherwise tokens are sampled from
    softmax(logits / temperature) after optional top-k / top-p filtering, with keys drawn
    from `seed`. `max_len` bounds prompt + generated tokens per sequence (default: longest
    prompt + max_new_tokens); a sequence that reaches it stops. `on_tokens` is called after
    every chunk with the new tokens of each sequence (possibly empty lists)."""
    config = model.config
    prompts = _check_prompts(prompts, config.vocab_size)
    check_sampling(temperature, top_p, top_k)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    if max_len is None:
        max_len = longest + max_new_tokens
    if longest > max_len:
        raise ValueError(f"a prompt of {longest} tokens is longer than the cache context "
                         f"max_len={max_len}; shorten the prompt or raise max_len")
    if stop_tokens is None:
        from gptoss_jax.chat_format import assistant_stop_tokens
        stop_tokens = assistant_stop_tokens()
    stop_tokens = [int(t) for t in stop_tokens]

    batch = len(prompts)
    results: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens == 0:
        return results

    # On a mesh the data axis splits the batch: idle rows (no tokens, nothing to generate)
    # round it up to a multiple of the axis.
    mesh = model.mesh
    rows = batch if mesh is None else _round_up(batch, mesh.shape.get(DATA, 1))
    # Bucketed shapes let nearby prompt lengths share compiled code; extra slots stay empty.
    padded = _bucket(longest, 16)
    tokens = np.full((rows, padded), PAD_TOKEN, np.int32)
    positions = np.full((rows, padded), NO_POSITION, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
        positions[i, : len(prompt)] = np.arange(len(prompt))
    lengths = np.concatenate([lengths, np.ones(rows - batch, np.int32)])
    limit = np.zeros(rows, np.int32)
    limit[:batch] = np.minimum(max_new_tokens, max_len - lengths[:batch])

    if not np.any(limit > 0):  # every prompt already fills max_len
        return results
    place = _placer(mesh)
    caches = _init_caches(model, rows, _bucket(max(max_len, padded), 64))
    graphdef, state = nnx.split(model)
    logits, caches = _prefill(graphdef, state, place(tokens, ("batch", "seq")), place(positions, ("batch", "seq")),
                              caches, place(lengths - 1, ("batch",)))

    position, count = place(lengths, ("batch",)), place(np.zeros(rows, np.int32), ("batch",))
    done, step = place(limit <= 0, ("batch",)), place(np.int32(0), ())
    stops = place(np.array(stop_tokens, np.int32).reshape(-1), (None,))
    key = jax.random.wrap_key_data(place(np.asarray(jax.random.key_data(jax.random.key(seed))), (None,)))
    kernel = partial(_decode_chunk, graphdef, state, chunk=chunk, greedy=temperature == 0,
                     top_k=min(top_k, config.vocab_size), use_top_p=top_p < 1)
    limit_arg = place(limit, ("batch",))
    temperature_arg = place(np.float32(temperature if temperature > 0 else 1.0), ())
    top_p_arg = place(np.float32(top_p), ())

    def next_chunk(carry):
        caches, logits, position, count, done, step, _ = carry
        return kernel(caches, logits, position, count, done, step, limit_arg, stops, key, temperature_arg, top_p_arg)

    # Chunk i + 1 is queued on the device before the host waits for chunk i's tokens, so
    # the device never idles while the host dispatches, copies and streams tokens. No chunk
    # is queued past the one in which every sequence reaches its limit; one queued after a
    # stop token ended them all changes nothing.
    chunks = -(-int(limit.max()) // chunk)
    carry = next_chunk((caches, logits, position, count, done, step, None))
    for i in range(chunks):
        queued = next_chunk(carry) if i + 1 < chunks else None
        done_now, out = fetch(carry[4], mesh), fetch(carry[6], mesh)
        new = [[int(t) for t in row if t >= 0] for row in out[:batch]]
        for result, tokens_of_seq in zip(results, new):
            result.extend(tokens_of_seq)
        if on_tokens is not None:
            on_tokens(new)
        if np.all(done_now):
            break
        carry = queued
    return results


def _placer(mesh):
    """Host arrays onto the mesh by logical axes (one device without a mesh)."""
    if mesh is None:  # committed like the jitted steps' outputs, so each step compiles once
        device = jax.devices()[0]
        return lambda array, axes: jax.device_put(array, device)
    return lambda array, axes: put(array, axes, mesh)


def _init_caches(model: GptOss, batch: int, max_len: int) -> list[LayerCache]:
    """Empty KV caches; on a mesh, batch over "data" and KV heads over "model" (by the rules)."""
    if model.mesh is None:
        return model.init_cache(batch, max_len)
    make = lambda: model.init_cache(batch, max_len)  # noqa: E731
    shardings = [LayerCache(*(named_sharding(axes, leaf.shape, model.mesh) for axes, leaf in zip(CACHE_AXES, cache)))
                 for cache in jax.eval_shape(make)]
    return jax.jit(make, out_shardings=shardings)()


# ---------------------------------------------------------------------------------- CLI
def enable_compilation_cache(path: Path = COMPILATION_CACHE_DIR) -> None:
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint",
                        help="checkpoint directory (either MXFP4 layout), or a Hugging Face repo id such as "
                             "openai/gpt-oss-20b (local HF cache first, else downloaded); "
                             "default: the built-in 'tiny' model with random weights")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--no-compilation-cache", action="store_true")
    parser.add_argument("--kernels", choices=["auto", "pallas", "xla"], default="auto",
                        help="auto (default): the Pallas kernels (fused MXFP4 MoE, attention with sinks, "
                             "fused projections and router) on a GPU, the XLA reference path elsewhere; on a mesh of "
                             "several devices only the MoE kernels, which run per device. pallas: the "
                             "kernels everywhere (on a TPU only the MoE kernel, not yet measured there; "
                             "on a CPU in Pallas interpret mode: slow). xla: none")
    mesh = parser.add_argument_group(
        "mesh (several devices)",
        "--mesh AxB spreads the model over A x B devices: A-way expert parallelism (each device holds "
        "1/A of the experts) times B-way tensor parallelism (attention heads, vocabulary and each "
        "expert's hidden units split B ways); DxAxB adds D-way data parallelism (the batch split D "
        "ways, each slice holding a full copy of the weights). The product must equal the number of "
        "devices; e.g. --mesh 4x2 on a TPU v5e-8 or an 8-GPU host. Without accelerators the command "
        "provisions that many host (CPU) devices itself. Several processes (one per host) join with "
        "--coordinator/--num-processes/--process-id, or --distributed on a TPU pod slice or cluster; "
        "each loads only its own shards and only process 0 prints.")
    mesh.add_argument("--mesh", metavar="AxB|DxAxB", help="expert x model (or data x expert x model) mesh")
    mesh.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, for multi-process runs")
    mesh.add_argument("--num-processes", type=int, metavar="N", help="number of processes in a multi-process run")
    mesh.add_argument("--process-id", type=int, metavar="I", help="this process's index in [0, --num-processes)")
    mesh.add_argument("--distributed", action="store_true",
                      help="join processes with jax.distributed's cluster detection (TPU pod slices, SLURM, ...)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-analysis", action="store_true", help="stream the analysis channel to stderr")


def check_sampling_arguments(args) -> None:
    check_sampling(args.temperature, args.top_p, args.top_k)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")


COMPILATION_CACHE_NOTE = (f"Compiled code is cached across runs in {COMPILATION_CACHE_DIR} (JAX's persistent "
                          "compilation cache; set GPTOSS_JAX_CACHE_DIR to move it, --no-compilation-cache "
                          "to disable it).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_jax.generate",
        description="Generate text with gpt-oss in JAX (harmony chat format unless --raw).",
        epilog=COMPILATION_CACHE_NOTE)
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    parser.add_argument("--prompt-file", help="file with one prompt per line")
    add_sampling_arguments(parser, max_new_tokens=64)
    parser.add_argument("--raw", action="store_true",
                        help="no chat format: encode the prompt text as is and stop on <|endoftext|>")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (prompt_tokens, tokens, text)")
    parser.add_argument("--stats", action="store_true", help="print timing and tokens/s to stderr")
    return parser


def load_model(args) -> GptOss:
    from gptoss_jax.hub import resolve_checkpoint
    from gptoss_jax.loader import load

    mesh = make_mesh(parse_mesh_spec(args.mesh)) if args.mesh else None
    if args.checkpoint is None:
        print("note: no --checkpoint given; using the built-in 'tiny' model with random weights "
              "(its output is random tokens)", file=sys.stderr)
        model = load("tiny", dtype=args.dtype, mesh=mesh)
    else:
        path = resolve_checkpoint(args.checkpoint, log=lambda message: print(message, file=sys.stderr))
        model = load(path, dtype=args.dtype, mesh=mesh)
    if mesh is not None:
        _report_mesh(model, args.mesh)
    choose_kernels(model, args.kernels, several_devices=mesh is not None and mesh.size > 1)
    return model


def choose_kernels(model, kernels: str, several_devices: bool = False) -> dict:
    """--kernels: returns {kernel: "xla" | "pallas"} as now set on the model."""
    from gptoss_jax.kernels import FASTEST, kernels_in_use, set_kernels

    if kernels == "auto":
        kernels = "pallas" if jax.default_backend() == "gpu" else "xla"
    chosen = dict(FASTEST) if kernels == "pallas" else {name: "xla" for name in FASTEST}
    if kernels == "pallas" and jax.default_backend() == "tpu":  # only the MoE kernel has a TPU lowering
        chosen = {name: "pallas" if name == "moe" else "xla" for name in FASTEST}
    if several_devices:  # attention kernels are not partitioned over a mesh (yet): XLA there
        chosen.update(decode_attention="xla", prefill_attention="xla", projection="xla", router="xla")
    set_kernels(model, **chosen)
    return kernels_in_use(model)


def cli(run_fn, parser: argparse.ArgumentParser, argv=None) -> int:
    """Parses arguments, runs, and turns bad input into one `error:` line and exit status 2."""
    args = parser.parse_args(argv)
    errors = sys.stderr
    try:
        errors = _start_devices(args)
        if not args.no_compilation_cache:
            enable_compilation_cache()
        return run_fn(args)
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        where = "" if jax.process_count() == 1 else f" (process {jax.process_index()})"
        print(f"error{where}: {message}", file=errors)
        return 2
    finally:
        sys.stdout.flush()


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror or e}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    return prompts or ["Why is the sky blue?"]


def _token_bytes(tokenizer, token: int) -> bytes:
    try:
        return tokenizer.decode_single_token_bytes(token)
    except KeyError:  # ids in unused gaps of the vocabulary
        return b""


def _decode(tokenizer, tokens: list[int]) -> str:
    return b"".join(_token_bytes(tokenizer, t) for t in tokens).decode("utf-8", errors="replace")


class _TextStream:
    """Token ids in, text out, holding back the bytes of a UTF-8 character split across tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tokens: list[int]) -> str:
        return self.decoder.decode(b"".join(_token_bytes(self.tokenizer, t) for t in tokens))


class _HarmonyStream:
    """Feeds one sequence's tokens to a StreamingParser; collects (and, with `echo`, prints) the
    final channel to stdout and the analysis channel to stderr. Output that does not follow the
    harmony format (a malformed token, or a message header that never ends, as from random
    weights) is shown as raw text from then on, with a note."""

    MAX_HEADER_TOKENS = 32  # real headers ("<|channel|>final<|message|>", recipients) are far shorter

    def __init__(self, tokenizer, echo: bool, show_analysis: bool):
        from gptoss_jax.chat_format import StreamingParser
        self.parser, self.tokenizer = StreamingParser(), tokenizer
        self.echo, self.show_analysis = echo, show_analysis
        self.final, self.analysis, self.tokens = [], [], []
        self.header_tokens, self.not_harmony = 0, False
        self.raw = _TextStream(tokenizer)

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


def run(args) -> int:
    from gptoss_jax.tokenizer import ENDOFTEXT, get_tokenizer

    check_sampling_arguments(args)
    texts = _read_prompts(args)
    model = load_model(args)

    tokenizer = get_tokenizer()
    if args.raw:
        prompts = [tokenizer.encode(text, allowed_special="all") for text in texts]
        stop_tokens = [ENDOFTEXT]
    else:
        from gptoss_jax.chat_format import Conversation, render_for_completion, user
        prompts = [render_for_completion(Conversation([user(text)], reasoning_effort=args.reasoning_effort))
                   for text in texts]
        stop_tokens = None

    stream_one = len(prompts) == 1 and not args.json
    streams = [_HarmonyStream(tokenizer, echo=stream_one, show_analysis=args.show_analysis) for _ in prompts]
    raw_stream = _TextStream(tokenizer)
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
    if stream_one and (args.raw or streams[0].printed_anything):
        print()

    for i, (text, prompt, tokens, stream) in enumerate(zip(texts, prompts, outputs, streams)):
        raw_text = _decode(tokenizer, tokens)
        final = None if args.raw or not stream.final else "".join(stream.final)
        if args.json:
            record = {"prompt": text, "prompt_tokens": prompt, "tokens": tokens,
                      "text": raw_text if args.raw else (final or "")}
            if not args.raw:
                record.update(final_found=final is not None, harmony=not stream.not_harmony,
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


def _report_mesh(model: GptOss, spec: str) -> None:
    from gptoss_jax.sharding.memory import bytes_per_device, format_bytes
    from gptoss_jax.sharding.mesh import check_mesh_fits_model

    for note in check_mesh_fits_model(model.config, model.mesh):
        print(f"note: {note}", file=sys.stderr)
    total = max(bytes_per_device(model).values())
    experts = max(bytes_per_device(model, experts_only=True).values())
    print(f"note: mesh {spec} over {model.mesh.size} {jax.default_backend().upper()} devices: "
          f"{format_bytes(total)} of parameters per device ({format_bytes(experts)} of experts)", file=sys.stderr)


def _start_devices(args):
    """Host devices and jax.distributed must be set up before JAX starts its backends.
    Returns the stream for error messages (every process reports its errors)."""
    from gptoss_jax.sharding.mesh import Distributed, start_devices

    distributed = Distributed(args.coordinator, args.num_processes, args.process_id, args.distributed)
    distributed.check()
    spec = parse_mesh_spec(args.mesh) if args.mesh else None
    if spec is None:
        if distributed.enabled:
            raise ValueError("multi-process runs need --mesh (the mesh spans the devices of all processes)")
        return sys.stderr
    errors = sys.stderr
    if distributed.enabled:
        # gloo (CPU collectives between processes) prints to the C-level stdout: send that to
        # stderr and keep Python's stdout for the output.
        sys.stdout.flush()
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        errors = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
    notes = start_devices(spec, distributed)
    if jax.process_index() != 0:  # only process 0 prints
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return errors


def main(argv=None) -> int:
    return cli(run, build_parser(), argv)


class _CallableModule(types.ModuleType):
    """Makes `gptoss_jax.generate(model, prompts, ...)` call `generate` (see gptoss_jax/__init__.py)."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
