"""gptoss_jax.plan without compiling: the byte bound, GPU targets sized from shapes, and one
clear line for every bad request. The TPU compiles are in tests/test_tpu_aot.py."""

import pytest

from gptoss_jax import plan
from gptoss_jax.config import GptOssConfig
from gptoss_jax.sharding.mesh import MeshSpec

GB = 1e9


@pytest.mark.parametrize("name, published", [("gpt-oss-20b", 3.70), ("gpt-oss-120b", 5.0)])
def test_byte_bound_is_the_bytes_a_token_must_read(name, published):
    """At context 1 and batch 1: the attention weights, the 4 routed experts (17 bytes per
    32 weights), the unembedding and the norms: about 3.70 GB for 20b, 5.0 GB for 120b."""
    bound = plan.byte_bound(GptOssConfig.preset(name), MeshSpec(1, 1, 1), batch=1, context=1)
    assert bound / GB == pytest.approx(published, rel=0.01)


def test_byte_bound_grows_by_the_cache_a_step_reads():
    c = GptOssConfig.preset("gpt-oss-120b")
    spec = MeshSpec(1, 4, 2)
    grown = plan.byte_bound(c, spec, 1, 32768) - plan.byte_bound(c, spec, 1, 128)
    full_layers = c.num_hidden_layers // 2
    row = 2 * (c.num_key_value_heads // 2) * c.head_dim * 2  # keys and values, KV heads split 2 ways, bf16
    assert grown == full_layers * (32768 - 128) * row
    # Per chip a batch reads its routed experts once: 8 tokens route 32 pairs, at most the
    # chip's 32 experts, so a batch of 8 reads no more than 8 single steps.
    one, eight = plan.byte_bound(c, spec, 1, 128), plan.byte_bound(c, spec, 8, 128)
    assert one < eight < 8 * one


def test_gpu_targets_are_sized_from_the_shapes():
    fits = plan.plan("gpt-oss-120b", "h100", context=8192)
    assert not fits.compiled and fits.fits and fits.kernels
    report = fits.report()
    assert "not compiled" in report and "fits" in report and "tokens/s at 3350 GB/s" in report
    too_long = plan.plan("gpt-oss-120b", "h100", batch=8, context=131072)
    assert not too_long.fits and "does NOT fit" in too_long.report()


@pytest.mark.parametrize("args, message", [
    (["--target", "v5e-3"], "unknown target 'v5e-3'; choose one of v5e-1, v5e-4, v5e-8"),
    (["--target", "v5e-4", "--mesh", "4x2"], "mesh 4x2 has 8 devices but v5e-4 has 4 chips"),
    (["--target", "v5e-4", "--mesh", "1x4"], "the model axis must divide the experts' 90 MXFP4 blocks"),
    (["--target", "v5e-16", "--mesh", "16x1", "--model", "tiny"], "the expert axis must divide the 8 experts"),
    (["--target", "v5e-8", "--mesh", "3x1"], "mesh 3x1 has 3 devices"),
    (["--target", "v5e-8", "--mesh", "2x2"], "mesh 2x2 has 4 devices but v5e-8 has 8 chips"),
    (["--target", "v5e-1", "--context", "200000"], "longer than the model's 131072 positions"),
    (["--target", "v5e-1", "--context", "512", "--prompt", "1024"], "--prompt must be in [1, --context 512]"),
    (["--target", "v5e-1", "--layers", "40"], "--layers must be in [1, 24]"),
    (["--target", "v5e-8", "--mesh", "2x2x2", "--batch", "3"], "--batch 3 does not split over the mesh's data axis"),
    (["--target", "v5e-1", "--model", "no/such/checkpoint"], "neither a preset"),
    (["--target", "v5e-1", "--mesh", "4by2"], "is not a mesh spec"),
    (["--target", "h100", "--train", "lora"], "training plans are compiled: pick a TPU target"),
    (["--target", "v5e-1", "--train", "lora", "--lora-targets", "q,x"], "LoRA targets must be distinct names"),
    (["--target", "v5e-1", "--train", "lora", "--lora-targets", "q,mlp1", "--expert-layers", "30"],
     "LoRA expert layers must be in [0, 24)"),
    (["--target", "v5e-1", "--train", "lora", "--lora-targets", "q,mlp1", "--expert-layers", "7;15"],
     "--expert-layers must be comma-separated layer numbers"),
    (["--target", "v5e-1", "--train", "full", "--seq-len", "0"], "--seq-len must be at least 1"),
])
def test_bad_requests_are_one_error_line(capsys, args, message):
    assert plan.main(["--model", "gpt-oss-20b", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_model_from_a_checkpoint_directory(tmp_path):
    from gptoss_jax.testing import write_random_checkpoint

    root = write_random_checkpoint(tmp_path, "tiny", "hf", seed=1)
    assert plan.model_config(str(root)).num_experts == GptOssConfig.preset("tiny").num_experts
    assert plan.model_config(str(root / "config.json")).hidden_size == GptOssConfig.preset("tiny").hidden_size
