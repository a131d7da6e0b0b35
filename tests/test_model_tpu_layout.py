"""A model whose kernels include the TPU expert kernel stores its experts in that kernel's
layout (moe_tpu.TpuExperts), converted once when the weights arrive: from every source the
loader reads (random weights, HF / original safetensors, converted Orbax checkpoints), by
`with_kernels`, and when the model moves to another mesh. The XLA reference path runs on
such a model through the exact inverse re-layout, so it gives the standard model's numbers
bit for bit; the kernels run in Pallas interpret mode here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaves

import gptoss_jax
from gptoss_jax import mxfp4
from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters.convert import convert
from gptoss_jax.kernels import Kernels, moe_tpu
from gptoss_jax.kernels.common import ExpertWeights
from gptoss_jax.loader import random_model, shard_model
from gptoss_jax.sharding.mesh import make_mesh
from gptoss_jax.testing import write_random_checkpoint

SMALL = GptOssConfig.preset("tiny").replace(name="small", vocab_size=256, num_hidden_layers=2)
TPU = Kernels(moe_tpu=True, decode_attention_tpu=True, interpret=True)
TOKENS = jnp.asarray([[3, 17, 99, 200, 5, 41]], jnp.int32)


def as_bits(array):
    array = np.asarray(array)
    return array.view(np.uint8) if array.dtype.itemsize == 1 else array


def assert_same_experts(a, b):
    for layer_a, layer_b in zip(a.blocks, b.blocks):
        for name, x, y in zip(ExpertWeights._fields, layer_a.mlp.expert_weights(), layer_b.mlp.expert_weights()):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(as_bits(x), as_bits(y), err_msg=name)


@pytest.fixture(scope="module")
def standard():
    return random_model(SMALL, dtype=jnp.float32, seed=4)


@pytest.fixture(scope="module")
def stored_for_tpu():
    return random_model(SMALL, dtype=jnp.float32, seed=4, kernels=TPU)


def test_experts_are_stored_in_the_kernel_layout(standard, stored_for_tpu):
    mlp = stored_for_tpu.blocks[0].mlp
    assert mlp.tpu_layout and not standard.blocks[0].mlp.tpu_layout
    stored = mlp.stored_experts()
    assert isinstance(stored, moe_tpu.TpuExperts) and stored.mlp1_bytes.dtype == jnp.uint8
    assert not hasattr(mlp, "mlp1_fp4")  # one copy of the experts, in one layout
    expected = moe_tpu.tpu_experts(standard.blocks[0].mlp.expert_weights())
    for name, x, y in zip(moe_tpu.TpuExperts._fields, stored, expected):
        np.testing.assert_array_equal(as_bits(x), as_bits(y), err_msg=name)
    assert_same_experts(standard, stored_for_tpu)  # the inverse re-layout is exact


def test_xla_path_on_the_tpu_layout_is_the_reference_bit_for_bit(standard, stored_for_tpu):
    want = np.asarray(standard(TOKENS))
    np.testing.assert_array_equal(np.asarray(stored_for_tpu.with_kernels(Kernels.xla())(TOKENS)), want)


def test_tpu_kernels_match_the_reference_in_fp32(standard, stored_for_tpu):
    want = np.asarray(standard(TOKENS))
    got = np.asarray(stored_for_tpu(TOKENS))  # prefill: the expert kernel over grouped tiles
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_with_kernels_converts_once_and_leaves_the_original(standard):
    converted = standard.with_kernels(TPU)
    assert converted.blocks[1].mlp.tpu_layout and not standard.blocks[1].mlp.tpu_layout
    assert_same_experts(standard, converted)
    # Going back to XLA keeps the TPU layout (the reference reads it through the inverse).
    assert converted.with_kernels(Kernels.xla()).blocks[1].mlp.tpu_layout


@pytest.mark.parametrize("layout", ["hf", "original", "converted"])
def test_every_source_loads_into_the_tpu_layout(tmp_path, layout):
    root = write_random_checkpoint(tmp_path / "src", SMALL, "original" if layout == "original" else "hf", seed=6)
    if layout == "converted":
        convert(root, tmp_path / "converted", progress=False)
        root = tmp_path / "converted"
    on_tpu, reference = gptoss_jax.load(root, kernels=TPU), gptoss_jax.load(root, kernels="xla")
    assert all(block.mlp.tpu_layout for block in on_tpu.blocks)
    assert_same_experts(on_tpu, reference)
    other = {p: v for p, v in leaves(on_tpu).items() if "tpu_experts" not in p}
    for path, value in other.items():
        np.testing.assert_array_equal(value, leaves(reference)[path], err_msg=str(path))


def test_scales_the_kernel_cannot_decode_are_refused_at_load():
    config = SMALL.replace(num_hidden_layers=1)
    model = random_model(config, seed=1)
    mlp = model.blocks[0].mlp
    mlp.mlp2_scales[...] = mlp.mlp2_scales[...].at[0, 0, 0].set(mxfp4.scales_to_e8m0(jnp.uint8(253)))
    with pytest.raises(ValueError, match="TPU kernels decode scales up to"):
        model.with_kernels(TPU)


@pytest.mark.parametrize("spec", ["4x2", "2x1", "1x2"])
def test_a_mesh_splits_the_stored_layout_and_keeps_the_values(stored_for_tpu, spec):
    """The mlp2 scale rows are padded per shard of the hidden units, so a mesh whose model
    axis splits them another way re-lays them out; the values stay."""
    mesh = make_mesh(spec, jax.devices()[:int(np.prod([int(n) for n in spec.split("x")]))])
    sharded = shard_model(stored_for_tpu, mesh)
    mlp = sharded.blocks[0].mlp
    assert mlp.tpu_layout and mlp.hidden_shards == mesh.shape["model"]
    shards = {s.data.shape for s in mlp.stored_experts().mlp2_scales.addressable_shards}
    assert len(shards) == 1
    assert_same_experts(stored_for_tpu, sharded)
    back = shard_model(sharded, None)
    assert back.blocks[0].mlp.hidden_shards == 1
    assert_same_experts(stored_for_tpu, back)
