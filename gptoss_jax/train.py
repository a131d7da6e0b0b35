"""Fine-tuning gpt-oss with the experts left in MXFP4: LoRA adapters or full fine-tuning of the
bf16 parameters, the loss, the optax optimizer, the jitted train step, the train state in an
Orbax CheckpointManager, and export (the adapters alone, or merged into a full checkpoint with
adapted experts re-quantized to MXFP4). docs/finetuning.md describes the choices.

    model = gptoss_jax.load("path/to/gpt-oss-20b")
    add_lora(model, LoraConfig(rank=8, targets=("q", "k", "v", "o")))
    trainer = Trainer(model, "lora", OptimizerConfig(learning_rate=2e-4, steps=1000))
    for batch in batches:
        metrics = trainer.step(batch)
    save_adapters(trainer.model(), "adapters.safetensors")

What trains is held in fp32 (master weights and AdamW state) and cast to the model's compute
dtype for each step; the FP4 experts stay packed and frozen, and gradients flow through their
dequantization to the activations only. Steps run on the XLA path (the Pallas kernels have no
backward pass) with each block rematerialised, and the loss is computed a chunk of positions
at a time, so the [tokens, vocabulary] logits never exist at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gptoss_jax import mxfp4
from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters.interrupts import uninterrupted
from gptoss_jax.dataset import Batch
from gptoss_jax.kernels.dispatch import XLA
from gptoss_jax.model import (
    AdapterParam,
    ExpertAdapter,
    GptOss,
    LoraAdapter,
    abstract_model,
    adapted_weight,
)
from gptoss_jax.sharding.placement import fetch, param_placement, put_host_array
from gptoss_jax.sharding.rules import DATA, named_sharding

F32 = jnp.float32
METHODS = ("lora", "full")
ATTENTION_TARGETS = ("q", "k", "v", "o")
EXPERT_TARGETS = ("mlp1", "mlp2")
TARGETS = (*ATTENTION_TARGETS, "router", *EXPERT_TARGETS)
LOSS_CHUNK = 256  # positions per chunk of the loss: [batch, chunk, vocabulary] logits at a time
ADAPTERS_FORMAT = "gptoss-jax-adapters"
ADAPTERS_VERSION = 1


# ------------------------------------------------------------------------------ adapters
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: `rank`, `alpha` (the update is scaled by alpha / rank), `dropout` on the
    adapters' inputs (attention and router adapters, training only), `targets` among q, k, v,
    o (attention projections), router, mlp1 and mlp2 (the experts: one low-rank pair per
    expert on top of its FP4 weights), and `expert_layers`, the layers whose experts get
    adapters (None: every layer)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    expert_layers: tuple[int, ...] | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, config: GptOssConfig | None = None) -> None:
        """Raises ValueError for bad settings (the layers are checked against `config` when given)."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets must be distinct names among {', '.join(TARGETS)}, got "
                             f"{', '.join(self.targets) or 'none'}")
        if self.expert_layers is not None:
            if not set(self.targets) & set(EXPERT_TARGETS):
                raise ValueError("LoRA expert layers were given but no expert target (mlp1, mlp2)")
            layers = math.inf if config is None else config.num_hidden_layers
            if not self.expert_layers or any(not 0 <= n < layers for n in self.expert_layers):
                bound = "non-negative" if config is None else f"in [0, {layers}) for model '{config.name}'"
                raise ValueError(f"LoRA expert layers must be {bound}, got {list(self.expert_layers)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> LoraConfig:
        raw = dict(raw)
        raw["targets"] = tuple(raw["targets"])
        if raw.get("expert_layers") is not None:
            raw["expert_layers"] = tuple(raw["expert_layers"])
        return cls(**raw)


def _placed(value_fn, shape, axes, mesh):
    return jax.jit(value_fn, out_shardings=named_sharding(axes, shape, mesh))()


def _init_low_rank(adapter, key, mesh):
    """A uniform in +-1/sqrt(fan_in) (PEFT's default), B zero: the model starts unchanged."""
    a, b = adapter.a, adapter.b
    fan_in = math.prod(a.shape[2:] if isinstance(adapter, ExpertAdapter) else a.shape[1:])
    bound = 1 / math.sqrt(fan_in)
    a.set_value(_placed(lambda: jax.random.uniform(key, a.shape, F32, -bound, bound), a.shape, _axes(a), mesh))
    b.set_value(_placed(lambda: jnp.zeros(b.shape, F32), b.shape, _axes(b), mesh))
    return adapter


def _axes(var) -> tuple:
    return var.get_metadata()["axes"]


def add_lora(model: GptOss, lora: LoraConfig, *, seed: int = 0) -> GptOss:
    """Adds LoRA adapters to `model` (in place; returned for convenience), placed on its mesh.
    The model computes what it computed before until the adapters are trained."""
    lora.check(model.config)
    if has_adapters(model):
        raise ValueError("the model already has adapters; merge them (merge_adapters) before adding others")
    if any(t in EXPERT_TARGETS for t in lora.targets) and any(block.mlp.tpu_layout for block in model.blocks):
        raise ValueError("expert adapters (mlp1, mlp2) need the experts in the standard layout, and this model "
                         "stores them for the TPU expert kernel; load it with kernels='xla' to fine-tune the experts")
    c = model.config
    d, h, kv, hd, e = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_experts
    io = {"q": ((d,), ("embed",), (h, hd), ("q_heads", "head_dim")),
          "k": ((d,), ("embed",), (kv, hd), ("kv_heads", "head_dim")),
          "v": ((d,), ("embed",), (kv, hd), ("kv_heads", "head_dim")),
          "o": ((h, hd), ("q_heads", "head_dim"), (d,), ("embed",)),
          "router": ((d,), ("embed",), (e,), ("experts",))}
    rngs = nnx.Rngs(dropout=seed) if lora.dropout else None
    expert_layers = range(c.num_hidden_layers) if lora.expert_layers is None else lora.expert_layers
    key = jax.random.key(seed)
    for layer, block in enumerate(model.blocks):
        for target in lora.targets:
            target_key = jax.random.fold_in(jax.random.fold_in(key, layer), TARGETS.index(target))
            if target in io:
                adapter = LoraAdapter(*io[target], rank=lora.rank, scale=lora.scale, dropout=lora.dropout, rngs=rngs)
                owner = block.attn if target in ATTENTION_TARGETS else block.mlp
            elif layer in expert_layers:
                adapter = _expert_adapter(c, target, rank=lora.rank, scale=lora.scale)
                owner = block.mlp
            else:
                continue
            owner.adapters[target] = _init_low_rank(adapter, target_key, model.mesh)
    return model


def _expert_adapter(c: GptOssConfig, target: str, *, rank: int | None, scale: float = 1.0) -> ExpertAdapter:
    e, d, i = c.num_experts, c.hidden_size, c.intermediate_size
    if target == "mlp1":
        return ExpertAdapter(e, 2 * i, "expert_mlp", d, "embed", rank=rank, scale=scale)
    return ExpertAdapter(e, d, "embed", i, "expert_mlp", rank=rank, scale=scale)


def add_expert_deltas(model: GptOss, layers=None) -> GptOss:
    """Makes the experts trainable (full fine-tuning of them, or training from scratch): a full
    fp32 delta on mlp1 and mlp2 of each layer in `layers` (None: all), zero at first, that the
    export adds to the FP4 weights and re-quantizes to MXFP4. Costs 12 bytes per expert
    weight with AdamW (the FP4 weights take half a byte)."""
    c = model.config
    layers = range(c.num_hidden_layers) if layers is None else layers
    for layer in layers:
        moe = model.blocks[layer].mlp
        for target in EXPERT_TARGETS:
            if target in moe.adapters:
                raise ValueError(f"layer {layer} already has an adapter on {target}")
            adapter = _expert_adapter(c, target, rank=None)
            delta = adapter.delta
            delta.set_value(_placed(lambda: jnp.zeros(delta.shape, F32), delta.shape, _axes(delta), model.mesh))
            moe.adapters[target] = adapter
    return model


def set_quantization_aware(model: GptOss, on: bool = True) -> GptOss:
    """Quantization-aware training of the expert adapters (in place): the forward then uses the
    adapted experts rounded to MXFP4 exactly as the merged export holds them, and gradients
    pass the rounding unchanged (straight-through estimator)."""
    for block in model.blocks:
        for target in EXPERT_TARGETS:
            if target in block.mlp.adapters:
                block.mlp.adapters[target].quantized = on
    return model


def adapter_modules(model: GptOss):
    """(layer, target, adapter) of every adapter of the model."""
    for layer, block in enumerate(model.blocks):
        for owner in (block.attn, block.mlp):
            for target, adapter in owner.adapters.items():
                yield layer, target, adapter


def has_adapters(model: GptOss) -> bool:
    return any(True for _ in adapter_modules(model))


def path_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


# ---------------------------------------------------------------------------- adapter files
def save_adapters(model: GptOss, path, lora: LoraConfig) -> Path:
    """Writes the LoRA adapters (fp32) and `lora` into one safetensors file, atomically."""
    arrays = {path_key(p): fetch(v.get_value(), model.mesh) for p, v in nnx.to_flat_state(nnx.state(model, AdapterParam))}
    if not arrays:
        raise ValueError("the model has no adapters to save")
    if any(isinstance(a, ExpertAdapter) and a.rank is None for _, _, a in adapter_modules(model)):
        raise ValueError("the model holds full expert deltas, which are not LoRA adapters; save the merged model")
    path = Path(path)
    metadata = {"format": ADAPTERS_FORMAT, "version": str(ADAPTERS_VERSION), "lora": json.dumps(lora.to_dict()),
                "config": json.dumps(model.config.to_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.incomplete-{os.getpid()}")
    try:
        save_file(arrays, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_adapters(path) -> tuple[LoraConfig, dict, dict[str, np.ndarray]]:
    """(LoraConfig, model config dict, arrays by parameter path) of an adapters file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such adapters file")
    try:
        with safe_open(str(path), "numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != ADAPTERS_FORMAT:
                raise ValueError(f"{path}: not a gptoss-jax adapters file (written by save_adapters)")
            if metadata.get("version") != str(ADAPTERS_VERSION):
                raise ValueError(f"{path}: adapters format version {metadata.get('version')}, this gptoss-jax reads "
                                 f"version {ADAPTERS_VERSION}")
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: unreadable adapters file ({e})") from None
    return LoraConfig.from_dict(json.loads(metadata["lora"])), json.loads(metadata["config"]), arrays


def load_adapters(model: GptOss, path) -> LoraConfig:
    """Adds the adapters saved in `path` to `model` (in place). Returns their LoraConfig."""
    lora, config, arrays = read_adapters(path)
    expected = model.config.to_dict()
    different = sorted(k for k in expected if k not in ("name",) and config.get(k) != expected[k])
    if different:
        raise ValueError(f"{path}: the adapters were trained for another model shape (differs in "
                         f"{', '.join(different)})")
    add_lora(model, lora)
    for p, var in nnx.to_flat_state(nnx.state(model, AdapterParam)):
        name = path_key(p)
        if name not in arrays or arrays[name].shape != var.shape:
            raise ValueError(f"{path}: adapter '{name}' is missing or has the wrong shape")
        var.set_value(put_host_array(arrays.pop(name).astype(np.float32), named_sharding(_axes(var), var.shape,
                                                                                          model.mesh)))
    if arrays:
        raise ValueError(f"{path}: unexpected adapters {sorted(arrays)[:3]} for its own settings")
    return lora


# --------------------------------------------------------------------------------- merging
@dataclasses.dataclass(frozen=True)
class QuantizationError:
    """How re-quantizing one adapted expert tensor to MXFP4 changed it: `relative_error`
    ||Q(W) - W|| / ||W|| and `error_vs_update` ||Q(W) - W|| / ||W - W_base|| (above 1: the
    rounding moved the weights further than training did; a quantization-aware phase
    trains against exactly this rounding)."""

    tensor: str
    relative_error: float
    error_vs_update: float


def merge_adapters(model: GptOss) -> tuple[GptOss, list[QuantizationError]]:
    """A model without adapters computing what `model` computes with them: attention and
    router weights merged in fp32 and rounded to their own dtype, adapted experts merged and
    re-quantized to MXFP4 (error per tensor returned), every other parameter (unadapted
    experts included) the same array. Same mesh and kernels."""
    graphdef, leaves = abstract_model(model.config, model.dtype, model.mesh, model.kernels)
    current = dict(nnx.to_flat_state(nnx.state(model)))
    values = {path: current[path].get_value() for path, _ in leaves}
    shardings = {path: named_sharding(_axes(var), var.shape, model.mesh) for path, var in leaves}
    report = []
    for layer, target, adapter in adapter_modules(model):
        where = ("blocks", layer, "attn" if target in ATTENTION_TARGETS else "mlp")
        if isinstance(adapter, LoraAdapter):
            path = (*where, "router_w" if target == "router" else "w" + target)
            values[path] = jax.jit(_merge_low_rank, static_argnums=3, out_shardings=shardings[path])(
                values[path], adapter.a[...], adapter.b[...], adapter.scale)
            continue
        fp4_path, scales_path = (*where, f"{target}_fp4"), (*where, f"{target}_scales")
        arrays = {name: getattr(adapter, name)[...] for name in adapter.fields}
        fp4, scales, errors = jax.jit(_requantize, static_argnums=3,
                                      out_shardings=(shardings[fp4_path], shardings[scales_path], None))(
            values[fp4_path], values[scales_path], arrays, adapter.scale)
        values[fp4_path], values[scales_path] = fp4, scales
        report.append(QuantizationError(path_key((*where, target)), *(float(x) for x in errors)))
    for path, var in leaves:
        var.set_value(values[path])
    merged = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    merged.update_weight_facts()
    return merged, report


def _merge_low_rank(w, a, b, scale):
    delta = jnp.tensordot(b, a, axes=1, precision="highest")  # [*outputs, rank] x [rank, *inputs]
    return (w.astype(F32) + delta * np.float32(scale)).astype(w.dtype)


def _requantize(fp4, scales, arrays, scale):
    base = mxfp4.dequantize(fp4, scales, F32)
    adapted = adapted_weight(base, arrays, scale)
    new_fp4, new_scales = mxfp4.quantize(adapted)
    error = jnp.linalg.norm(mxfp4.dequantize(new_fp4, new_scales, F32) - adapted)
    update = jnp.linalg.norm(adapted - base)
    return new_fp4, new_scales, (error / jnp.linalg.norm(adapted), error / jnp.maximum(update, 1e-30))


# ------------------------------------------------------------------------------------ loss
def loss_sums(model: GptOss, batch: Batch, *, remat: bool = True, chunk: int = LOSS_CHUNK, logit_bias: tuple = ()):
    """(sum of the next-token losses of `batch`, weighted by its loss mask, and the sum of
    the mask), fp32 scalars. Logits are computed only at the batch's loss positions, `chunk`
    positions of every row at a time (recomputed in the backward pass), so the [batch, seq,
    vocabulary] logits never exist. `logit_bias`, ((token, bias), ...), is added to those
    tokens' logits in the loss: a row that stands for k tied rows of a larger vocabulary
    (bias log k) makes the loss that of the larger vocabulary."""
    h, _ = model.hidden_states(batch.tokens, batch.positions, None, batch.segment_ids, remat=remat)
    h = jnp.take_along_axis(h, jnp.asarray(batch.loss_positions, jnp.int32)[..., None], axis=1)  # [b, m, d]
    targets = jnp.asarray(batch.targets, jnp.int32)
    mask = jnp.asarray(batch.loss_mask, F32)
    b, m, d = h.shape
    chunk = min(chunk, m)
    pad = -m % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    pieces = (m + pad) // chunk

    def split(x):  # [b, m, ...] -> [pieces, b, chunk, ...]
        return jnp.swapaxes(x.reshape(b, pieces, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_loss(total, xs):
        h, targets, mask = xs
        logits = model.unembed(h).astype(F32)
        if logit_bias:
            tokens, biases = zip(*logit_bias)
            logits = logits.at[..., np.asarray(tokens)].add(np.asarray(biases, np.float32))
        target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return total + jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logits) * mask), None

    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), F32), (split(h), split(targets), split(mask)))
    return total, jnp.sum(mask)


def mean_loss(model: GptOss, batch: Batch, **kwargs):
    total, count = loss_sums(model, batch, **kwargs)
    return total / jnp.maximum(count, 1)


# ------------------------------------------------------------------------------- optimizer
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a linear warm-up to `learning_rate` over `warmup_steps`, then a cosine decay
    to `learning_rate * final_learning_rate_ratio` at `steps` (optimizer steps), gradients
    clipped to a global norm of `max_grad_norm` (0: no clipping) and accumulated over
    `accumulation` batches per optimizer step. Weight decay applies to matrices only."""

    learning_rate: float = 1e-4
    steps: int = 1000
    warmup_steps: int = 0
    final_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    accumulation: int = 1
    b1: float = 0.9
    b2: float = 0.999

    def check(self) -> None:
        def number(name, low, high=math.inf, *, integer=False, low_open=False):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and value <= high
            if integer:
                ok = ok and float(value).is_integer()
            if not ok:
                bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
                raise ValueError(f"{flag} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")

        number("learning_rate", 0, low_open=True)
        number("steps", 1, integer=True)
        number("warmup_steps", 0, integer=True)
        number("final_learning_rate_ratio", 0, 1)
        number("weight_decay", 0)
        number("max_grad_norm", 0)
        number("accumulation", 1, integer=True)
        number("b1", 0, 1)
        number("b2", 0, 1)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) must be fewer than the optimizer steps "
                             f"({self.steps})")

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, self.warmup_steps, self.steps,
            end_value=self.learning_rate * self.final_learning_rate_ratio)

    def optimizer(self, learning_rate=None) -> optax.GradientTransformation:
        """The optax transformation; `learning_rate` (a number or a traced scalar) replaces the
        schedule, for callers that evaluate it themselves."""
        decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
        chain = optax.chain(
            optax.clip_by_global_norm(self.max_grad_norm) if self.max_grad_norm else optax.identity(),
            optax.adamw(self.schedule() if learning_rate is None else learning_rate, b1=self.b1, b2=self.b2,
                        weight_decay=self.weight_decay, mask=decay_matrices))
        return optax.MultiSteps(chain, self.accumulation) if self.accumulation > 1 else chain

    def update_rule(self) -> OptimizerConfig:
        """These settings without the schedule's: what the compiled step depends on."""
        return dataclasses.replace(self, learning_rate=1.0, steps=1, warmup_steps=0, final_learning_rate_ratio=1.0)


# -------------------------------------------------------------------------------- training
def trainable_filter(method: str):
    """What trains: "lora" the adapters; "full" every bf16/fp32 parameter (attention, norms,
    router, embeddings, expert biases, and expert deltas if added), never the FP4 experts."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "lora":
        return AdapterParam
    dense = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(F32))
    return nnx.All(nnx.Param, lambda path, var: jnp.dtype(var.get_value().dtype) in dense)


def _reseeded(rng_state, key):
    """The model's RNG streams (adapter dropout) restarted from `key`, one key per stream."""
    leaves, treedef = jax.tree.flatten(rng_state)
    fresh = [jax.random.fold_in(key, i) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else jnp.zeros_like(leaf)
             for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, fresh)


def _with_dropout(model: GptOss, on: bool) -> GptOss:
    if any(isinstance(m, nnx.Dropout) for _, m in nnx.iter_modules(model)):
        return nnx.view(model, only=nnx.Dropout, deterministic=not on)
    return model


@dataclasses.dataclass(frozen=True)
class _Program:
    """What the jitted step is specialised on (hashable, so equal trainers share compiled code):
    the model's graph (with dropout on, or off for evaluation), the trainable parameters'
    keys, dtypes and tree, the optimizer settings and the loss options."""

    graphdef: nnx.GraphDef
    treedef: object
    keys: tuple[str, ...]
    dtypes: tuple
    optimizer: OptimizerConfig
    remat: bool
    loss_chunk: int
    logit_bias: tuple = ()

    def model(self, params, rngs, frozen, key):
        values = jax.tree.unflatten(self.treedef, [params[k].astype(d) for k, d in zip(self.keys, self.dtypes)])
        return nnx.merge(self.graphdef, values, _reseeded(rngs, key), frozen, copy=True)


@functools.partial(jax.jit, static_argnames="program", donate_argnums=0)
def _train_step(state, rngs, frozen, batch: Batch, learning_rate, *, program: _Program):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

    def loss(params):
        total, count = loss_sums(program.model(params, rngs, frozen, key), batch, remat=program.remat,
                                 chunk=program.loss_chunk, logit_bias=program.logit_bias)
        return total / jnp.maximum(count, 1), count

    (value, count), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    optimizer = program.optimizer.optimizer(learning_rate)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": value, "loss_tokens": count, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}, metrics


@functools.partial(jax.jit, static_argnames="program")
def _eval_sums(params, rngs, frozen, batch: Batch, *, program: _Program):
    return loss_sums(program.model(params, rngs, frozen, jax.random.key(0)), batch, remat=False,
                     chunk=program.loss_chunk, logit_bias=program.logit_bias)


def _cast(params: dict, dtypes: tuple):
    """`params` cast to `dtypes`, ((key, dtype), ...)."""
    dtypes = dict(dtypes)
    return {k: v.astype(dtypes[k]) for k, v in params.items()}


def _replicated(mesh):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_shardings(batch: Batch, mesh) -> Batch:
    """Where a batch goes: on a mesh, rows split over the data axis."""
    if mesh is not None and batch.tokens.shape[0] % mesh.shape.get(DATA, 1):
        raise ValueError(f"the batch size ({batch.tokens.shape[0]}) must be a multiple of the mesh's data axis "
                         f"({mesh.shape[DATA]})")
    return Batch(*(None if x is None else named_sharding(("batch", None), x.shape, mesh) for x in batch))


class Trainer:
    """Trains the parameters of `model` that `method` selects ("lora": its adapters, add them
    first with add_lora; "full": every dense parameter). The train state (fp32 master
    weights, optimizer state, step, RNG key) is `self.state`, a pytree on the model's devices;
    the model's other parameters stay where they are, untouched. `step(batch)` runs one
    batch (an optimizer step every `accumulation` batches); `model()` is the model with the
    current weights, for evaluation, generation or export.

    `abstract=True` takes a model of shapes (nnx.eval_shape), possibly on devices of another
    platform, and builds no state: `lower(batch)` then compiles the step ahead of time.
    `logit_bias` ((token, bias), ...) is added to those logits in the loss (loss_sums)."""

    def __init__(self, model: GptOss, method: str, optimizer: OptimizerConfig, *, seed: int = 0, remat: bool = True,
                 loss_chunk: int = LOSS_CHUNK, abstract: bool = False, logit_bias: tuple = ()):
        optimizer.check()
        self.config, self.mesh, self.kernels = optimizer, model.mesh, model.kernels
        self.trainable = trainable_filter(method)
        self.remat, self.loss_chunk = remat, loss_chunk
        self.logit_bias = tuple((int(t), float(b)) for t, b in logit_bias)
        model = model.with_kernels(XLA)
        _, params, self.rngs, self.frozen = nnx.split(model, self.trainable, nnx.RngState, ...)
        flat = nnx.to_flat_state(params)
        if not flat:
            raise ValueError("nothing to train: the model has no adapters (add_lora) for method 'lora'"
                             if method == "lora" else "nothing to train: the model has no dense parameters")
        self.keys = tuple(path_key(p) for p, _ in flat)
        self.dtypes = tuple(jnp.dtype(v.get_value().dtype) for _, v in flat)
        self.treedef = jax.tree.structure(params)
        self.param_shapes = {path_key(p): v.shape for p, v in flat}
        self.shardings = {path_key(p): named_sharding(_axes(v), v.shape, self.mesh) for p, v in flat}
        self.placements = {path_key(p): param_placement(v, self.shardings[path_key(p)]) for p, v in flat}
        self._set_programs(model)
        self.schedule = optimizer.schedule()
        self.state_shardings = self._state_shardings()
        if abstract:
            self.frozen = _abstract(self.frozen, self.mesh)
            self.state = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                      self._abstract_state(), self.state_shardings)
            return
        values = {k: v.get_value() for k, (_, v) in zip(self.keys, flat)}
        master = jax.jit(_cast, static_argnums=1, out_shardings=self.shardings)(values, tuple((k, F32) for k in self.keys))
        opt_state = jax.jit(optimizer.optimizer(1.0).init, out_shardings=self.state_shardings["opt_state"])(master)
        replicated = self.state_shardings["step"]
        self.state = {"params": master, "opt_state": opt_state,
                      "step": jax.device_put(np.int32(0), replicated),
                      "rng": jax.device_put(np.asarray(jax.random.key_data(jax.random.key(seed))), replicated)}

    def _set_programs(self, model: GptOss):
        def program(dropout):
            graphdef = nnx.split(_with_dropout(model, dropout), self.trainable, nnx.RngState, ...)[0]
            return _Program(graphdef, self.treedef, self.keys, self.dtypes, self.config.update_rule(), self.remat,
                            self.loss_chunk, self.logit_bias)

        self.program, self.eval_program = program(True), program(False)

    def quantization_aware(self, on: bool = True) -> None:
        """From now on the expert adapters train quantization-aware (set_quantization_aware);
        the state carries on unchanged."""
        self._set_programs(set_quantization_aware(self.model().with_kernels(XLA), on))

    def _abstract_state(self):
        master = {k: jax.ShapeDtypeStruct(shape, F32) for k, shape in self.param_shapes.items()}
        return {"params": master, "opt_state": jax.eval_shape(self.config.optimizer(1.0).init, master),
                "step": jax.ShapeDtypeStruct((), jnp.int32),
                "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}

    # The state's layout: params like the model's, optimizer moments like their params.
    def _state_shardings(self):
        replicated = _replicated(self.mesh)
        optimizer = self.config.optimizer(1.0)
        master = {k: jax.ShapeDtypeStruct(shape, F32) for k, shape in self.param_shapes.items()}
        opt = optax.tree_map_params(optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, master),
                                    self.shardings, transform_non_params=lambda _: replicated)
        return {"params": dict(self.shardings), "opt_state": opt, "step": replicated, "rng": replicated}

    @property
    def steps_done(self) -> int:
        """Batches trained on so far."""
        return int(self.state["step"])

    def learning_rate(self, batches: int | None = None) -> float:
        batches = self.steps_done if batches is None else batches
        return float(self.schedule(batches // self.config.accumulation))

    def place(self, batch: Batch) -> Batch:
        """A host batch on the model's devices (on a mesh, rows split over the data axis)."""
        shardings = batch_shardings(batch, self.mesh)
        return Batch(*(None if x is None else put_host_array(x, sharding) for x, sharding in zip(batch, shardings)))

    def step(self, batch: Batch) -> dict:
        """Trains on one host batch. Returns loss (mean over its loss tokens), loss_tokens,
        grad_norm and learning_rate (of the optimizer step this batch belongs to)."""
        learning_rate = self.learning_rate()
        self.state, metrics = _train_step(self.state, self.rngs, self.frozen, self.place(batch), np.float32(learning_rate),
                                          program=self.program)
        out = {k: float(v) for k, v in metrics.items()}
        out["learning_rate"] = learning_rate
        return out

    def lower(self, batch: Batch):
        """The step lowered for the model's devices (`.compile()`, then `.memory_analysis()`):
        `batch` may hold jax.ShapeDtypeStructs."""
        shardings = batch_shardings(batch, self.mesh)
        batch = Batch(*(None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
                        for x, sharding in zip(batch, shardings)))
        learning_rate = jax.ShapeDtypeStruct((), F32, sharding=_replicated(self.mesh))
        return _train_step.lower(self.state, self.rngs, self.frozen, batch, learning_rate, program=self.program)

    def eval_loss(self, batches) -> float:
        """Mean loss over every loss token of `batches`."""
        total = count = 0.0
        for batch in batches:
            t, c = _eval_sums(self.state["params"], self.rngs, self.frozen, self.place(batch),
                              program=self.eval_program)
            total, count = total + float(t), count + float(c)
        return total / max(count, 1.0)

    def model(self) -> GptOss:
        """The model with the current weights (cast to its dtype), dropout off, its kernels."""
        params = jax.jit(_cast, static_argnums=1, out_shardings=self.placements)(self.state["params"],
                                                                                tuple(zip(self.keys, self.dtypes)))
        values = jax.tree.unflatten(self.treedef, [params[k] for k in self.keys])
        return nnx.merge(self.eval_program.graphdef, values, self.rngs, self.frozen, copy=True).with_kernels(self.kernels)

    def abstract_state(self):
        """The state's shapes, dtypes and shardings (the target of a restore)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                            self.state_shardings)


def _abstract(state, mesh):
    """A State of shapes (nnx.eval_shape) with each leaf placed by its logical axes on `mesh`."""
    flat = nnx.to_flat_state(state)
    for _, var in flat:
        value = var.get_value()
        sharding = param_placement(var, named_sharding(_axes(var), value.shape, mesh))
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
    return nnx.from_flat_state(flat)


# ------------------------------------------------------------------------------ checkpoints
class CheckpointSaveError(OSError):
    """A train-state checkpoint could not be written (what was there before is kept)."""


class Checkpoints:
    """The train state (Trainer.state) and a JSON `progress` record (data position, settings)
    per saved step in `directory`, through an Orbax CheckpointManager that keeps the newest
    `keep`. A step is written into a temporary folder and renamed when complete, so a save
    that fails or is killed leaves no step that loads; its leftovers are removed before the
    next save."""

    def __init__(self, directory, *, keep: int = 2):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "progress"))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, progress: dict) -> None:
        ocp = self.ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress))
        try:
            # A signal waits for the save to finish (or fail) and then acts; orbax's own logs of
            # a failure are replaced by the one error below.
            with uninterrupted(), _orbax_logs_dropped():
                self.manager.save(step, args=args, force=True)
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore report write failures as several types
            _drop_closed_loop_reports()  # the failed write's late callbacks, for the rest of the process
            previous = self.latest()
            kept = f"the checkpoint of step {previous} is kept" if previous is not None else "no checkpoint is kept"
            raise CheckpointSaveError(f"{self.directory}: saving the checkpoint of step {step} failed "
                                      f"({_short_error(e)}); {kept}; free some space or choose another --output") from None

    def progress(self, step: int) -> dict:
        return self.manager.restore(step, args=self.ocp.args.Composite(progress=self.ocp.args.JsonRestore()))["progress"]

    def restore(self, step: int, abstract_state) -> dict:
        """The train state of `step`, placed as `abstract_state` (Trainer.abstract_state()) says."""
        args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def close(self) -> None:
        self.manager.close()


@contextlib.contextmanager
def _orbax_logs_dropped():
    """Orbax logs a failed write from each of its threads, and tensorstore's callbacks then
    find orbax's event loop closed: neither reaches the user while this block runs."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [logging.NullHandler()], False
    hook = sys.unraisablehook

    def drop_closed_loop(unraisable):
        if not _is_closed_loop(unraisable.exc_value):
            hook(unraisable)

    sys.unraisablehook = drop_closed_loop
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers, logger.propagate = handlers, propagate


def _is_closed_loop(error) -> bool:
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _drop_closed_loop_reports() -> None:
    """After a failed write, tensorstore's callbacks can still arrive, from its own threads,
    once orbax's event loop is closed; Python prints each as a traceback (sys.excepthook,
    or sys.unraisablehook). Those reports are dropped; any other error still shows."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    if getattr(excepthook, "drops_closed_loop", False):
        return

    def drop_excepthook(kind, error, traceback):
        if not _is_closed_loop(error):
            excepthook(kind, error, traceback)

    def drop_unraisable(unraisable):
        if not _is_closed_loop(unraisable.exc_value):
            unraisablehook(unraisable)

    drop_excepthook.drops_closed_loop = True
    sys.excepthook, sys.unraisablehook = drop_excepthook, drop_unraisable


def _short_error(e: BaseException) -> str:
    code = getattr(e, "errno", None)
    if code:
        return os.strerror(code)
    text = " ".join(str(e).split(" [tensorstore_spec=")[0].split())
    found = re.search(r"os_error_code='?(\d+)", text)
    if found:
        return os.strerror(int(found.group(1)))
    return text[:300] or type(e).__name__


# ---------------------------------------------------------------------------------- metrics
def peak_memory() -> tuple[int, str]:
    """(bytes, "device" or "host"): the device's peak memory in use where JAX reports it,
    otherwise the process's peak resident memory."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host"


class MetricsLog:
    """Metrics as JSON lines appended to `path`. Reopening at step n (a resumed run) drops the
    lines of later steps, which the resumed run writes again."""

    def __init__(self, path, *, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.start = time.monotonic()

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
