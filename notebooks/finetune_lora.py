# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LoRA fine-tuning of gpt-oss-20b
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/gptoss-jax/gptoss-jax/blob/main/notebooks/finetune_lora.ipynb)
# [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/gptoss-jax/gptoss-jax/blob/main/notebooks/finetune_lora.ipynb)
#
# LoRA adapters on gpt-oss-20b with the experts left in MXFP4: a small harmony dataset written here,
# training with `gptoss_jax.train`, the loss curve, the model's answer before and after, and the export:
# adapters merged into the weights, the adapted experts re-quantized to MXFP4, saved and loaded back.
#
# Training runs on the XLA path with each block rematerialised; the trained parameters and AdamW's
# state are fp32. Where it fits: a GPU with 80 GB. Not a 16 GiB TPU v5e chip: compiled for one ahead of
# time, the training step needs more than its HBM (the XLA expert path's temporaries), even cut to two
# layers. Without an accelerator the built-in `tiny` model (random weights) runs every cell.

# %% tags=["parameters"]
checkpoint = "openai/gpt-oss-20b"  # a Hugging Face repo id, a directory, or a preset ("tiny": random weights)
steps = 60  # optimizer steps
seq_len = 256  # tokens per training row
learning_rate = 2e-4
rank = 8
expert_layers = (20, 21, 22, 23)  # layers whose experts get adapters (mlp1, mlp2)
max_new_tokens = 64

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
import json
import tempfile
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt

from gptoss_jax import chat_format, train
from gptoss_jax.cli import enable_compilation_cache
from gptoss_jax.config import PRESETS
from gptoss_jax.converters.orbax_io import save_model
from gptoss_jax.dataset import Batches, read_dataset
from gptoss_jax.hub import resolve_checkpoint
from gptoss_jax.streaming import decode_tokens

enable_compilation_cache()
workdir = Path(tempfile.mkdtemp(prefix="gptoss_lora_"))
print(f"{jax.devices()[0].device_kind}; files go to {workdir}")

# %% [markdown]
# ## A small dataset in the harmony format
#
# One conversation per JSONL line: the user's question, the assistant's analysis (its chain of
# thought) and final answer. The loss falls on what the assistant writes. This one teaches a
# house style: every final answer starts with "Aye!".

# %%
facts = [("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
         ("What is 7 times 6?", "42"), ("Which planet is known as the red planet?", "Mars"),
         ("What gas do plants take in?", "Carbon dioxide"), ("Who wrote Hamlet?", "William Shakespeare"),
         ("What is the boiling point of water at sea level in Celsius?", "100 degrees"),
         ("How many continents are there?", "Seven")]
records = [{"reasoning_effort": "low",
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "channel": "analysis", "content": f"The answer is {answer}."},
                         {"role": "assistant", "channel": "final", "content": f"Aye! {answer}."}]}
           for question, answer in facts]
data_file = workdir / "train.jsonl"
data_file.write_text("".join(json.dumps(record) + "\n" for record in records))
dataset = read_dataset(data_file, max_length=seq_len)
batches = Batches(dataset, batch_size=1, seq_len=seq_len)
print(f"{len(dataset.examples)} conversations, {dataset.loss_tokens} tokens with loss, "
      f"{batches.batches_in_epoch(0)} batches per epoch of {seq_len}-token rows (packed)")

# %% [markdown]
# ## The model, and its answer before training

# %%
source = checkpoint if checkpoint in PRESETS else resolve_checkpoint(checkpoint)
# The XLA expert layout: expert adapters need the experts as the checkpoint stores them.
model = gptoss_jax.load(source, kernels="xla")
tokenizer = gptoss_jax.get_tokenizer()
probe = "How many moons does Mars have?"


def answer(model) -> str:
    prompt = chat_format.render_for_completion(chat_format.Conversation([chat_format.user(probe)],
                                                                        reasoning_effort="low"))
    [completion] = gptoss_jax.generate(model, [prompt], max_new_tokens=max_new_tokens, temperature=0)
    try:
        parsed = chat_format.parse_completion(completion)
    except ValueError:
        return f"(not harmony, raw text) {decode_tokens(tokenizer, completion)!r}"
    return parsed.final_text or f"(no final answer within {max_new_tokens} tokens)"


before = answer(model)
print(f"{probe}\nbefore: {before}")

# %% [markdown]
# ## Train
#
# Rank-8 adapters on the attention projections (q, k, v, o) of every layer and on the experts (mlp1,
# mlp2) of the last layers; AdamW with a short warm-up and a cosine decay.

# %%
expert_layers = tuple(layer for layer in expert_layers if layer < model.config.num_hidden_layers) or (
    model.config.num_hidden_layers - 1,)
lora = train.LoraConfig(rank=rank, alpha=2.0 * rank, targets=("q", "k", "v", "o", "mlp1", "mlp2"),
                        expert_layers=expert_layers)
train.add_lora(model, lora)
trainer = train.Trainer(model, "lora", train.OptimizerConfig(learning_rate=learning_rate, steps=steps,
                                                             warmup_steps=max(1, steps // 10)))
losses = []
began = time.perf_counter()
for index in range(steps):
    losses.append(trainer.step(batches[index])["loss"])
    if index % max(1, steps // 6) == 0 or index == steps - 1:
        print(f"step {index + 1:4d}  loss {losses[-1]:.4f}")
memory, where = train.peak_memory()
print(f"{steps} steps in {time.perf_counter() - began:.0f} s (the first compiles); peak {where} memory "
      f"{memory / 2**30:.2f} GiB")

# %%
plt.figure(figsize=(6, 3))
plt.plot(range(1, steps + 1), losses)
plt.xlabel("step")
plt.ylabel("loss (mean per token)")
plt.title(f"LoRA rank {rank} on {model.config.name}")
plt.tight_layout()
plt.show()

# %%
tuned = trainer.model()
print(f"{probe}\nbefore: {before}\nafter:  {answer(tuned)}")

# %% [markdown]
# ## Export: merge, re-quantize to MXFP4, save, reload
#
# The adapters alone are a small file (`save_adapters`). Merged, the attention updates are added to
# the bf16 weights and the adapted experts are re-quantized to MXFP4: the result is a checkpoint of the
# original format and size. The report says how far the rounding moved each adapted expert tensor.

# %%
train.save_adapters(tuned, workdir / "adapters.safetensors", lora)
merged, report = train.merge_adapters(tuned)
for row in report:
    print(f"{row.tensor:28s} relative error {row.relative_error:.2e}, vs the update {row.error_vs_update:.2f}")
save_model(merged, workdir / "merged", force=True)
reloaded = gptoss_jax.load(workdir / "merged")
print(f"adapters: {(workdir / 'adapters.safetensors').stat().st_size / 2**20:.1f} MiB; merged checkpoint reloaded "
      f"from {workdir / 'merged'}")
print(f"{probe}\nreloaded: {answer(reloaded)}")
