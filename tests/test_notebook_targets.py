"""The TPU configurations the notebooks name, compiled for those chips with libtpu on this
CPU host (deviceless AOT), so that no notebook promises a fit the compiler refutes.

- gpt-oss-20b on a v5e-1 (notebooks/quickstart) and gpt-oss-120b on a v5e-8 as mesh 4x2
  (notebooks/gpt_oss_120b_tpu_v5e8): tests/test_tpu_aot.py's `planned` fixture compiles both
  plans (two layers at full width, for CI time); their full-depth plans are in
  benchmarks/results/2026-12-07-tpu-plan/ (14.61 and 14.04 GiB of the 15.75 GiB allowed).
- LoRA on gpt-oss-20b (notebooks/finetune_lora): the training step, compiled here from an
  abstract model (`train.Trainer(..., abstract=True).lower(batch)`), cut to two layers for CI
  time. Already two layers need more than a v5e chip's HBM, so the notebook names no v5e."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gptoss_jax import plan, train
from gptoss_jax.config import GptOssConfig
from gptoss_jax.dataset import Batch
from gptoss_jax.kernels import tpu_aot
from gptoss_jax.kernels.dispatch import XLA
from gptoss_jax.model import GptOss
from gptoss_jax.sharding.mesh import make_mesh

pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU compiler for the AOT checks "
                                     "(pip install 'libtpu==0.0.42.*')")
pytestmark = pytest.mark.tpu_aot


def lora_step(topology: str, layers: int, seq_len: int):
    """The notebook's LoRA step (rank 8 on q, k, v, o and the last layer's experts) for
    gpt-oss-20b cut to `layers` layers, lowered for one chip of `topology`."""
    config = GptOssConfig.preset("gpt-oss-20b").replace(num_hidden_layers=layers)
    mesh = make_mesh("1x1", devices=tpu_aot.topology(topology).devices[:1])
    lora = train.LoraConfig(rank=8, targets=("q", "k", "v", "o", "mlp1", "mlp2"), expert_layers=(layers - 1,))
    model = nnx.eval_shape(lambda: train.add_lora(GptOss(config, jnp.bfloat16, mesh, XLA), lora))
    trainer = train.Trainer(model, "lora", train.OptimizerConfig(learning_rate=2e-4, steps=60), abstract=True)
    row = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    batch = Batch(row, row, row, row, row, jax.ShapeDtypeStruct((1, seq_len), jnp.float32))
    return trainer.lower(batch)


def test_lora_on_20b_does_not_fit_a_v5e_chip():
    available = plan.available_hbm(plan.target_named("v5e-1"))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"RESOURCE_EXHAUSTED.*exceeds available HBM \(15.75G\)"):
        lora_step("v5e:1x1", layers=2, seq_len=256).compile()
    assert available == 15.75 * 2**30
