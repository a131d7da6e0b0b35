"""Parity of the model with HF transformers' GptOssForCausalLM on random checkpoints."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import hf_logits

import gptoss_jax
from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters.safetensors_io import SafetensorsFile, write_safetensors
from gptoss_jax.loader import random_model
from gptoss_jax.model import MoE
from gptoss_jax.testing import write_random_checkpoint

BASE = GptOssConfig.preset("tiny")
# Together: head_dim != heads, 1 < kv heads < heads, sequences several windows long, odd
# layer counts, k > 2 experts per token, pre-activations past the SwiGLU clamp, real vocab.
PARITY_CASES = {
    "gqa-odd-layers": (BASE.replace(name="a", num_hidden_layers=5, sliding_window=8, vocab_size=4096), 2, (2, 48)),
    "wide-heads": (BASE.replace(name="b", num_hidden_layers=3, hidden_size=96, intermediate_size=32, head_dim=32,
                                num_attention_heads=6, num_key_value_heads=3, num_experts=6, experts_per_token=3,
                                sliding_window=4, vocab_size=1000), 3, (3, 30)),
    "mqa-real-vocab": (BASE.replace(name="c", num_hidden_layers=4, hidden_size=32, intermediate_size=96, head_dim=64,
                                    num_attention_heads=2, num_key_value_heads=1, num_experts=4, experts_per_token=2,
                                    sliding_window=16), 1, (1, 70)),
}


def _clamp_pre_activations(model, tokens, monkeypatch):
    seen = []
    original = MoE.swiglu

    def spy(self, u):
        seen.append(float(jnp.max(jnp.abs(u.astype(jnp.float32)))))
        return original(self, u)

    monkeypatch.setattr(MoE, "swiglu", spy)
    logits = model(tokens)
    monkeypatch.setattr(MoE, "swiglu", original)
    return logits, max(seen)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_fp32_logits_match_transformers(case, tmp_path, monkeypatch):
    config, shift, shape = PARITY_CASES[case]
    root = write_random_checkpoint(tmp_path, config, "hf", seed=11, expert_scale_shift=shift)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, shape).astype(np.int32)
    model = gptoss_jax.load(root, dtype="float32")
    ours, peak = _clamp_pre_activations(model, tokens, monkeypatch)
    ref = hf_logits(root, tokens, __import__("torch").float32)
    rel = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    print(f"{case}: max|ours-HF|/max|HF| = {rel:.2e}, peak |pre-activation| = {peak:.1f}")
    assert rel <= 1e-4
    assert peak > config.swiglu_limit  # the clamp was engaged
    assert shape[1] >= 3 * config.sliding_window


def _tie_unembedding_to_a_permuted_embedding(root, config):
    """Random unembeddings put thousands of near-equal logits at the top of a 201088-way
    argmax, so any rounding flips it. Trained models have a decisive top logit; tying the
    unembedding to a permutation of the embedding gives this random model one too."""
    weight_map = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    embedding = np.asarray(SafetensorsFile(root / weight_map["model.embed_tokens.weight"])
                           .get("model.embed_tokens.weight")).astype(np.float32)
    permutation = np.random.default_rng(5).permutation(config.vocab_size)
    unembedding = np.empty_like(embedding)
    unembedding[permutation] = embedding / np.sqrt(config.hidden_size)
    shard = root / weight_map["lm_head.weight"]
    source = SafetensorsFile(shard)
    arrays = {name: np.array(source.get(name)) for name in source.names()}
    arrays["lm_head.weight"] = unembedding.astype(ml_dtypes.bfloat16)
    del source
    write_safetensors(shard, [(n, a.shape, a.dtype) for n, a in arrays.items()], arrays.__getitem__)


def test_bf16_tracks_transformers_bf16(tmp_path):
    import torch

    config = BASE.replace(name="bf16", sliding_window=8)
    root = write_random_checkpoint(tmp_path, config, "hf", seed=1)
    _tie_unembedding_to_a_permuted_embedding(root, config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 64)).astype(np.int32)
    ours = np.asarray(gptoss_jax.load(root)(tokens)).astype(np.float32)
    ref = hf_logits(root, tokens, torch.bfloat16)
    ref32 = hf_logits(root, tokens, torch.float32)
    agreement = (ours.argmax(-1) == ref.argmax(-1)).mean()
    max_diff = np.abs(ours - ref).max()
    print(f"bf16: argmax agreement {agreement:.4f}, max|ours-HF| {max_diff:.3f} of max|HF| {np.abs(ref).max():.2f}; "
          f"HF bf16 vs HF fp32 {np.abs(ref - ref32).max():.3f}")
    assert agreement >= 0.99
    assert max_diff <= 0.05 * np.abs(ref).max()
    assert max_diff <= 2 * np.abs(ref - ref32).max() + 0.05  # no further from HF than HF's own bf16 error


def test_expert_strategies_agree():
    """The gathered (few tokens) and grouped (many tokens) expert paths compute the same thing."""
    model = random_model(BASE, dtype=jnp.float32, seed=2, expert_scale_shift=1)
    moe = model.blocks[0].mlp
    x = np.random.default_rng(1).normal(size=(1, 3, BASE.hidden_size)).astype(np.float32)
    h = moe.norm(jnp.asarray(x)).reshape(3, -1)
    experts, _ = moe.route(h)
    np.testing.assert_allclose(np.asarray(moe.experts_gathered(h, experts)),
                               np.asarray(moe.experts_grouped(h, experts)), rtol=1e-5, atol=1e-5)


def test_cached_extension_matches_the_full_forward():
    config = BASE.replace(sliding_window=4, num_hidden_layers=2, vocab_size=300)
    model = random_model(config, dtype=jnp.float32, seed=4)
    tokens = np.random.default_rng(2).integers(0, 300, (2, 19)).astype(np.int32)
    full = np.asarray(model(tokens))
    caches = model.init_cache(2, 32)
    positions = np.broadcast_to(np.arange(19, dtype=np.int32), (2, 19))
    logits, caches = model.extend(tokens[:, :7], positions[:, :7], caches)  # prefill longer than the window
    pieces = [np.asarray(logits)]
    for t in range(7, 19):  # then one token at a time, wrapping the 4-slot ring several times
        logits, caches = model.extend(tokens[:, t:t + 1], positions[:, t:t + 1], caches)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
    assert caches[0].k.shape[1] == 4 and caches[1].k.shape[1] == 32


def test_public_smoke_call():
    logits = gptoss_jax.load("tiny")(np.ones((1, 4), "int32"))
    assert logits.shape == (1, 4, 201088) and logits.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(logits, np.float32)).all()


# ------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_model():
    return random_model(BASE.replace(vocab_size=512, num_hidden_layers=1), dtype=jnp.float32)


@pytest.mark.parametrize("tokens, message", [
    (np.array([1, 2, 3]), r"tokens must be a 2-D array \[batch, seq\] of token ids, got shape \(3,\); for one sequence "
                          r"pass tokens\[None\]"),
    (np.zeros((1, 2, 3), np.int32), r"got shape \(1, 2, 3\)"),
    (np.array([[1.0, 2.0]]), "tokens must be integer token ids, got float64"),
    (np.array([[True, False]]), "tokens must be integer token ids, got bool"),
    (np.array([[5, -1]]), r"token ids must be in \[0, 512\), got -1"),
    (np.array([[512, 3]]), r"token ids must be in \[0, 512\), got 512"),
    (jnp.array([[7, 600]]), r"token ids must be in \[0, 512\), got 600"),
])
def test_bad_tokens_get_a_clear_error(small_model, tokens, message):
    with pytest.raises(ValueError, match=message):
        small_model(tokens)
    caches = small_model.init_cache(1, 8)
    with pytest.raises(ValueError, match=message):
        small_model.extend(tokens, np.zeros(np.shape(tokens), np.int32), caches)


def test_positions_must_match_the_tokens(small_model):
    with pytest.raises(ValueError, match=r"positions must have the tokens' shape \(1, 3\), got \(1, 2\)"):
        small_model(np.array([[1, 2, 3]]), np.array([[0, 1]]))
