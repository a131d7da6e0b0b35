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
# # gptoss-jax quickstart
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/gptoss-jax/gptoss-jax/blob/main/notebooks/quickstart.ipynb)
# [![Open in Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)](https://kaggle.com/kernels/welcome?src=https://github.com/gptoss-jax/gptoss-jax/blob/main/notebooks/quickstart.ipynb)
#
# gpt-oss-20b in JAX on whatever this runtime has: a TPU or a GPU with enough memory runs the real
# model; anything else runs the package's built-in `tiny` model (random weights, the real tokenizer
# and chat format), so every cell still runs and shows what it does. The notebook
#
# 1. picks the model for this runtime and says why,
# 2. shows what fits in the device's memory,
# 3. chats in the harmony format at reasoning effort low, medium and high, the analysis channel (the
#    chain of thought) shown apart from the final answer,
# 4. defines a function tool from a JSON schema, lets the model call it and answers the call,
# 5. streams the answer as it is generated, and reads out tokens/s and device memory.

# %% tags=["parameters"]
model_name = "auto"  # "auto": gpt-oss-20b where it fits, else the built-in model; or "tiny", a Hugging Face repo id, a directory
max_new_tokens = 256  # per answer
temperature = 1.0  # OpenAI's recommended sampling for gpt-oss; 0 is greedy
question = "Why is the sky blue? Answer in two sentences."

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
import dataclasses
import json
import time

import jax

from gptoss_jax import chat_format, plan
from gptoss_jax.cli import enable_compilation_cache, finish_harmony_stream
from gptoss_jax.config import GptOssConfig
from gptoss_jax.hub import resolve_checkpoint
from gptoss_jax.sharding.memory import bytes_per_device, format_bytes
from gptoss_jax.streaming import HarmonyStream

enable_compilation_cache()  # compiled programs are reused by the next run
GiB = 2**30

# %% [markdown]
# ## 1. Which model
#
# gpt-oss-20b needs about 14.6 GiB per device with an 8k context: 12.8 GiB of parameters (its experts
# stay in MXFP4, half a byte per weight), the KV cache and the prompt's temporaries. The TPU compiler
# confirms it on a TPU v5e chip (15.75 GiB usable; `python -m gptoss_jax.plan --model gpt-oss-20b
# --target v5e-1 --context 8192`). Below that, the built-in model runs.

# %%
device = jax.devices()[0]
memory_limit = (device.memory_stats() or {}).get("bytes_limit")
NEEDED_FOR_20B = 14.7 * GiB

if model_name != "auto":
    source, why = model_name, "chosen in the parameters cell"
elif device.platform in ("tpu", "gpu") and memory_limit and memory_limit >= NEEDED_FOR_20B:
    source = "openai/gpt-oss-20b"
    why = f"a {device.device_kind} with {memory_limit / GiB:.1f} GiB usable: gpt-oss-20b fits"
elif device.platform in ("tpu", "gpu"):
    source = "tiny"
    why = (f"a {device.device_kind} with {(memory_limit or 0) / GiB:.1f} GiB usable: less than the "
           f"{NEEDED_FOR_20B / GiB:.1f} GiB gpt-oss-20b needs, so the built-in model runs")
else:
    source, why = "tiny", f"no accelerator ({device.platform}): the built-in model runs (random weights)"
print(f"model: {source} ({why})")

# %% [markdown]
# ## 2. What fits
#
# The parameters per device come from the shapes alone (`plan.planned_bytes_per_device`), the KV cache
# from the context. On a TPU `python -m gptoss_jax.plan` also compiles the programs for the chip and
# counts their temporaries ([docs/tpu.md](https://github.com/gptoss-jax/gptoss-jax/blob/main/docs/tpu.md)).

# %%
random_weights = source in ("tiny", "gpt-oss-20b", "gpt-oss-120b")
checkpoint = source if random_weights else resolve_checkpoint(source)
config = GptOssConfig.preset(source) if random_weights else plan.model_config(str(checkpoint))
context = 8192
parameters = plan.planned_bytes_per_device(config, "1x1")
per_slot, rings = plan.cache_bytes(config, plan.parse_mesh_spec("1x1"), context, "bfloat16")
cache = rings + per_slot * context
print(f"{config.name}: {config.num_hidden_layers} layers, {config.num_experts} experts, "
      f"{config.experts_per_token} per token")
print(f"  parameters      {format_bytes(parameters['total'])} ({format_bytes(parameters['experts'])} of MXFP4 experts)")
print(f"  KV cache        {format_bytes(cache)} for a {context}-token context")
print(f"  device memory   {format_bytes(memory_limit) if memory_limit else 'not reported by the ' + device.platform}")

# %%
model = gptoss_jax.load(checkpoint)
tokenizer = gptoss_jax.get_tokenizer()
print(f"loaded {model.config.name}: {format_bytes(max(bytes_per_device(model).values()))} of parameters on "
      f"{device.device_kind}; kernels: {', '.join(model.kernels.names()) or 'XLA only'}")
if random_weights:
    print("random weights: the answers below are random tokens, shown as they come")

# %% [markdown]
# ## 3. Chat with reasoning effort, streamed
#
# The prompt is rendered in the harmony chat format; the answer streams as it is generated (the final
# channel), and the analysis channel, the model's chain of thought, is shown apart afterwards. Random
# weights do not follow the harmony format: their output is shown as raw text, with a note.

# %%
def ask(conversation: chat_format.Conversation, *, title: str):
    """Generates an answer, streaming the final channel; returns (completion tokens, stream)."""
    prompt = chat_format.render_for_completion(conversation)
    stream = HarmonyStream(tokenizer, echo=True, show_analysis=False)
    print(f"--- {title}: final channel, streamed ---")
    began = time.perf_counter()
    [completion] = gptoss_jax.generate(model, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                                       on_tokens=lambda new: stream.feed(new[0]))
    seconds = time.perf_counter() - began
    harmony = finish_harmony_stream(stream)
    print()
    if harmony:
        print(f"--- {title}: analysis channel ---")
        print("".join(stream.analysis) or "(none)")
    print(f"--- {len(completion)} tokens in {seconds:.2f} s: {len(completion) / seconds:.1f} tokens/s "
          f"(the first call of a shape includes compiling) ---\n")
    return completion, stream


for effort in ("low", "medium", "high"):
    ask(chat_format.Conversation([chat_format.user(question)], reasoning_effort=effort), title=f"effort {effort}")

# %% [markdown]
# ## 4. A function tool
#
# A tool is a name, a description and a JSON schema of its arguments. The model calls it with a message
# to `functions.get_weather` on the commentary channel, ending with `<|call|>`; we run the function and
# send its output back as a tool message, and the model answers with it. The model decides whether to
# call: both outcomes are handled.

# %%
weather_schema = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "the city, e.g. Paris"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
weather_tool = chat_format.FunctionTool("get_weather", "Current weather in a city.", weather_schema)


def get_weather(city: str, unit: str = "celsius") -> dict:
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit, "sky": "clear"}


conversation = chat_format.Conversation([chat_format.user("What is the weather in Paris right now?")],
                                        reasoning_effort="low", tools=[weather_tool])
completion, _ = ask(conversation, title="with a tool")
try:
    parsed = chat_format.parse_completion(completion)
except ValueError as error:
    parsed = None
    print(f"The output is not a harmony message ({error}), so there is no tool call to answer.")

call = parsed.tool_call if parsed else None
if call is None and parsed is not None:
    print("The model answered without calling the tool.")
elif call is not None and call.recipient != "functions.get_weather":
    print(f"The model called {call.recipient}, which does not exist; nothing to answer.")
elif call is not None:
    arguments = None
    try:
        arguments = call.tool_arguments()
        output = get_weather(**arguments)
    except (ValueError, TypeError) as error:
        output = {"error": str(error)}  # the model sees what went wrong, as with any tool
    print(f"tool call: get_weather with {json.dumps(arguments) if arguments is not None else call.content!r} "
          f"-> {json.dumps(output)}")
    answered = dataclasses.replace(conversation, messages=[*conversation.messages, *parsed.messages,
                                                           chat_format.tool_result("functions.get_weather", output)])
    ask(answered, title="after the tool's output")

# %% [markdown]
# ## 5. Speed and memory
#
# Decode speed of a longer answer now that every program is compiled, and the device memory in use.

# %%
prompt = chat_format.render_for_completion(chat_format.Conversation([chat_format.user(question)],
                                                                    reasoning_effort="low"))
began = time.perf_counter()
[completion] = gptoss_jax.generate(model, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                                   stop_tokens=[])
seconds = time.perf_counter() - began
print(f"{len(completion)} tokens in {seconds:.2f} s: {len(completion) / seconds:.1f} tokens/s, prompt of {len(prompt)} "
      f"tokens included")
stats = device.memory_stats()
if stats:
    print(f"device memory: {format_bytes(stats['bytes_in_use'])} in use, peak {format_bytes(stats['peak_bytes_in_use'])} "
          f"of {format_bytes(stats['bytes_limit'])}")
else:
    print(f"the {device.platform} backend reports no memory statistics; the parameters take "
          f"{format_bytes(max(bytes_per_device(model).values()))}")
