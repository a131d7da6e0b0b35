"""gptoss_jax.introspect against independent computations: numpy routers and attention
softmaxes from the model's weights, the model's own attention output and logits."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import introspect
from gptoss_jax.model import apply_rope, rope_tables


@pytest.fixture(scope="module")
def model():
    # Windows shorter than the sequence, so sliding layers differ from full ones.
    return gptoss_jax.load("tiny", dtype="float32", seed=5)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 201088, size=(2, 40)).astype(np.int32)


@pytest.fixture(scope="module")
def trace(model, tokens):
    return introspect.run(model, tokens)


def rms_norm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def test_logit_lens_ends_at_the_models_logits(model, tokens, trace):
    lens = introspect.logit_lens(model, trace)
    c = model.config
    assert lens.shape == (c.num_hidden_layers + 1, *tokens.shape, c.vocab_size)
    np.testing.assert_array_equal(np.asarray(lens[-1]), np.asarray(model(tokens)))
    # An earlier layer is its residual stream through the final norm and the unembedding.
    h = rms_norm(trace.residual[1], model.norm.scale[...], c.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(lens[1]), h @ np.asarray(model.unembedding[...], np.float64).T,
                               rtol=1e-4, atol=1e-4)


def test_the_logit_lens_in_bf16_is_the_models_own_forward():
    bf16 = gptoss_jax.load("tiny", seed=2)
    tokens = np.arange(1000, 1040, dtype=np.int32)[None]
    trace = introspect.run(bf16, tokens)
    np.testing.assert_array_equal(np.asarray(introspect.logit_lens(bf16, trace)[-1]), np.asarray(bf16(tokens)))


def test_routing_counts_sum_to_tokens_times_k_and_follow_the_router(model, tokens, trace):
    c = model.config
    counts = np.asarray(introspect.routing_counts(trace, c.num_experts))
    assert counts.shape == (c.num_hidden_layers, c.num_experts)
    assert (counts.sum(axis=1) == tokens.size * c.experts_per_token).all()
    for layer, block in enumerate(model.blocks):
        # The MoE's input: the residual stream after this layer's attention.
        x = trace.residual[layer]
        mid, _ = block.attn(x, trace.positions, add_input=True)
        mlp = block.mlp
        h = rms_norm(mid, mlp.norm.scale[...], c.rms_norm_eps)
        logits = h @ np.asarray(mlp.router_w[...], np.float64).T + np.asarray(mlp.router_b[...], np.float64)
        top = np.argsort(-logits, axis=-1)[..., :c.experts_per_token]
        np.testing.assert_array_equal(np.sort(np.asarray(trace.experts[layer]), -1), np.sort(top, -1))
        want = np.bincount(top.reshape(-1), minlength=c.num_experts)
        np.testing.assert_array_equal(counts[layer], want)
        # The mixing weights are the softmax of the chosen logits.
        chosen = np.take_along_axis(logits, np.asarray(trace.experts[layer]), -1)
        softmax = np.exp(chosen - chosen.max(-1, keepdims=True))
        np.testing.assert_allclose(np.asarray(trace.expert_weights[layer]), softmax / softmax.sum(-1, keepdims=True),
                                   rtol=1e-5, atol=1e-6)


def numpy_attention(model, layer, x, positions):
    """Probabilities [b, heads, t, t] and sink probabilities [b, heads, t] from q, k and the sinks, in float64."""
    attn, c = model.blocks[layer].attn, model.config
    q, k, _ = attn.norm_qkv(x)
    cos, sin = rope_tables(c, positions, attn.dtype)
    q, k = np.asarray(apply_rope(q, cos, sin), np.float64), np.asarray(apply_rope(k, cos, sin), np.float64)
    groups = c.q_heads_per_kv_head
    k = k[:, :, np.arange(q.shape[2]) // groups]  # q head n reads kv head n // groups
    scores = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
    pos = np.asarray(positions)
    distance = pos[:, :, None] - pos[:, None, :]
    allowed = (distance >= 0) & ((distance < c.sliding_window) if attn.sliding else True)
    sink_logits = np.asarray(attn.sinks[...], np.float64)[None, :, None, None]
    scores = np.concatenate([np.where(allowed[:, None], scores, -np.inf),
                             np.broadcast_to(sink_logits, (*scores.shape[:3], 1))], axis=-1)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    probs, sinks = p[..., :-1], p[..., -1]
    return probs, sinks


@pytest.mark.parametrize("layer", [0, 1])  # a sliding layer, a full layer
def test_attention_and_sink_mass_match_a_direct_softmax(model, trace, layer):
    assert model.blocks[layer].attn.sliding == (layer == 0)
    x = trace.residual[layer]
    probs, sinks = numpy_attention(model, layer, x, trace.positions)
    np.testing.assert_allclose(np.asarray(trace.attention[layer]), probs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(trace.sink[layer]), sinks, atol=1e-5)
    np.testing.assert_allclose(np.asarray(introspect.sink_mass(trace)[layer]), sinks.mean(axis=(0, 2)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(trace.attention[layer].sum(-1) + trace.sink[layer]), 1.0, atol=1e-5)


def test_the_probabilities_are_the_ones_the_model_attends_with(model, trace):
    attn = model.blocks[1].attn
    x, positions = trace.residual[1], trace.positions
    q, k, v = attn.norm_qkv(x)
    rope = rope_tables(model.config, positions, attn.dtype)
    out = attn.attend(apply_rope(q, *rope), apply_rope(k, *rope), v, positions, positions)
    v = jnp.repeat(v, model.config.q_heads_per_kv_head, axis=2)
    mixed = jnp.einsum("bnts,bsnd->btnd", trace.attention[1], v, precision="highest")
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(out), rtol=1e-5, atol=1e-5)


def test_attention_span_is_the_probability_weighted_distance(model, trace):
    span = np.asarray(introspect.attention_span(trace))
    probs = np.asarray(trace.attention, np.float64)
    pos = np.asarray(trace.positions)
    distance = pos[:, :, None] - pos[:, None, :]
    want = (probs * distance[None, :, None]).sum(-1) / probs.sum(-1)
    np.testing.assert_allclose(span, want.mean(axis=(1, 3)), rtol=1e-5)
    window = model.config.sliding_window
    for layer, block in enumerate(model.blocks):
        if block.attn.sliding:
            assert (span[layer] < window).all()


def test_run_compiles_and_checks_its_tokens(model, tokens, trace):
    jitted = nnx.jit(introspect.run)(model, jnp.asarray(tokens))
    for got, want in zip(jitted, trace):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="token ids must be in"):
        introspect.run(model, np.array([[1, 201088]]))
    top = introspect.top_tokens(introspect.logit_lens(model, trace)[-1], 3)
    np.testing.assert_array_equal(np.asarray(top[..., 0]), np.asarray(model(tokens)).argmax(-1))
