"""What happens inside the model on a sequence: which experts each layer routes every token
to, how much attention probability each head gives its learned sink, how far back each
head looks, and what the residual stream would predict if the model stopped at each layer
(the logit lens).

    trace = introspect.run(model, tokens)                 # tokens int32 [batch, seq]
    introspect.routing_counts(trace, model.config.num_experts)   # [layers, experts]
    introspect.sink_mass(trace)                           # [layers, heads]
    introspect.attention_span(trace)                      # [layers, heads]
    introspect.logit_lens(model, trace)                   # [layers + 1, batch, seq, vocab]

`run` executes the model's own blocks on the XLA path, one after the other (the residual
stream is the model's, bit for bit), and recomputes each layer's attention probabilities
and routing from the same inputs. Every function is a pure function of the model and
arrays: wrap it in `nnx.jit` to compile it. The attention probabilities take
[layers, batch, heads, seq, seq] floats: meant for sequences of hundreds of tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.kernels.common import F32
from gptoss_jax.kernels.dispatch import XLA
from gptoss_jax.model import GptOss, apply_rope, rope_tables


class Trace(NamedTuple):
    """One forward pass, layer by layer.

    residual [layers + 1, batch, seq, embed]: the residual stream before the first block
    (the embeddings) and after each block. experts [layers, batch, seq, k] and
    expert_weights [layers, batch, seq, k]: the experts each token was routed to and their
    mixing weights. attention [layers, batch, heads, seq, seq] (fp32): each query's
    probability on each key; sink [layers, batch, heads, seq] (fp32): the probability left
    on the head's learned sink (a row of `attention` plus its `sink` sums to 1).
    positions [batch, seq]."""

    residual: jax.Array
    experts: jax.Array
    expert_weights: jax.Array
    attention: jax.Array
    sink: jax.Array
    positions: jax.Array


def attention_probabilities(attn, x, positions):
    """The attention probabilities of one layer (`model.blocks[i].attn`) on its input x
    [b, t, embed], computed as `Attention.attend` computes them (rounded scores, softmax in
    fp32 with the sink as an extra logit). Returns (probabilities [b, heads, t, t] fp32,
    sink probability [b, heads, t] fp32)."""
    c, dt = attn.config, attn.dtype
    q, k, _ = attn.norm_qkv(x)
    cos, sin = rope_tables(c, positions, dt)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    b, t, heads, hd = q.shape
    k = jnp.repeat(k, c.q_heads_per_kv_head, axis=2)  # q head n reads kv head n // groups
    scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=F32,
                        precision=jax.lax.Precision.HIGHEST if dt == F32 else jax.lax.Precision.DEFAULT)
    scores = (scores.astype(dt).astype(F32) * np.float32(hd ** -0.5)).astype(dt).astype(F32)
    qp, kp = positions[:, :, None], positions[:, None, :]
    allowed = kp <= qp
    if attn.sliding:
        allowed &= qp - kp < c.sliding_window
    scores = jnp.where(allowed[:, None], scores, -jnp.inf)
    sinks = attn.sinks[...].astype(F32)[None, :, None, None]
    peak = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sinks - peak)
    return weights / total, (jnp.exp(sinks - peak) / total)[..., 0]


def run(model: GptOss, tokens, positions=None) -> Trace:
    """The model's forward pass on tokens int32 [batch, seq] (positions default to
    0..seq-1), layer by layer on the XLA path, with what each layer did (see Trace)."""
    tokens = model._checked_tokens(tokens, positions)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    b, t = tokens.shape
    x = model.embedding[...][tokens]
    residual, experts, expert_weights, attention, sink = [x], [], [], [], []
    for block in model.blocks:
        probs, sink_probs = attention_probabilities(block.attn, x, positions)
        x, _ = block.attn(x, positions, kernels=XLA, add_input=True)
        _, routed, routed_weights = block.mlp.norm_route(x.reshape(b * t, -1))
        x = block.mlp(x, kernels=XLA, add_input=True)
        residual.append(x)
        experts.append(routed.reshape(b, t, -1))
        expert_weights.append(routed_weights.reshape(b, t, -1))
        attention.append(probs)
        sink.append(sink_probs)
    return Trace(jnp.stack(residual), jnp.stack(experts), jnp.stack(expert_weights), jnp.stack(attention),
                 jnp.stack(sink), positions)


def routing_counts(trace: Trace, num_experts: int) -> jax.Array:
    """[layers, experts] int32: how many tokens each layer routed to each expert (each token
    counts once for each of its k experts, so a layer's counts sum to tokens x k)."""
    one_hot = jax.nn.one_hot(trace.experts, num_experts, dtype=jnp.int32)  # [layers, b, t, k, experts]
    return one_hot.sum(axis=(1, 2, 3))


def sink_mass(trace: Trace) -> jax.Array:
    """[layers, heads]: the attention probability each head puts on its sink, averaged over
    the batch's queries."""
    return trace.sink.mean(axis=(1, 3))


def attention_span(trace: Trace) -> jax.Array:
    """[layers, heads]: how many positions back each head looks, on average (distance from
    query to key weighted by the attention probability, the sink's share excluded and the
    rest renormalised), over the batch's queries. Sliding layers cannot exceed their window."""
    distance = (trace.positions[:, :, None] - trace.positions[:, None, :]).astype(F32)  # [b, t, s]
    on_keys = trace.attention.sum(axis=-1)  # [layers, b, heads, t]
    mean = jnp.einsum("lbnts,bts->lbnt", trace.attention, distance) / jnp.maximum(on_keys, 1e-30)
    return mean.mean(axis=(1, 3))


def logit_lens(model: GptOss, trace: Trace) -> jax.Array:
    """[layers + 1, batch, seq, vocab]: the logits the model would give if the residual
    stream after each block (index 0: the embeddings) went straight to the final norm and the
    unembedding. The last entry is the model's own logits."""
    return model.unembed(model.norm(trace.residual))


def top_tokens(logits, k: int = 1) -> jax.Array:
    """The k most likely token ids [..., k] of logits [..., vocab]."""
    return jax.lax.top_k(logits, k)[1]
