"""The decode engine: batched generation with the KV cache.

`generate` prefills all (ragged, right-padded) prompts with jitted `prefill` calls of a bounded
number of tokens each, so that memory grows linearly with the prompt, then decodes in chunks
of `chunk` tokens: each chunk is one jitted `lax.while_loop` on the device (`decode_chunk`),
and the host only sees the tokens between chunks (for streaming and to stop once every
sequence has finished). Padding and finished sequences use position -1, which the model
neither attends nor writes into the cache.

`ContinuousBatch` runs the same decode loop (`decode_steps`) over a fixed number of slots that
generations join and leave between chunks, each with its own cache rows, limits, stop tokens
and sampling settings: the engine of the HTTP server (gptoss_jax.serve).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.chat_format import assistant_stop_tokens
from gptoss_jax.model import CACHE_AXES, NO_POSITION, GptOss, LayerCache
from gptoss_jax.sampling import check_sampling, sample, sample_rows
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
    pick = lambda logits, i, count: sample(logits, jax.random.fold_in(key, step + i), temperature, top_p,
                                           greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    caches, logits, position, count, done, out = decode_steps(model, pick, caches, logits, position, count, done,
                                                              limit, stop_tokens, chunk)
    return caches, logits, position, count, done, step + chunk, out


def decode_steps(model, pick, caches, logits, position, count, done, limit, stop_tokens, chunk):
    """The decode loop of `decode_chunk` and `decode_slots`: `chunk` steps, each choosing every
    sequence's next token with `pick(logits, i, count)` (i: the step within the chunk) and
    running the tokens still wanted through the model. `stop_tokens`: [n] for every sequence,
    or [b, n] per sequence (-1 matches nothing)."""
    batch = logits.shape[0]
    stops = stop_tokens if stop_tokens.ndim == 2 else stop_tokens[None, :]

    def body(carry):
        i, caches, logits, position, count, done, out = carry
        token = pick(logits, i, count)
        active = ~done
        out = out.at[:, i].set(jnp.where(active, token, -1))
        count = count + active
        hit_stop = jnp.any(token[:, None] == stops, axis=-1)
        now_done = done | (active & (hit_stop | (count >= limit)))
        # Only tokens whose successor is still wanted go through the model.
        feed = ~now_done
        tokens = jnp.where(feed, token, PAD_TOKEN)[:, None]
        positions = jnp.where(feed, position, NO_POSITION)[:, None]
        new_logits, caches = model.extend(tokens, positions, caches)
        logits = jnp.where(feed[:, None], new_logits[:, 0].astype(jnp.float32), logits)
        return i + 1, caches, logits, position + feed, count, now_done, out

    # A fixed trip count: XLA then queues the steps back to back, where a data-dependent
    # exit (all sequences done) would copy the predicate to the host and wait for the device
    # after every step. Steps after every sequence is done change nothing.
    out = jnp.full((batch, chunk), -1, jnp.int32)
    carry = (jnp.int32(0), caches, logits, position, count, done, out)
    _, caches, logits, position, count, done, out = jax.lax.while_loop(lambda c: c[0] < chunk, body, carry)
    return caches, logits, position, count, done, out


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
    if model.mesh is None:  # committed like the jitted steps' outputs, so that the first step compiles once
        return jax.device_put(model.init_cache(batch, max_len), jax.devices()[0])
    make = lambda: model.init_cache(batch, max_len)  # noqa: E731
    shardings = [LayerCache(*(named_sharding(axes, leaf.shape, model.mesh) for axes, leaf in zip(CACHE_AXES, cache)))
                 for cache in jax.eval_shape(make)]
    return jax.jit(make, out_shardings=shardings)()


# ----------------------------------------------------------------------------------------
# Continuous batching: generations join and leave a running decode batch between chunks.
# ----------------------------------------------------------------------------------------


class SlotState(NamedTuple):
    """The device side of a ContinuousBatch: one row per slot."""

    caches: list[LayerCache]
    logits: jax.Array  # [slots, vocab] fp32: what the slot's next token is sampled from
    position: jax.Array  # [slots] where the slot's next token goes
    count: jax.Array  # [slots] tokens generated (the key of the next draw is fold_in(key, count))
    done: jax.Array  # [slots] bool
    limit: jax.Array  # [slots] tokens the slot may generate
    stop_tokens: jax.Array  # [slots, max_stop_tokens], -1 where unused
    keys: jax.Array  # [slots, ...] raw PRNG key data
    temperature: jax.Array  # [slots] fp32, 0 = greedy
    top_p: jax.Array  # [slots] fp32, 1 = off
    top_k: jax.Array  # [slots] int32, 0 = off


@partial(jax.jit, static_argnames=("graphdef", "chunk", "sampled", "filtered"), donate_argnames=("slots",))
def decode_slots(graphdef, state, slots: SlotState, *, chunk, sampled, filtered):
    """`decode_chunk` for a ContinuousBatch: the same loop, with sampling settings, stop tokens
    and keys per slot. Returns the new SlotState and the tokens [slots, chunk] (-1: none)."""
    model = nnx.merge(graphdef, state)
    keys = jax.random.wrap_key_data(slots.keys)
    pick = lambda logits, i, count: sample_rows(logits, jax.vmap(jax.random.fold_in)(keys, count), slots.temperature,
                                                slots.top_p, slots.top_k, sampled=sampled, filtered=filtered)
    caches, logits, position, count, done, out = decode_steps(
        model, pick, slots.caches, slots.logits, slots.position, slots.count, slots.done, slots.limit,
        slots.stop_tokens, chunk)
    return slots._replace(caches=caches, logits=logits, position=position, count=count, done=done), out


@partial(jax.jit, donate_argnames=("slots",))
def insert_slot(slots: SlotState, row, source, caches, logits, length, limit, stop_tokens, key, temperature, top_p,
                top_k):
    """Puts one prefilled generation (row `source` of `caches` and `logits`; the caches may hold
    fewer cache slots than the batch: the positions they hold go to the same slots) into batch
    row `row`."""
    def put_row(batch, value, fill):
        value = jax.lax.dynamic_slice_in_dim(value, source, 1, axis=0)
        pad = [(0, 0)] + [(0, b - v) for b, v in zip(batch.shape[1:], value.shape[1:])]
        value = jnp.pad(value, pad, constant_values=fill).astype(batch.dtype)
        return jax.lax.dynamic_update_slice(batch, value, (row,) + (0,) * (batch.ndim - 1))

    caches = [LayerCache(put_row(b.k, c.k, 0), put_row(b.v, c.v, 0), put_row(b.positions, c.positions, NO_POSITION))
              for b, c in zip(slots.caches, caches)]
    set_row = lambda batch, value: batch.at[row].set(value)
    return SlotState(caches, put_row(slots.logits, logits, 0), set_row(slots.position, length),
                     set_row(slots.count, 0), set_row(slots.done, limit <= 0), set_row(slots.limit, limit),
                     set_row(slots.stop_tokens, stop_tokens), set_row(slots.keys, key),
                     set_row(slots.temperature, temperature), set_row(slots.top_p, top_p), set_row(slots.top_k, top_k))


@partial(jax.jit, donate_argnames=("slots",))
def release_slot(slots: SlotState, row):
    return slots._replace(done=slots.done.at[row].set(True))


FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(eq=False)
class Generation:
    """One request for a ContinuousBatch: the prompt, how many tokens it may generate, its
    sampling settings (as `generate` takes them) and stop tokens (None: the harmony assistant
    stops). While it runs, `tokens` collects what it generated and `finish_reason` becomes
    "stop" (a stop token, included in `tokens`), "length" (max_new_tokens or the batch's
    max_len reached) or "cancelled"."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_tokens: list[int] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    limit: int = 0  # max_new_tokens, or fewer where the prompt leaves less room in max_len
    tokens_queued: int = 0  # tokens the chunks dispatched so far can produce


class ContinuousBatch:
    """A decode batch of `slots` rows that generations join and leave while it runs.

    `add(generation)` prefills the prompt (bucketed lengths as `generate` does) and writes its
    cache rows, position, limits, stop tokens and sampling settings into a free slot;
    `add_many(generations)` prefills several prompts as the rows of one batch; `step()` decodes
    one chunk of `chunk` tokens for every occupied slot (the loop of `decode_chunk`) and returns
    the tokens of the chunk before it, so that the device already runs the next chunk while the
    host reads one; `cancel(generation)` stops a generation and frees
    its slot. A generation that finishes frees its slot when its last tokens are returned.
    `max_len` bounds prompt plus generated tokens of every generation.

    Not thread-safe: one thread calls add, cancel and step. A sampled generation draws its n-th
    token with `fold_in(key(seed), n)`, as `generate` does for a batch of one."""

    def __init__(self, model: GptOss, *, slots: int, max_len: int, chunk: int = DEFAULT_CHUNK,
                 max_stop_tokens: int = 4):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        if max_len > model.config.max_position_embeddings:
            raise ValueError(f"max_len={max_len} is beyond the model's {model.config.max_position_embeddings} positions")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model, self.slots, self.max_len, self.chunk = model, slots, max_len, chunk
        self.max_stop_tokens = max_stop_tokens
        mesh = model.mesh
        data = 1 if mesh is None else mesh.shape.get(DATA, 1)
        rows = round_up(slots, data)  # rows beyond `slots` stay idle
        self.prefill_rows = data
        self.cache_len = bucket(max_len, 64)
        self.place = placer(mesh)
        self.graphdef, self.params = nnx.split(model)
        place = self.place
        key_data = np.asarray(jax.random.key_data(jax.random.key(0)))
        self.state = SlotState(
            caches=init_caches(model, rows, self.cache_len),
            logits=place(np.zeros((rows, model.config.vocab_size), np.float32), ("batch", "vocab")),
            position=place(np.zeros(rows, np.int32), ("batch",)),
            count=place(np.zeros(rows, np.int32), ("batch",)),
            done=place(np.ones(rows, bool), ("batch",)),
            limit=place(np.zeros(rows, np.int32), ("batch",)),
            stop_tokens=place(np.full((rows, max_stop_tokens), -1, np.int32), ("batch", None)),
            keys=place(np.zeros((rows, *key_data.shape), key_data.dtype), ("batch",) + (None,) * key_data.ndim),
            temperature=place(np.zeros(rows, np.float32), ("batch",)),
            top_p=place(np.ones(rows, np.float32), ("batch",)),
            top_k=place(np.zeros(rows, np.int32), ("batch",)))
        self.owners: list[Generation | None] = [None] * slots
        self.pending = None  # (tokens, [(row, generation)]) of the chunk dispatched last
        self.occupancy = 0  # occupied slots in the chunk dispatched last

    @property
    def free_slots(self) -> int:
        return self.owners.count(None)

    @property
    def generations(self) -> list[Generation]:
        return [s for s in self.owners if s is not None]

    @property
    def busy(self) -> bool:
        """Whether `step` has work: occupied slots, or a chunk whose tokens are not read yet."""
        return self.pending is not None or self.free_slots < self.slots

    def check(self, generation: Generation) -> None:
        """Raises ValueError saying what is wrong with a generation that `add` would refuse."""
        config = self.model.config
        generation.prompt = check_prompts([generation.prompt], config.vocab_size)[0]
        check_sampling(generation.temperature, generation.top_p, generation.top_k)
        if generation.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {generation.max_new_tokens}")
        if len(generation.prompt) >= self.max_len:
            raise ValueError(f"a prompt of {len(generation.prompt)} tokens leaves no room to generate in the batch's "
                             f"max_len={self.max_len}; shorten the prompt")
        stops = assistant_stop_tokens() if generation.stop_tokens is None else list(generation.stop_tokens)
        if len(stops) > self.max_stop_tokens:
            raise ValueError(f"{len(stops)} stop tokens; the batch takes at most {self.max_stop_tokens}")
        if any(not isinstance(t, (int, np.integer)) or t < 0 for t in stops):
            raise ValueError(f"stop tokens must be token ids (integers >= 0), got {stops}")

    def add(self, generation: Generation) -> None:
        """Prefills `generation` and puts it into a free slot (ValueError if none is free or the
        generation is invalid). One that may generate nothing finishes at once, in no slot."""
        self.add_many([generation])

    def add_many(self, generations: list[Generation]) -> None:
        """`add` for several generations at once: their prompts are prefilled together, as the
        rows of one batch (a power of two of them, padded to the longest prompt's bucket), and
        each goes into a free slot. ValueError, with nothing added, if one is invalid or there
        are fewer free slots than generations."""
        for generation in generations:
            self.check(generation)
        if len(generations) > self.free_slots:
            raise ValueError("no free slot: wait for a generation to finish or cancel one" if not self.free_slots else
                             f"{len(generations)} generations for {self.free_slots} free slots")
        admitted = []
        for generation in generations:
            generation.limit = min(generation.max_new_tokens, self.max_len - len(generation.prompt))
            if generation.limit <= 0:
                generation.finish_reason = "length"
            else:
                admitted.append(generation)
        if not admitted:
            return
        rows = round_up(1 << (len(admitted) - 1).bit_length(), self.prefill_rows)
        longest = max(len(g.prompt) for g in admitted)
        padded = bucket(longest, 16)
        cache_len = min(bucket(padded, 64), self.cache_len)
        step_tokens = _prefill_step(self.model, rows, cache_len, padded)
        width = round_up(longest, step_tokens)
        tokens = np.full((rows, width), PAD_TOKEN, np.int32)
        positions = np.full((rows, width), NO_POSITION, np.int32)
        lengths = np.ones(rows, np.int32)
        for i, generation in enumerate(admitted):
            length = len(generation.prompt)
            tokens[i, :length], positions[i, :length], lengths[i] = generation.prompt, np.arange(length), length
        caches = init_caches(self.model, rows, cache_len)
        logits, caches = _prefill_in_steps(self.graphdef, self.params, tokens, positions, lengths, caches, step_tokens,
                                           self.place)
        for i, generation in enumerate(admitted):
            stops = assistant_stop_tokens() if generation.stop_tokens is None else list(generation.stop_tokens)
            stop_row = np.full(self.max_stop_tokens, -1, np.int32)
            stop_row[:len(stops)] = stops
            key = np.asarray(jax.random.key_data(jax.random.key(generation.seed % 2**32)))
            row = self.owners.index(None)
            self.state = insert_slot(self.state, np.int32(row), np.int32(i), caches, logits, np.int32(lengths[i]),
                                     np.int32(generation.limit), stop_row, key, np.float32(generation.temperature),
                                     np.float32(generation.top_p),
                                     np.int32(min(generation.top_k, self.model.config.vocab_size)))
            generation.slot, generation.tokens_queued = row, 0
            self.owners[row] = generation

    def cancel(self, generation: Generation) -> None:
        """Stops `generation` (finish_reason "cancelled" unless it had finished) and frees its slot;
        tokens of chunks already dispatched for it are dropped."""
        if generation.finish_reason is None:
            generation.finish_reason = "cancelled"
        self._free(generation)

    def step(self) -> list[tuple[Generation, list[int]]]:
        """Dispatches the next chunk (when a slot still wants tokens), then waits for the chunk
        dispatched before it and returns each generation's new tokens from it (finished
        generations come with an empty list when the chunk held none for them)."""
        dispatched = self._dispatch()
        results = self._read(self.pending) if self.pending is not None else []
        self.pending = dispatched
        return results

    def _dispatch(self):
        running = [(row, s) for row, s in enumerate(self.owners) if s is not None]
        self.occupancy = len(running)
        if not any(s.tokens_queued < s.limit for _, s in running):
            self.occupancy = 0
            return None
        sampled = any(s.temperature > 0 for _, s in running)
        filtered = any(s.temperature > 0 and (s.top_k > 0 or s.top_p < 1) for _, s in running)
        self.state, out = decode_slots(self.graphdef, self.params, self.state, chunk=self.chunk, sampled=sampled,
                                       filtered=filtered)
        for _, generation in running:
            generation.tokens_queued += self.chunk
        return out, running

    def _read(self, pending):
        out, running = pending
        out = fetch(out, self.model.mesh)
        results = []
        for row, generation in running:
            if generation.finish_reason is not None:  # cancelled after this chunk was dispatched
                continue
            new = [int(t) for t in out[row] if t >= 0]
            generation.tokens.extend(new)
            # The loop's own test: a stop token, or the limit reached.
            stops = assistant_stop_tokens() if generation.stop_tokens is None else generation.stop_tokens
            if new and new[-1] in stops:
                generation.finish_reason = "stop"
            elif len(generation.tokens) >= generation.limit:
                generation.finish_reason = "length"
            if generation.finish_reason is not None:
                self._free(generation)
            if new or generation.finish_reason is not None:
                results.append((generation, new))
        return results

    def _free(self, generation: Generation) -> None:
        row = generation.slot
        if row is not None and self.owners[row] is generation:
            self.owners[row] = None
            self.state = release_slot(self.state, np.int32(row))
        generation.slot = None
