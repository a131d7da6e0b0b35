"""The decode engine: batched generation with the KV cache.

`generate` prefills all (ragged, right-padded) prompts with jitted `prefill` calls of a bounded
number of tokens each, so that memory grows linearly with the prompt, then decodes in chunks
of `chunk` tokens: each chunk is one jitted `lax.while_loop` on the device (`decode_chunk`),
and the host only sees the tokens between chunks (for streaming and to stop once every
sequence has finished). Padding and finished sequences use position -1, which the model
neither attends nor writes into the cache.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.chat_format import assistant_stop_tokens
from gptoss_jax.model import CACHE_AXES, NO_POSITION, GptOss, LayerCache
from gptoss_jax.sampling import check_sampling, sample
from gptoss_jax.sharding.placement import fetch, put
from gptoss_jax.sharding.rules import DATA, named_sharding

DEFAULT_CHUNK = 8
PAD_TOKEN = 0  # fed at position -1, so its value never matters
# Prompts go through `prefill` in steps of at most PREFILL_TOKENS tokens (all sequences
# together), each attending to the cache the steps before wrote: a step's logits and
# activations do not grow with the prompt. The XLA attention also holds a step's scores
# against every cache slot ([sequences, heads, step, slots]); there steps shrink as the cache
# grows, to keep those under XLA_SCORE_ELEMENTS. (The flash kernel never holds them.)
PREFILL_TOKENS = 1024
XLA_SCORE_ELEMENTS = 2**26
SEEDS = 2**32  # keys are drawn from 32-bit seeds


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = _rows_of(prompts)
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


def _rows_of(array) -> list:
    """The prompts of a 2-D array [batch, length]."""
    if array.ndim == 1:
        raise ValueError("prompts is one flat array of token ids; pass a list of prompts ([ids] for one prompt, "
                         "or a 2-D array [batch, length])")
    if array.ndim != 2:
        raise ValueError(f"prompts has shape {tuple(array.shape)}; expected a list of token-id lists or a 2-D "
                         f"array [batch, length]")
    return list(np.asarray(array))


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_integer(name: str, value, low: int) -> int:
    if not _is_integer(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if not _is_integer(seed) or not 0 <= seed < SEEDS:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def _check_stop_tokens(stop_tokens, vocab_size: int) -> list[int]:
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, (Sequence, np.ndarray)):
        raise ValueError(f"stop_tokens must be a list of token ids (None: the harmony assistant stops), "
                         f"got {stop_tokens!r}")
    for token in stop_tokens:
        if not _is_integer(token) or not 0 <= token < vocab_size:
            raise ValueError(f"stop_tokens must be token ids in [0, {vocab_size}), got {token!r}")
    return [int(t) for t in stop_tokens]


def _check_positions(longest: int, max_new_tokens: int, max_len: int | None, positions: int) -> int:
    """max_len (default: longest prompt + max_new_tokens), refused beyond the model's positions."""
    where = f"the model's {positions} positions (config.max_position_embeddings)"
    if longest > positions:
        raise ValueError(f"a prompt of {longest} tokens exceeds {where}; shorten it")
    if max_len is not None:
        if max_len > positions:
            raise ValueError(f"max_len={max_len} exceeds {where}")
        return max_len
    if longest + max_new_tokens > positions:
        raise ValueError(f"{longest} prompt tokens + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} "
                         f"positions exceed {where}; lower max_new_tokens to at most {positions - longest}, or pass "
                         f"max_len={positions} to stop there")
    return longest + max_new_tokens


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket(n: int, multiple: int) -> int:
    """n rounded up to 2^k times 1, 1.25, 1.5 or 1.75, then to a multiple of `multiple`:
    calls whose prompt lengths or cache lengths differ a little (the turns of a chat) share
    compiled code, at the cost of at most ~25% padding."""
    quarter_octave = 1 << max(0, n.bit_length() - 3)
    return round_up(round_up(n, quarter_octave), multiple)


@partial(jax.jit, static_argnums=0, donate_argnums=4)
def prefill(graphdef, state, tokens, positions, caches, last_index):
    model = nnx.merge(graphdef, state)
    logits, caches = model.extend(tokens, positions, caches)
    last = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0]
    return last.astype(jnp.float32), caches


@partial(jax.jit, static_argnames=("graphdef", "chunk", "greedy", "top_k", "use_top_p"),
         donate_argnames=("caches",))
def decode_chunk(graphdef, state, caches, logits, position, count, done, step, limit, stop_tokens,
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
    prompts = check_prompts(prompts, config.vocab_size)
    check_sampling(temperature, top_p, top_k)
    max_new_tokens = _check_integer("max_new_tokens", max_new_tokens, 0)
    chunk = _check_integer("chunk", chunk, 1)
    seed = _check_seed(seed)
    if max_len is not None:
        max_len = _check_integer("max_len", max_len, 1)
    lengths = np.array([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    max_len = _check_positions(longest, max_new_tokens, max_len, config.max_position_embeddings)
    if longest > max_len:
        raise ValueError(f"a prompt of {longest} tokens is longer than the cache context "
                         f"max_len={max_len}; shorten the prompt or raise max_len")
    stop_tokens = _check_stop_tokens(assistant_stop_tokens() if stop_tokens is None else stop_tokens, config.vocab_size)

    batch = len(prompts)
    results: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens == 0:
        return results

    # On a mesh the data axis splits the batch: idle rows (no tokens, nothing to generate)
    # round it up to a multiple of the axis.
    mesh = model.mesh
    rows = batch if mesh is None else round_up(batch, mesh.shape.get(DATA, 1))
    # Bucketed shapes let nearby prompt lengths share compiled code; extra slots stay empty.
    padded = bucket(longest, 16)
    slots = bucket(max(max_len, padded), 64)
    step_tokens = _prefill_step(model, rows, slots, padded)
    width = round_up(longest, step_tokens)  # whole steps
    tokens = np.full((rows, width), PAD_TOKEN, np.int32)
    positions = np.full((rows, width), NO_POSITION, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
        positions[i, : len(prompt)] = np.arange(len(prompt))
    lengths = np.concatenate([lengths, np.ones(rows - batch, np.int32)])
    limit = np.zeros(rows, np.int32)
    limit[:batch] = np.minimum(max_new_tokens, max_len - lengths[:batch])

    if not np.any(limit > 0):  # every prompt already fills max_len
        return results
    place = placer(mesh)
    caches = init_caches(model, rows, slots)
    graphdef, state = nnx.split(model)
    logits, caches = _prefill_in_steps(graphdef, state, tokens, positions, lengths, caches, step_tokens, place)

    position, count = place(lengths, ("batch",)), place(np.zeros(rows, np.int32), ("batch",))
    done, step = place(limit <= 0, ("batch",)), place(np.int32(0), ())
    stops = place(np.array(stop_tokens, np.int32).reshape(-1), (None,))
    key = jax.random.wrap_key_data(place(np.asarray(jax.random.key_data(jax.random.key(seed))), (None,)))
    kernel = partial(decode_chunk, graphdef, state, chunk=chunk, greedy=temperature == 0,
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


def _prefill_step(model: GptOss, rows: int, slots: int, padded: int) -> int:
    """Prompt tokens per sequence in one prefill step: a power of two within the budgets
    above (at least 1), or the whole bucketed prompt when that is shorter."""
    budget = PREFILL_TOKENS // rows
    if not model.kernels.prefill_attention:
        budget = min(budget, XLA_SCORE_ELEMENTS // (rows * model.config.num_attention_heads * slots))
    return min(1 << max(budget.bit_length() - 1, 0), padded)


def _prefill_in_steps(graphdef, state, tokens, positions, lengths, caches, step: int, place):
    """Runs the prompts [rows, n * step] through `prefill` `step` tokens at a time. Returns
    the logits after each sequence's last prompt token [rows, vocab] and the caches."""
    last = lengths - 1
    logits = queued = None
    for start in range(0, tokens.shape[1], step):
        part = slice(start, start + step)
        step_logits, caches = prefill(graphdef, state, place(tokens[:, part], ("batch", "seq")),
                                      place(positions[:, part], ("batch", "seq")), caches,
                                      place(np.clip(last - start, 0, step - 1), ("batch",)))
        ends_here = (last >= start) & (last < start + step)
        if logits is None or ends_here.all():
            logits = step_logits
        elif ends_here.any():
            logits = jnp.where(place(ends_here, ("batch",))[:, None], step_logits, logits)
        # One step queued behind the running one keeps the device busy; waiting for the one
        # before lets Ctrl-C through between steps of a long prompt.
        if queued is not None:
            queued.block_until_ready()
        queued = step_logits
    return logits, caches


def placer(mesh):
    """Host arrays onto the mesh by logical axes (one device without a mesh)."""
    if mesh is None:  # committed like the jitted steps' outputs, so each step compiles once
        device = jax.devices()[0]
        return lambda array, axes: jax.device_put(array, device)
    return lambda array, axes: put(array, axes, mesh)


def init_caches(model: GptOss, batch: int, max_len: int) -> list[LayerCache]:
    """Empty KV caches; on a mesh, batch over "data" and KV heads over "model" (by the rules)."""
    if model.mesh is None:
        return model.init_cache(batch, max_len)
    make = lambda: model.init_cache(batch, max_len)  # noqa: E731
    shardings = [LayerCache(*(named_sharding(axes, leaf.shape, model.mesh) for axes, leaf in zip(CACHE_AXES, cache)))
                 for cache in jax.eval_shape(make)]
    return jax.jit(make, out_shardings=shardings)()
