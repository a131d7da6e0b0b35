# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # gpt-oss-120b on a Kaggle TPU v5e-8
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/gptoss-jax/gptoss-jax/blob/main/notebooks/gpt_oss_120b_tpu_v5e8.ipynb)
# [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/gptoss-jax/gptoss-jax/blob/main/notebooks/gpt_oss_120b_tpu_v5e8.ipynb)
#
# gpt-oss-120b (117B parameters, 5.1B active per token) spread over the 8 chips of a TPU v5e-8 (16 GiB
# each) as a 4 x 2 mesh: 4-way expert parallelism (each chip holds 32 of every layer's 128 experts)
# times 2-way tensor parallelism (attention heads, vocabulary and each expert's hidden units split in
# two). The experts stay in MXFP4 on the chips and run in the TPU expert kernel.
#
# On Kaggle: choose the "TPU VM v5e-8" accelerator. The checkpoint (about 65 GB) comes from Kaggle
# Models when the notebook runs there, from the Hugging Face Hub otherwise.
#
# Without a TPU the same cells run the built-in `tiny` model (random weights) on the same 4 x 2 mesh,
# on 8 host (CPU) devices.

# %% tags=["parameters"]
checkpoint = "openai/gpt-oss-120b"  # a Hugging Face repo id, a directory, or a preset (random weights)
kaggle_model = "openai/gpt-oss-120b/transformers/default"  # the Kaggle Models handle, used when running on Kaggle
mesh_spec = "4x2"  # expert x model
context = 32768  # KV cache slots per sequence, planned before loading
plan_model = "gpt-oss-120b"  # the model the plan cell compiles for the v5e-8
plan_layers = None  # None: every layer (about 20 minutes of compiling on 2 CPU cores); N: the first N layers
max_new_tokens = 256
temperature = 1.0

# %%
# Installs gptoss-jax when this runtime does not have it (Colab, Kaggle).
REPO = "https://github.com/gptoss-jax/gptoss-jax"
try:
    import gptoss_jax
except ImportError:
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO}"], check=True)
    import gptoss_jax

# %%
import importlib.util
import os
import time

from gptoss_jax.sharding.mesh import make_mesh, parse_mesh_spec, start_devices

# Without accelerators, 8 host devices stand in for the 8 chips: set before JAX starts.
for note in start_devices(parse_mesh_spec(mesh_spec)):
    print(f"note: {note}")

import jax

from gptoss_jax import chat_format, plan
from gptoss_jax.cli import enable_compilation_cache
from gptoss_jax.config import PRESETS
from gptoss_jax.hub import resolve_checkpoint
from gptoss_jax.sharding.memory import bytes_per_device, format_bytes
from gptoss_jax.streaming import decode_tokens

enable_compilation_cache()
print(f"{jax.device_count()} {jax.devices()[0].device_kind} devices")

# %% [markdown]
# ## 1. The per-chip memory plan, before anything is loaded
#
# `gptoss_jax.plan` compiles the engine's prefill and decode step for the v5e-8 with the TPU compiler
# (libtpu), from the model's shapes alone: it runs on any machine, TPU or not, and says per chip what
# the parameters, the KV cache and the compiled programs' temporaries take against the 15.75 GiB the
# compiler allows. A full-depth plan of gpt-oss-120b compiles 36 layers twice (minutes); `plan_layers`
# cuts it short for a quick look (the numbers are then that model's).

# %%
spec = parse_mesh_spec(mesh_spec)
parameters = plan.planned_bytes_per_device(plan.model_config(plan_model), spec)
print(f"{plan_model} on mesh {spec}: {format_bytes(parameters['total'])} of parameters per chip "
      f"({format_bytes(parameters['experts'])} of them MXFP4 experts), from the shapes")
if importlib.util.find_spec("libtpu") is None:
    print("libtpu is not installed: no TPU compiler to plan with (pip install 'libtpu==0.0.42.*')")
else:
    result = plan.plan(plan_model, "v5e-8", mesh_spec, context=context, prompt=min(context, 1024), layers=plan_layers,
                       progress=print)
    print(result.report())

# %% [markdown]
# ## 2. Load
#
# Each chip reads only its own shards of the checkpoint. On Kaggle the checkpoint comes from Kaggle
# Models (`kagglehub`), elsewhere from the Hugging Face Hub (the local cache first).

# %%
def checkpoint_path(name: str):
    if name in PRESETS:
        return name  # random weights at that shape
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") and importlib.util.find_spec("kagglehub"):
        import kagglehub

        try:
            return kagglehub.model_download(kaggle_model)
        except Exception as error:  # noqa: BLE001 - any failure falls back to the Hugging Face Hub
            print(f"note: Kaggle Models has no {kaggle_model} here ({error}); using the Hugging Face Hub")
    return resolve_checkpoint(name)


began = time.perf_counter()
model = gptoss_jax.load(checkpoint_path(checkpoint), mesh=make_mesh(spec))
print(f"loaded {model.config.name} in {time.perf_counter() - began:.0f} s: "
      f"{format_bytes(max(bytes_per_device(model).values()))} of parameters per device "
      f"({format_bytes(max(bytes_per_device(model, experts_only=True).values()))} of experts); "
      f"kernels: {', '.join(model.kernels.names()) or 'XLA only'}")
tokenizer = gptoss_jax.get_tokenizer()

# %% [markdown]
# ## 3. Generate

# %%
def render(question: str, effort: str = "low") -> list[int]:
    return chat_format.render_for_completion(chat_format.Conversation([chat_format.user(question)],
                                                                      reasoning_effort=effort))


def show(completion: list[int]) -> None:
    try:
        parsed = chat_format.parse_completion(completion)
    except ValueError:  # random weights: not harmony
        print(f"(not harmony, raw text) {decode_tokens(tokenizer, completion)!r}")
        return
    for message in parsed.messages + ([parsed.partial_message] if parsed.partial_message else []):
        print(f"[{message.channel}] {message.content}")


began = time.perf_counter()
[completion] = gptoss_jax.generate(model, [render("Explain expert parallelism in three sentences.")],
                                   max_new_tokens=max_new_tokens, temperature=temperature)
seconds = time.perf_counter() - began
show(completion)
print(f"\n{len(completion)} tokens in {seconds:.1f} s (compiling included)")

# %% [markdown]
# ## 4. A batch of prompts
#
# Several prompts of different lengths decode together, each stopping on its own; a batch reads the
# weights once per step for all of them, so it costs little more than one sequence.

# %%
questions = ["What is a mixture of experts?", "Name three uses of a TPU.",
             "Write a haiku about sharding.", "What does MXFP4 store per block of 32 weights?"]
began = time.perf_counter()
completions = gptoss_jax.generate(model, [render(q) for q in questions], max_new_tokens=max_new_tokens,
                                  temperature=temperature)
seconds = time.perf_counter() - began
for question, completion in zip(questions, completions):
    print(f"\n>>> {question}")
    show(completion)
tokens = sum(len(c) for c in completions)
print(f"\n{tokens} tokens for {len(questions)} prompts in {seconds:.1f} s: {tokens / seconds:.1f} tokens/s")
stats = jax.devices()[0].memory_stats()
if stats:
    print(f"device 0 memory: peak {format_bytes(stats['peak_bytes_in_use'])} of {format_bytes(stats['bytes_limit'])}")

# %% [markdown]
# ## When it does not fit
#
# - **A shorter context.** The KV cache and the prompt's attention temporaries grow with the context:
#   plan a shorter `context` (and generate with `max_len=` no longer than it).
# - **Shorter prompt steps.** Prefill temporaries grow with the tokens prefilled at once: plan with a
#   smaller `prompt` (e.g. 256); the engine prefills long prompts in steps.
# - **8 x 1 instead of 4 x 2.** Every chip then holds 16 whole experts of each layer and a full copy of
#   attention and the vocabulary: more parameters per chip (11.0 GiB instead of 9.1), but no tensor
#   parallelism. With a 32k context it fits only with shorter prompt steps:
#   `python -m gptoss_jax.plan --model gpt-oss-120b --target v5e-8 --mesh 8x1 --context 32768 --prompt 256`.
# - **Fewer sequences.** A batch multiplies the KV cache: the plan's report says the largest batch that
#   fits at the context.
