import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_bit_identical, leaves, rewrite_tensor

import gptoss_jax
from gptoss_jax import CheckpointError
from gptoss_jax.config import GptOssConfig
from gptoss_jax.loader import random_model
from gptoss_jax.testing import write_random_checkpoint

SMALL = GptOssConfig.preset("tiny").replace(name="small", vocab_size=256, num_hidden_layers=2)


def test_both_layouts_load_to_identical_parameters(tmp_path):
    hf = write_random_checkpoint(tmp_path / "hf", SMALL, "hf", seed=5, max_shard_bytes=50_000)
    write_random_checkpoint(tmp_path / "orig", SMALL, "original", seed=5)
    assert len(list(hf.glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "orig" / "original" / "dtypes.json").exists()
    from_hf, from_original = gptoss_jax.load(hf), gptoss_jax.load(tmp_path / "orig")
    assert_bit_identical(from_hf, from_original)
    assert_bit_identical(from_hf, random_model(SMALL, seed=5))  # the writer holds random_model's weights
    experts = from_hf.blocks[0].mlp
    assert experts.mlp1_fp4.dtype == jnp.float4_e2m1fn and experts.mlp1_scales.dtype == jnp.float8_e8m0fnu


def test_fp32_load_holds_the_same_values(tmp_path):
    root = write_random_checkpoint(tmp_path, SMALL, "hf", seed=1)
    a, b = leaves(gptoss_jax.load(root)), leaves(gptoss_jax.load(root, dtype="float32"))
    for path in a:
        np.testing.assert_array_equal(a[path].astype(np.float32), b[path].astype(np.float32), err_msg=str(path))


@pytest.fixture
def original_checkpoint(tmp_path):
    write_random_checkpoint(tmp_path, SMALL, "original", seed=0)
    return tmp_path, tmp_path / "original" / "model.safetensors"


@pytest.mark.parametrize("edit, message", [
    (lambda f: rewrite_tensor(f, "block.0.attn.sinks", None), "missing tensor 'block.0.attn.sinks'"),
    (lambda f: rewrite_tensor(f, "block.9.extra", np.zeros(3, np.float32)), "unexpected tensor 'block.9.extra'"),
    (lambda f: rewrite_tensor(f, "norm.scale", np.zeros(7, ml_dtypes.bfloat16)), "'norm.scale' has shape \\[7\\]"),
    (lambda f: rewrite_tensor(f, "block.1.mlp.mlp1_weight.blocks",
                        np.zeros((8, 128, 2, 16), ml_dtypes.bfloat16)), "dtype BF16, expected U8"),
    (lambda f: rewrite_tensor(f, "block.0.mlp.mlp2_weight.scales", np.full((8, 64, 2), 255, np.uint8)), "scale 255"),
    (lambda f: f.write_bytes(f.read_bytes()[:-100]), "truncated"),
    (lambda f: f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"), "corrupt header"),
])
def test_bad_checkpoints_name_file_and_tensor(original_checkpoint, edit, message):
    root, shard = original_checkpoint
    edit(shard)
    with pytest.raises(CheckpointError, match=message) as info:
        gptoss_jax.load(root)
    assert "model.safetensors" in str(info.value) or str(root) in str(info.value)


def test_index_naming_a_missing_shard(tmp_path):
    root = write_random_checkpoint(tmp_path, SMALL, "hf", seed=0, max_shard_bytes=50_000)
    victim = sorted(root.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{victim.name}'"):
        gptoss_jax.load(root)


def test_config_missing_a_field(tmp_path):
    root = write_random_checkpoint(tmp_path, SMALL, "hf", seed=0)
    config = json.loads((root / "config.json").read_text())
    del config["num_attention_heads"]
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'num_attention_heads' is missing"):
        gptoss_jax.load(root)


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        gptoss_jax.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a gpt-oss checkpoint"):
        gptoss_jax.load(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        gptoss_jax.load("tiny", dtype="float16")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name):
    root = write_random_checkpoint(tmp_path, SMALL, "hf", seed=0, max_shard_bytes=50_000)
    (root / name).write_bytes(b"\xff\xfe{\"not\": \"utf-8 \x80\"}")
    with pytest.raises(CheckpointError, match="UTF-8") as info:
        gptoss_jax.load(root)
    assert str(root / name) in str(info.value)
