"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filtering), got {top_k}")


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


def sample_rows(logits, keys, temperature, top_p, top_k, *, sampled: bool, filtered: bool):
    """`sample` with settings per row: logits [b, vocab], keys [b] (typed PRNG keys), temperature
    [b] (0: greedy), top_p [b] (1: off), top_k [b] (0: off). Each row draws exactly what `sample`
    draws for it alone with the same settings and key. Static flags skip the work no row needs:
    `sampled` (some row has temperature > 0), `filtered` (some sampled row uses top-k or top-p)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sampled:
        return greedy
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if filtered:
        # One descending sort serves both filters: masking the values below the k-th keeps
        # the sorted order, so `ordered` is what `sample` sorts after its top-k step.
        ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
        use_top_k = (top_k > 0)[:, None]
        kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)
        scaled = jnp.where(use_top_k & (scaled < kth), -jnp.inf, scaled)
        ordered = jnp.where(use_top_k & (ordered < kth), -jnp.inf, ordered)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(before < top_p[:, None], ordered, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        scaled = jnp.where((top_p < 1)[:, None] & (scaled < threshold), -jnp.inf, scaled)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, scaled)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)
