"""The built-in model: a small gpt-oss (alternating sliding and full attention with sinks, a
mixture of experts with top-k routing, experts in MXFP4) that this project trains from
scratch with its own code on the synthetic harmony task of gptoss_jax.builtin_data, shipped
as package data and loaded when no checkpoint is given.

    python -m gptoss_jax.builtin --train OUT_DIR      # reproduces gptoss_jax/data/builtin.npz

Training runs in a reduced vocabulary: the N token ids the task uses, plus one row standing
for the 201,088 - N others, whose logit counts with that multiplicity in the loss (a bias of
log(201,088 - N)), which is exactly the loss of the full vocabulary with those rows tied.
The export expands the embedding and unembedding to the full vocabulary: the unused tokens'
unembedding rows are that trained row, their embedding rows zero. The package file keeps
the used rows, the shared row and the token ids; `load_builtin` expands them.
docs/finetuning.md ("The built-in model") describes the task, the run and its results.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from gptoss_jax import builtin_data, mxfp4, train
from gptoss_jax.chat_format import Conversation, parse_completion, render_for_completion, user
from gptoss_jax.config import GptOssConfig
from gptoss_jax.dataset import Example, make_batch, rows
from gptoss_jax.engine import generate
from gptoss_jax.loader import (
    BUILTIN_DESCRIPTION,
    BUILTIN_FILE,
    BUILTIN_FORMAT,
    BUILTIN_FORMAT_VERSION,
    builtin_package_path,
    load_builtin,
    random_model,
    read_builtin_package,
)
from gptoss_jax.model import GptOss

NAME = "builtin"
PACKAGE_FILE = BUILTIN_FILE
FULL_VOCAB = 201088
DESCRIPTION = BUILTIN_DESCRIPTION
__all__ = ["load_builtin", "read_builtin_package", "builtin_package_path"]

# The architecture: 4 layers alternating sliding (window 64) and full attention with sinks,
# 4 experts with top-2 routing, MXFP4 experts (hidden and expert sizes multiples of 32).
ARCHITECTURE = dict(num_hidden_layers=4, num_experts=4, experts_per_token=2, hidden_size=64,
                    intermediate_size=64, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                    sliding_window=64, initial_context_length=4096, rope_theta=150000.0, rope_scaling_factor=32.0,
                    rope_ntk_alpha=1.0, rope_ntk_beta=32.0, swiglu_limit=7.0)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 2500
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    quantization_aware_fraction: float = 0.15  # the last steps train against the MXFP4 rounding
    examples: int = 16000  # distinct records drawn (then repeated, reshuffled, if the steps need more)
    seed: int = 0
    dtype: str = "float32"  # training compute dtype; the export is bf16


def config(vocab_size: int = FULL_VOCAB) -> GptOssConfig:
    return GptOssConfig(vocab_size=vocab_size, name=NAME, **ARCHITECTURE)


class Vocabulary:
    """The task's token ids (sorted) as rows 0..N-1 of the reduced vocabulary; row N stands
    for every other token."""

    def __init__(self, tokens):
        self.tokens = np.asarray(tokens, np.int32)
        self.other = len(self.tokens)
        self.size = self.other + 1
        self.to_reduced = np.full(FULL_VOCAB, self.other, np.int32)
        self.to_reduced[self.tokens] = np.arange(len(self.tokens), dtype=np.int32)

    @property
    def logit_bias(self) -> tuple:
        return ((self.other, math.log(FULL_VOCAB - len(self.tokens))),)

    def reduce(self, example: Example) -> Example:
        return dataclasses.replace(example, tokens=self.to_reduced[example.tokens])


def _examples(vocab: Vocabulary, settings: TrainSettings, exclude) -> list[Example]:
    records = builtin_data.records(settings.examples, seed=settings.seed, exclude=exclude)
    return [vocab.reduce(builtin_data.example(r)) for r in records]


def batches(examples: list[Example], settings: TrainSettings):
    """Endless packed batches: each pass over the examples reshuffled with (seed, pass)."""
    epoch = 0
    while True:
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(examples))
        packed = rows([examples[i] for i in order], settings.seq_len, packing=True)
        for i in range(0, len(packed) - settings.batch_size + 1, settings.batch_size):
            yield make_batch(packed[i:i + settings.batch_size], settings.batch_size, settings.seq_len, True)
        epoch += 1


def train_model(settings: TrainSettings, *, log=print, exclude=None) -> tuple[GptOss, Vocabulary, dict]:
    """Trains the built-in model from scratch: (the model in the reduced vocabulary, with its
    experts re-quantized to MXFP4, its Vocabulary, a summary of the run)."""
    start = time.monotonic()
    exclude = frozenset(builtin_data.held_out_arithmetic(200)) if exclude is None else exclude
    vocab = Vocabulary(builtin_data.vocabulary_tokens())
    examples = _examples(vocab, settings, exclude)
    log(f"vocabulary: {len(vocab.tokens)} task tokens + 1 shared row; {len(examples)} examples "
        f"({time.monotonic() - start:.0f}s)")
    model = random_model(config(vocab.size), dtype=jnp.dtype(settings.dtype), seed=settings.seed)
    train.add_expert_deltas(model)
    optimizer = train.OptimizerConfig(learning_rate=settings.learning_rate, steps=settings.steps,
                                      warmup_steps=settings.warmup_steps, final_learning_rate_ratio=0.05,
                                      weight_decay=0.01)
    trainer = train.Trainer(model, "full", optimizer, seed=settings.seed, remat=False, logit_bias=vocab.logit_bias)
    quantization_aware_from = settings.steps - int(settings.steps * settings.quantization_aware_fraction)
    stream = batches(examples, settings)
    losses = []
    for step in range(settings.steps):
        if step == quantization_aware_from:
            trainer.quantization_aware(True)
        metrics = trainer.step(next(stream))
        losses.append(metrics["loss"])
        if (step + 1) % 50 == 0 or step + 1 == settings.steps:
            log(f"step {step + 1}/{settings.steps}: loss {np.mean(losses[-50:]):.4f} "
                f"lr {metrics['learning_rate']:.2e} ({time.monotonic() - start:.0f}s)")
    merged, report = train.merge_adapters(trainer.model())
    summary = {"steps": settings.steps, "final_loss": float(np.mean(losses[-50:])),
               "seconds": round(time.monotonic() - start), "settings": dataclasses.asdict(settings),
               "quantization_error": max(r.relative_error for r in report)}
    return merged, vocab, summary


# --------------------------------------------------------------------------- package file
def _stored(value) -> np.ndarray:
    """A parameter as bytes numpy can store: FP4 packed into MXFP4 bytes, E8M0 and bf16 as
    their bits."""
    value = np.asarray(jax.device_get(value))
    if value.dtype == mxfp4.FP4:
        return np.asarray(mxfp4.fp4_to_blocks(value))
    if value.dtype == mxfp4.E8M0:
        return value.view(np.uint8)
    return value.astype(ml_dtypes.bfloat16).view(np.uint16)


def save_package(model: GptOss, vocab: Vocabulary, path, summary: dict | None = None) -> Path:
    """Writes the reduced model (bf16 dense parameters, MXFP4 experts) and its token ids."""
    arrays, kinds = {}, {}
    for p, var in nnx.to_flat_state(nnx.state(model)):
        name = train.path_key(p)
        value = var.get_value()
        kinds[name] = str(jnp.dtype(value.dtype)) if value.dtype in (mxfp4.FP4, mxfp4.E8M0) else "bfloat16"
        arrays[name] = _stored(value)
    meta = {"format": BUILTIN_FORMAT, "version": BUILTIN_FORMAT_VERSION, "config": config().to_dict(), "kinds": kinds,
            "summary": summary or {}}
    arrays["__tokens__"] = vocab.tokens
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return path


# ----------------------------------------------------------------------------- evaluation
def complete(model: GptOss, conversations, *, max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy completions of harmony conversations (rendered as the CLIs render them)."""
    prompts = [render_for_completion(c) for c in conversations]
    return generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0)


def arithmetic_accuracy(model: GptOss, items, *, reasoning_effort: str = "medium") -> tuple[float, list]:
    """The share of (kind, a, b) questions answered right: an analysis message, then a final
    message whose last number is the answer. Returns (accuracy, [(item, final text or None)])."""
    conversations = [Conversation([user(builtin_data.question(*item))], reasoning_effort=reasoning_effort)
                     for item in items]
    results = []
    for item, tokens in zip(items, complete(model, conversations)):
        parsed = parse_completion(tokens)
        channels = [m.channel for m in parsed.messages]
        final = parsed.messages[-1].content if channels[-2:] == ["analysis", "final"] and len(channels) == 2 else None
        numbers = re.findall(r"-?\d+", final or "")
        results.append((item, final, bool(numbers) and int(numbers[-1]) == builtin_data.answer(*item)))
    return sum(ok for *_, ok in results) / max(len(results), 1), results


# ------------------------------------------------------------------------------ command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptoss_jax.builtin",
                                     description="Trains the built-in model from scratch on the synthetic task and "
                                                 "writes its package file (OUT_DIR/builtin.npz) and a summary.")
    parser.add_argument("--train", metavar="OUT_DIR", required=True)
    defaults = TrainSettings()
    for field in dataclasses.fields(TrainSettings):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
    out = Path(args.train)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    model, vocab, summary = train_model(settings, log=log)
    path = save_package(model, vocab, out / PACKAGE_FILE, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); final loss {summary['final_loss']:.4f} in "
        f"{summary['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
