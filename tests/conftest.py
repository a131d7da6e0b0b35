import os

# Eight host devices for the mesh tests (tests/test_sharding.py). XLA reads this when JAX
# starts its backends, so it is set before any test module imports jax; a count set by the
# caller wins. On accelerator hosts the accelerators stay the default devices.
HOST_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={HOST_DEVICES}").strip()

# The tests run on the CPU (CI has no accelerator). With libtpu installed for the TPU compile
# tests, JAX would otherwise try to open a TPU first; set JAX_PLATFORMS to run them elsewhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


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


def rewrite_tensor(path, name, array):
    """Rewrites safetensors file `path` with tensor `name` replaced by `array` (None: removed)."""
    from gptoss_jax.converters.safetensors_io import SafetensorsFile, write_safetensors

    source = SafetensorsFile(path)
    arrays = {n: np.array(source.get(n)) for n in source.names()}
    del source
    if array is None:
        del arrays[name]
    else:
        arrays[name] = array
    write_safetensors(path, [(n, a.shape, a.dtype) for n, a in arrays.items()], arrays.__getitem__)


def leaves(model):
    """The model's parameters as host arrays, by path."""
    from flax import nnx

    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_bit_identical(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for path in la:
        assert la[path].dtype == lb[path].dtype, path
        np.testing.assert_array_equal(la[path].view(np.uint8), lb[path].view(np.uint8), err_msg=str(path))


def assert_mostly_bit_equal(got, want, share):
    """On the CPU (CI) a kernel's bf16 results equal the reference's bit for bit except for
    rare one-ulp flips from another fp32 summation order; fewer than `share` equal means a
    systematic rounding error. On a GPU, XLA's GEMMs and the kernels sum in orders far
    enough apart that a third of the roundings can flip: there only the callers'
    tolerance checks apply."""
    import jax

    if jax.default_backend() == "cpu":
        assert np.mean(np.asarray(got) == np.asarray(want)) > share
