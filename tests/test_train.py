"""Fine-tuning (gptoss_jax.train): gradients against HF transformers' torch autograd, LoRA
gradients against the chain rule through the frozen base, merged and unmerged adapters,
quantization-aware training against the export, adapter files, and training on a mesh."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import mxfp4, train
from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters.layouts import DENSE, HF, tensor_from_leaves, tensor_specs, write_checkpoint
from gptoss_jax.dataset import batch_from_rows
from gptoss_jax.engine import generate
from gptoss_jax.kernels.common import NO_POSITION
from gptoss_jax.loader import random_model, shard_model
from gptoss_jax.model import AdapterParam, abstract_model
from gptoss_jax.sharding.mesh import make_mesh

# Two layers (one sliding over a window shorter than the sequence, one full), k = 4 of 8
# experts, 3 KV groups of 2 heads, a vocabulary small enough for quick unembeddings.
CONFIG = GptOssConfig.preset("tiny").replace(name="grad", num_hidden_layers=2, sliding_window=8, vocab_size=1000,
                                             num_attention_heads=6, num_key_value_heads=3)


@pytest.fixture(scope="module")
def base():
    """One random fp32 model; tests take copies (`fresh`), which costs no compilation."""
    return random_model(CONFIG, dtype=jnp.float32, seed=2, expert_scale_shift=1)  # SwiGLU clamp engaged


def fresh(model, dtype=jnp.float32):
    """A copy of `model` (without adapters) holding its values in `dtype`."""
    graphdef, leaves = abstract_model(model.config, jnp.dtype(dtype), model.mesh, model.kernels)
    values = dict(nnx.to_flat_state(nnx.state(model)))
    for path, var in leaves:
        value = values[path].get_value()
        var.set_value(value if value.dtype == var.dtype else value.astype(var.dtype))
    copy = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    copy.update_weight_facts()
    return copy


@nnx.jit
def logits(model, tokens, positions=None, segment_ids=None):
    return model(tokens, positions, segment_ids)


def random_batch(config, rows, length, seed=0, packed=False):
    """Next-token rows with a random loss mask; `packed`: two documents per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (rows, length + 1)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    segments = None
    if packed:
        cut = length // 3
        positions[:, cut:] -= cut
        segments = np.where(np.arange(length) < cut, 1, 2).astype(np.int32)[None].repeat(rows, 0)
    mask = (rng.random((rows, length)) < 0.7).astype(np.float32)
    return batch_from_rows(tokens[:, :-1], positions, tokens[:, 1:], mask, segments)


def gradients(model, method, batch, **kwargs):
    """{parameter path: gradient} of the mean loss for the parameters `method` trains."""
    graphdef, params, rest = nnx.split(model, train.trainable_filter(method), ...)

    def loss(params):
        return train.mean_loss(nnx.merge(graphdef, params, rest, copy=True), batch, **kwargs)

    grads = jax.jit(jax.grad(loss))(params)
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def hf_gradients(root, batch):
    """Gradients of the same loss in HF transformers (fp32, experts dequantized and frozen), by
    checkpoint tensor name."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(root, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.float32, attn_implementation="eager")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.endswith(("experts.gate_up_proj", "experts.down_proj")))
    logits = model(torch.from_numpy(batch.tokens).long()).logits
    targets = np.zeros(batch.tokens.shape, np.int64)
    mask = np.zeros(batch.tokens.shape, np.float32)
    for row, kept in enumerate(batch.loss_mask > 0):
        targets[row, batch.loss_positions[row, kept]] = batch.targets[row, kept]
        mask[row, batch.loss_positions[row, kept]] = batch.loss_mask[row, kept]
    nll = -torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(targets)[..., None])[..., 0]
    mask = torch.from_numpy(mask)
    ((nll * mask).sum() / mask.sum()).backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters() if p.requires_grad}


def write_hf_checkpoint(model, path):
    """`model`'s weights (bf16 values, as random models draw them) in the HF layout."""
    leaves = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    return write_checkpoint(path, model.config, HF, lambda spec: tensor_from_leaves(spec, leaves.__getitem__))


def test_full_gradients_match_transformers(base, tmp_path):
    """Every trainable parameter: attention weights and biases, sinks, norms, router, expert
    biases, embeddings; the FP4 expert weights are frozen in both."""
    root = write_hf_checkpoint(base, tmp_path)
    batch = random_batch(CONFIG, 2, 20)
    ours = gradients(base, "full", batch, chunk=8)
    theirs = hf_gradients(root, batch)
    compared = {}
    for spec in tensor_specs(CONFIG, HF):
        [part] = spec.parts
        if part.kind == DENSE:
            compared[spec.name] = relative(ours.pop(part.leaf), theirs.pop(spec.name).reshape(part.leaf_shape))
    assert not ours and not theirs  # every trainable parameter of each side was compared
    worst = sorted(compared.items(), key=lambda kv: -kv[1])[:3]
    print(f"{len(compared)} parameters; largest max|ours - HF| / max|HF|: " +
          ", ".join(f"{name} {value:.1e}" for name, value in worst))
    assert max(compared.values()) <= 1e-4


def random_adapters(model, lora, seed=1):
    """Adapters with random B (a trained state, not the zero B of initialisation), small
    enough that the adapted weights stay near the model's own."""
    train.add_lora(model, lora, seed=seed)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, AdapterParam)):
        if path[-1] == "b":
            var.set_value(jnp.asarray(rng.normal(size=var.shape) * 0.05, jnp.float32))
    return model


def test_lora_gradients_follow_the_chain_rule(base):
    """d loss / d B = scale * G A^T and d loss / d A = scale * B^T G, G the gradient of the
    adapted weight W + scale B A (of each expert for mlp1 and mlp2), computed on a model that
    holds the merged weights (attention, router) and full expert deltas."""
    lora = train.LoraConfig(rank=3, alpha=6.0, targets=train.TARGETS)
    adapted = random_adapters(fresh(base), lora)
    batch = random_batch(CONFIG, 2, 24)
    lora_grads = gradients(adapted, "lora", batch, remat=False)

    merged = fresh(base)
    train.add_expert_deltas(merged)
    for layer, target, adapter in train.adapter_modules(adapted):
        a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
        if target in train.EXPERT_TARGETS:
            merged.blocks[layer].mlp.adapters[target].delta[...] = lora.scale * np.einsum("eor,eri->eoi", b, a)
        else:
            owner = merged.blocks[layer].attn if target in train.ATTENTION_TARGETS else merged.blocks[layer].mlp
            weight = getattr(owner, "router_w" if target == "router" else "w" + target)
            weight[...] = np.asarray(weight[...]) + lora.scale * np.tensordot(b, a, axes=1)
    full_grads = gradients(merged, "full", batch, remat=False)

    worst = {}
    for layer, target, adapter in train.adapter_modules(adapted):
        a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
        where = ("blocks", layer, "attn" if target in train.ATTENTION_TARGETS else "mlp")
        if target in train.EXPERT_TARGETS:
            g = full_grads[(*where, "adapters", target, "delta")]  # [e, out, in]
            want_b = lora.scale * np.einsum("eoi,eri->eor", g, a)
            want_a = lora.scale * np.einsum("eor,eoi->eri", b, g)
        else:
            g = full_grads[(*where, "router_w" if target == "router" else "w" + target)]
            rank = a.shape[0]
            g2 = g.reshape(b.size // rank, a.size // rank)  # [outputs, inputs]
            want_b = lora.scale * (g2 @ a.reshape(rank, -1).T).reshape(b.shape)
            want_a = lora.scale * (b.reshape(-1, rank).T @ g2).reshape(a.shape)
        prefix = (*where, "adapters", target)
        worst[f"{layer}/{target}"] = max(relative(lora_grads[(*prefix, "b")], want_b),
                                         relative(lora_grads[(*prefix, "a")], want_a))
    print("largest relative difference from the chain rule: " +
          ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items(), key=lambda kv: -kv[1])[:3]))
    assert len(worst) == 2 * len(train.TARGETS) and max(worst.values()) <= 1e-4


def test_a_logit_bias_of_log_k_is_the_loss_with_that_row_tied_k_times(base):
    """A vocabulary of 1000 rows whose last row stands for k tied rows: its loss with a bias of
    log k on that row equals the loss of the 999 + k row vocabulary holding k copies of it."""
    k = 5000
    batch = random_batch(CONFIG, 2, 12, seed=4)
    batch = batch._replace(targets=np.minimum(batch.targets, CONFIG.vocab_size - 2))  # the tied rows are never targets
    wide = random_model(CONFIG.replace(vocab_size=CONFIG.vocab_size - 1 + k), dtype=jnp.float32, seed=2)
    for name in ("embedding", "unembedding"):
        rows = getattr(base, name)[...]
        getattr(wide, name).set_value(jnp.concatenate([rows, jnp.repeat(rows[-1:], k - 1, axis=0)]))
    wide.blocks = base.blocks
    wide.norm = base.norm
    biased = train.loss_sums(base, batch, logit_bias=((CONFIG.vocab_size - 1, float(np.log(k))),))
    tied = train.loss_sums(wide, batch)
    np.testing.assert_allclose(np.asarray(biased), np.asarray(tied), rtol=1e-5)
    plain = train.loss_sums(base, batch)
    assert float(biased[0]) > float(plain[0]) + 1e-3


def test_packed_documents_do_not_see_each_other(base):
    """Row 0 packs two documents (tokens 0-9 and 10-29, positions restarting); rows 1 and 2
    hold each alone, padded."""
    packed = random_batch(CONFIG, 1, 30, packed=True)
    tokens = np.repeat(packed.tokens, 3, axis=0)
    positions = np.repeat(packed.positions, 3, axis=0)
    segments = np.repeat(packed.segment_ids, 3, axis=0)
    positions[1, 10:] = positions[2, :10] = NO_POSITION
    segments[1, 10:] = segments[2, :10] = 0
    out = np.asarray(logits(base, tokens, positions, segments))
    np.testing.assert_allclose(out[0, :10], out[1, :10], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 10:], out[2, 10:], rtol=1e-5, atol=1e-5)
    unsegmented = np.asarray(logits(base, tokens[:1], positions[:1]))  # without segment ids they mix
    assert np.abs(unsegmented[0, 10:] - out[0, 10:]).max() > 1e-2


def test_expert_adapters_agree_on_the_gathered_and_grouped_paths(base):
    lora = train.LoraConfig(rank=2, targets=("mlp1", "mlp2"))
    moe = random_adapters(fresh(base), lora).blocks[0].mlp
    h = jnp.asarray(np.random.default_rng(1).normal(size=(3, CONFIG.hidden_size)), jnp.float32)
    experts, _ = moe.route(h)
    np.testing.assert_allclose(np.asarray(moe.experts_gathered(h, experts)), np.asarray(moe.experts_grouped(h, experts)),
                               rtol=1e-5, atol=1e-5)


def test_merged_adapters_compute_what_the_unmerged_ones_do(base):
    """Attention and router adapters merge exactly (fp32); generation runs either way."""
    lora = train.LoraConfig(rank=2, targets=("q", "k", "v", "o", "router"))
    adapted = random_adapters(fresh(base), lora)
    merged, report = train.merge_adapters(adapted)
    assert report == [] and not train.has_adapters(merged)
    tokens = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (2, 20))
    np.testing.assert_allclose(np.asarray(logits(adapted, tokens)), np.asarray(logits(merged, tokens)),
                               rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(logits(base, tokens)) - np.asarray(logits(merged, tokens))).max() > 1e-2  # they act
    [generated] = generate(adapted, [list(tokens[0, :9])], max_new_tokens=6, temperature=0, stop_tokens=[])
    sequence = np.array([list(tokens[0, :9]) + generated])
    assert list(np.asarray(logits(merged, sequence))[0, 8:-1].argmax(-1)) == generated  # greedy, as merged


def test_quantization_aware_forward_is_the_exported_model(base):
    """With quantization-aware expert adapters, the forward uses exactly the MXFP4 weights the
    merge exports: the merged model gives the same logits bit for bit (bf16)."""
    lora = train.LoraConfig(rank=2, targets=("mlp1", "mlp2"), expert_layers=(1,))
    adapted = train.set_quantization_aware(random_adapters(fresh(base, jnp.bfloat16), lora))
    merged, report = train.merge_adapters(adapted)
    for name in ("mlp1_fp4", "mlp1_scales", "mlp2_fp4", "mlp2_scales"):  # the unadapted layer: the same arrays
        assert getattr(merged.blocks[0].mlp, name).get_value() is getattr(adapted.blocks[0].mlp, name).get_value()
    tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 24))
    np.testing.assert_array_equal(np.asarray(logits(adapted, tokens), np.float32),
                                  np.asarray(logits(merged, tokens), np.float32))
    assert [r.tensor for r in report] == ["blocks/1/mlp/mlp1", "blocks/1/mlp/mlp2"]
    assert all(0 < r.relative_error < 0.2 for r in report)
    for name in ("mlp1_fp4", "mlp1_scales", "mlp2_fp4", "mlp2_scales"):  # and its bytes are the source's
        np.testing.assert_array_equal(np.asarray(getattr(merged.blocks[0].mlp, name)[...]).view(np.uint8),
                                      np.asarray(getattr(base.blocks[0].mlp, name)[...]).view(np.uint8))


def test_mxfp4_quantization_rounds_to_nearest_with_the_smallest_fitting_scale():
    values = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4, np.float32)  # ties
    np.testing.assert_array_equal(np.asarray(mxfp4.fake_quantize(values[None] * 8))[0],
                                  np.array([0, 1, 1, 2, 2, 4, 4, 6] * 4, np.float32) * 8)
    codes = mxfp4.blocks_to_fp4(np.random.default_rng(0).integers(0, 256, (3, 16)).astype(np.uint8))
    scales = mxfp4.scales_to_e8m0(np.array([100, 127, 250], np.uint8))  # normal fp32 results (CPUs flush subnormals)
    exact = mxfp4.dequantize(codes[:, None], scales[:, None], jnp.float32)  # already MXFP4: kept exactly
    np.testing.assert_array_equal(np.asarray(mxfp4.fake_quantize(exact)), np.asarray(exact))


def test_adapter_files_round_trip(base, tmp_path):
    lora = train.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "mlp2"), expert_layers=(0,))
    adapted = random_adapters(fresh(base), lora)
    path = train.save_adapters(adapted, tmp_path / "a.safetensors", lora)
    loaded = fresh(base)
    assert train.load_adapters(loaded, path) == lora
    tokens = np.arange(12)[None] % CONFIG.vocab_size
    np.testing.assert_array_equal(np.asarray(logits(adapted, tokens)), np.asarray(logits(loaded, tokens)))
    adapter_bytes = sum(v.get_value().size * 4 for _, v in nnx.to_flat_state(nnx.state(adapted, AdapterParam)))
    assert path.stat().st_size < adapter_bytes + 4096  # the adapters and a header, nothing else
    other = nnx.eval_shape(lambda: gptoss_jax.GptOss(CONFIG.replace(hidden_size=96)))
    with pytest.raises(ValueError, match="another model shape .*hidden_size"):
        train.load_adapters(other, path)


@pytest.mark.parametrize("rows", [2, 4])
def test_training_on_a_mesh_matches_one_device(base, rows):
    """Data x expert x model mesh (2x2x2): batch rows over the data axis, adapters sharded like
    the weights they adapt; the same losses and weights as on one device (fp32). 2 rows of 64
    tokens take the replicated MoE strategy, 4 rows the all-to-all one."""
    lora = train.LoraConfig(rank=2, targets=train.TARGETS)
    optimizer = train.OptimizerConfig(learning_rate=1e-2, steps=3)
    batch = random_batch(CONFIG, rows, 64, packed=True)
    results = []
    for mesh in (None, make_mesh("2x2x2")):
        model = fresh(base) if mesh is None else shard_model(base, mesh)
        trainer = train.Trainer(train.add_lora(model, lora, seed=1), "lora", optimizer)
        losses = [trainer.step(batch)["loss"] for _ in range(3)]
        results.append((losses, {k: np.asarray(v) for k, v in trainer.state["params"].items()}))
    (losses, params), (mesh_losses, mesh_params) = results
    np.testing.assert_allclose(mesh_losses, losses, rtol=1e-5)
    assert losses[2] < losses[0]
    # Adam divides each gradient by its own running size, so an element whose gradient is
    # near zero turns fp32 summation-order noise into a sizeable part of a step (0.4% of one
    # seen): the weights agree to 1% of one step (lr), where a wrong gradient moves a weight by
    # a whole step; the gradients themselves are compared tightly below.
    for key in params:
        np.testing.assert_allclose(mesh_params[key], params[key], rtol=1e-4, atol=1e-2 * optimizer.learning_rate,
                                   err_msg=key)
    trained = random_adapters(fresh(base), lora)
    one = gradients(trained, "lora", batch)
    on_mesh = gradients(random_adapters(shard_model(base, make_mesh("2x2x2")), lora), "lora", batch)
    for path in one:
        assert relative(on_mesh[path], one[path]) < 1e-4, path
    sharded = trainer.state["params"]["blocks/0/mlp/adapters/mlp1/b"].sharding
    assert sharded.spec[:2] == ("expert", "model")


def test_after_a_failed_save_only_closed_loop_reports_are_dropped(monkeypatch, capsys):
    # tensorstore reports its late callbacks through PyErr_Print, which calls sys.excepthook.
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    train._drop_closed_loop_reports()
    train._drop_closed_loop_reports()  # once is enough: a second call does not wrap again
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    assert capsys.readouterr().err == ""
    sys.excepthook(RuntimeError, RuntimeError("something else"), None)
    assert "something else" in capsys.readouterr().err
