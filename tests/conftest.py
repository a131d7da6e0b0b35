import numpy as np
import pytest


def hf_logits(checkpoint_dir, tokens, torch_dtype):
    """Logits of HF transformers' GptOssForCausalLM on a checkpoint (MXFP4 dequantized on load)."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(checkpoint_dir, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch_dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens)).long()).logits.float().numpy()


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
    from gptoss_jax.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_hf"), "tiny", "hf", seed=3)
