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
# # Inside gpt-oss: routing, attention sinks, windows and the logit lens
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/gptoss-jax/gptoss-jax/blob/main/notebooks/inside_gpt_oss.ipynb)
# [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/gptoss-jax/gptoss-jax/blob/main/notebooks/inside_gpt_oss.ipynb)
#
# `gptoss_jax.introspect` runs the model layer by layer and returns what each layer did: the experts
# each token was routed to, every head's attention probabilities and the share it left on its learned
# sink, and the residual stream after each block. This notebook plots
#
# 1. expert routing per layer (how evenly the router spreads tokens over the experts),
# 2. attention-sink mass per head and layer,
# 3. how far back the sliding-window layers and the full layers look,
# 4. a logit lens: the residual stream after each block read through the final norm and unembedding.
#
# Without an accelerator with room for gpt-oss-20b the built-in `tiny` model (random weights) runs: the
# plots then show an untrained model.

# %% tags=["parameters"]
checkpoint = "openai/gpt-oss-20b"  # a Hugging Face repo id, a directory, or a preset ("tiny": random weights)
text = ("The Eiffel Tower is in Paris, the capital of France. It was built for the 1889 World's Fair and is "
        "about 330 metres tall. Every year millions of visitors climb it to look out over the city.")

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
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from gptoss_jax import introspect
from gptoss_jax.cli import enable_compilation_cache
from gptoss_jax.config import PRESETS
from gptoss_jax.hub import resolve_checkpoint
from gptoss_jax.streaming import token_bytes

enable_compilation_cache()
model = gptoss_jax.load(checkpoint if checkpoint in PRESETS else resolve_checkpoint(checkpoint), kernels="xla")
tokenizer = gptoss_jax.get_tokenizer()
tokens = jnp.asarray([tokenizer.encode(text)], jnp.int32)
c = model.config
trace = nnx.jit(introspect.run)(model, tokens)
print(f"{c.name}: {c.num_hidden_layers} layers, {c.num_attention_heads} heads, {c.num_experts} experts "
      f"(top {c.experts_per_token}); {tokens.shape[1]} tokens")

# %% [markdown]
# ## 1. Expert routing
#
# Each token goes to `k` experts per layer. A row of the heatmap is one layer's token count per expert:
# a row sums to tokens x k. Uniform routing would put the same count everywhere.

# %%
counts = np.asarray(introspect.routing_counts(trace, c.num_experts))
assert (counts.sum(axis=1) == tokens.size * c.experts_per_token).all()
plt.figure(figsize=(10, 0.25 * c.num_hidden_layers + 1.5))
plt.imshow(counts, aspect="auto", cmap="viridis")
plt.colorbar(label="tokens routed")
plt.xlabel("expert")
plt.ylabel("layer")
plt.title("tokens per expert")
plt.show()
share = counts / counts.sum(axis=1, keepdims=True)
used = (counts > 0).sum(axis=1)
print("experts used per layer:", used.tolist())
print(f"busiest expert's share per layer: {np.round(share.max(axis=1), 3).tolist()} "
      f"(uniform: {1 / c.num_experts:.3f})")

# %% [markdown]
# ## 2. Attention-sink mass
#
# Every head has a learned sink: an extra logit in its softmax that takes probability without
# contributing a value. A head that has nothing useful to attend to can park its probability there.

# %%
sinks = np.asarray(introspect.sink_mass(trace))
plt.figure(figsize=(8, 0.25 * c.num_hidden_layers + 1.5))
plt.imshow(sinks, aspect="auto", cmap="magma", vmin=0, vmax=1)
plt.colorbar(label="mean probability on the sink")
plt.xlabel("head")
plt.ylabel("layer")
plt.title("attention-sink mass")
plt.show()
layer, head = np.unravel_index(sinks.argmax(), sinks.shape)
print(f"most sink-bound head: layer {layer}, head {head} ({sinks[layer, head]:.2f} of its probability)")

# %% [markdown]
# ## 3. Sliding and full layers
#
# Layers alternate between a sliding window (each token sees the previous 128 tokens) and full causal
# attention. The mean distance a head looks back, per layer: sliding layers cannot exceed the window.

# %%
span = np.asarray(introspect.attention_span(trace))
sliding = np.array([block.attn.sliding for block in model.blocks])
plt.figure(figsize=(8, 3))
for kind, mask, color in (("sliding window", sliding, "tab:orange"), ("full", ~sliding, "tab:blue")):
    layers = np.flatnonzero(mask)
    plt.scatter(np.repeat(layers, c.num_attention_heads), span[layers].ravel(), s=8, color=color, label=kind)
plt.axhline(c.sliding_window, color="gray", linestyle="--", label=f"window ({c.sliding_window})")
plt.xlabel("layer")
plt.ylabel("mean distance attended (tokens)")
plt.legend()
plt.show()
print(f"mean span: sliding layers {span[sliding].mean():.1f}, full layers {span[~sliding].mean():.1f} tokens "
      f"({tokens.shape[1]} tokens in all)")

# %% [markdown]
# ## 4. Logit lens
#
# The residual stream after each block, put through the final norm and the unembedding: what the model
# would predict if it stopped there. The last row is the model's own prediction.

# %%
lens = introspect.logit_lens(model, trace)[:, 0]  # [layers + 1, seq, vocab]
top = np.asarray(introspect.top_tokens(lens, 1)[..., 0])
final = top[-1]
agreement = (top == final).mean(axis=1)
plt.figure(figsize=(6, 3))
plt.plot(range(c.num_hidden_layers + 1), agreement, marker="o")
plt.xlabel("after block (0: embeddings)")
plt.ylabel("top-1 agrees with the output")
plt.show()


def show(token: int) -> str:
    return token_bytes(tokenizer, int(token)).decode("utf-8", errors="replace")


position = tokens.shape[1] // 2
print(f"at position {position} (after {show(tokens[0, position])!r}), the top token after each block:")
for layer in range(c.num_hidden_layers + 1):
    print(f"  {layer:2d}: {show(top[layer, position])!r}")
