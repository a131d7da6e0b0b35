"""`python -m gptoss_jax.plan --train lora|full`: one training step of gptoss_jax.train compiled
for a TPU chip on this machine (deviceless AOT, libtpu), and what the chip holds while it runs.
The full-size plans are in docs/finetuning.md; here the tiny preset, for CI time."""

import math

import pytest

from gptoss_jax import plan, train
from gptoss_jax.config import GptOssConfig

pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU compiler for the AOT checks "
                                     "(pip install 'libtpu==0.0.42.*')")
pytestmark = pytest.mark.tpu_aot


def lora_parameters(config: GptOssConfig, rank: int) -> int:
    """Rank-`rank` pairs on q, k, v and o in every layer."""
    hidden, q, kv = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    per_layer = sum(rank * (fan_in + fan_out) for fan_in, fan_out in ((hidden, q), (hidden, kv), (hidden, kv), (q, hidden)))
    return config.num_hidden_layers * per_layer


def test_a_lora_step_compiles_for_a_v5e_chip_and_reports_what_it_holds():
    result = plan.plan_training("tiny", "v5e-1", method="lora", lora=train.LoraConfig(rank=4), seq_len=64)
    config = GptOssConfig.preset("tiny")
    assert result.trainable == lora_parameters(config, 4)
    step = result.step
    assert step.needed is None and result.fits
    # The arguments hold the model, the fp32 adapters and AdamW's two moments of them.
    assert step.arguments >= result.parameters + 3 * 4 * result.trainable
    assert 0 < step.temporaries < 2**30
    report = result.report()
    assert "one lora training step (LoRA rank 4 on q,k,v,o; experts frozen in MXFP4" in report
    assert f"{result.trainable:,} trained parameters" in report and ": fits (" in report


def test_a_full_step_trains_every_dense_parameter(capsys):
    assert plan.main(["--model", "tiny", "--target", "v5e-1", "--train", "full", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    config = GptOssConfig.preset("tiny")
    dense = 2 * config.vocab_size * config.hidden_size  # the embedding and the unembedding
    assert "one full training step (every dense parameter; experts frozen in MXFP4" in out
    trained = int(out.split("; ")[-1].split(" trained parameters")[0].replace(",", ""))
    assert dense < trained < dense + math.prod((config.num_hidden_layers, 4, config.hidden_size, 4 * config.hidden_size))
