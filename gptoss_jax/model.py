"""The gpt-oss model as a Flax NNX module tree (docs/architecture.md 2).

Every parameter carries `axes`, its logical axis names; `gptoss_jax.sharding.rules` maps
them to mesh axes. Expert weights stay FP4 (`float4_e2m1fn` + `float8_e8m0fnu` scales) and
are dequantized inside the forward: this reference path is the oracle for fused kernels.
A model whose kernels include the TPU expert kernel stores its experts in that kernel's
layout instead (`moe_tpu.TpuExperts`, converted once when the weights are loaded), and its
reference path reads them through the exact inverse re-layout.

Numerics follow the torch reference: activations in the compute dtype (bf16 by default)
with a rounding after each op, GEMMs accumulated in fp32, softmaxes computed in fp32.
With dtype=float32 everything is fp32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.config import GptOssConfig, yarn_correction_range
from gptoss_jax.kernels import dispatch, moe_tpu
from gptoss_jax.kernels.common import F32, NO_POSITION, ExpertWeights
from gptoss_jax.kernels.dispatch import XLA, Kernels
from gptoss_jax.kernels.moe_tpu import TPU_EXPERT_AXES, TpuExperts
from gptoss_jax.sharding.mesh import check_mesh_fits_model
from gptoss_jax.sharding.moe import sharded_expert_mix
from gptoss_jax.sharding.rules import MODEL, named_sharding, partition_spec


def _param(shape, dtype, axes, **metadata):
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes, **metadata)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else jax.lax.Precision.DEFAULT


def _einsum(spec, a, b, dtype):
    """A GEMM with bf16 (or fp32) inputs and fp32 accumulation; the result stays fp32."""
    return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=_precision(dtype))


class AdapterParam(nnx.Param):
    """A parameter added to fine-tune the model (gptoss_jax.train): a LoRA factor or an expert
    weight delta. Held in fp32 and cast to the compute dtype where it is applied; the model's
    own parameters stay as loaded."""


class LoraAdapter(nnx.Module):
    """A low-rank update of one linear map (LoRA): x -> scale * B A dropout(x).

    `a` [rank, *inputs] and `b` [*outputs, rank], named by the logical axes of the weight they
    adapt, so they are sharded like it. Applied in the compute dtype and rounded after each
    op, as PEFT's LoRA layers do; `dropout` (training only) needs `rngs` with a "dropout" stream."""

    def __init__(self, inputs: tuple[int, ...], input_axes, outputs: tuple[int, ...], output_axes, *, rank: int,
                 scale: float, dropout: float = 0.0, rngs: nnx.Rngs | None = None):
        self.a = AdapterParam(jnp.zeros((rank, *inputs), F32), axes=(None, *input_axes))
        self.b = AdapterParam(jnp.zeros((*outputs, rank), F32), axes=(*output_axes, None))
        self.scale = scale
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout else None

    def __call__(self, x, dtype):
        """x [..., *inputs] -> [..., *outputs]."""
        rank, inputs, outputs = self.a.shape[0], self.a.shape[1:], self.b.shape[:-1]
        lead = x.shape[:x.ndim - len(inputs)]
        if self.dropout is not None:
            x = self.dropout(x)
        a = self.a[...].reshape(rank, -1).astype(dtype)
        b = self.b[...].reshape(-1, rank).astype(dtype)
        t = _einsum("ni,ri->nr", x.reshape(-1, a.shape[1]), a, dtype).astype(dtype)
        y = _einsum("nr,or->no", t, b, dtype).astype(dtype)
        return (y.astype(F32) * self.scale).astype(dtype).reshape(*lead, *outputs)


class ExpertAdapter(nnx.Module):
    """A trained change to one projection of every expert of a layer ("mlp1" [experts, out, in]
    or "mlp2") on top of the frozen FP4 weights: a low-rank pair per expert, `a` [experts,
    rank, in] and `b` [experts, out, rank] (delta = scale * b @ a), or with rank None a full
    `delta` [experts, out, in].

    A low-rank pair is applied to the activations (the FP4 weights are never merged) unless
    `quantized`; a full delta, or any adapter when `quantized`, is added to the dequantized
    weights. `quantized` (quantization-aware training): the forward uses the sum rounded to
    MXFP4 exactly as `merged_expert_weight` exports it, and gradients pass the rounding
    unchanged (the straight-through estimator)."""

    def __init__(self, experts: int, outputs: int, output_axis: str, inputs: int, input_axis: str, *,
                 rank: int | None, scale: float = 1.0, quantized: bool = False):
        if rank is None:
            self.delta = AdapterParam(jnp.zeros((experts, outputs, inputs), F32),
                                      axes=("experts", output_axis, input_axis))
        else:
            self.a = AdapterParam(jnp.zeros((experts, rank, inputs), F32), axes=("experts", None, input_axis))
            self.b = AdapterParam(jnp.zeros((experts, outputs, rank), F32), axes=("experts", output_axis, None))
        self.rank = rank
        self.scale = scale
        self.quantized = quantized

    @property
    def fields(self) -> tuple[str, ...]:
        return ("delta",) if self.rank is None else ("a", "b")

    @property
    def on_weights(self) -> bool:
        return self.rank is None or self.quantized


def adapted_weight(w, arrays: dict, scale: float):
    """fp32 weights [experts, out, in] plus an ExpertAdapter's change (`arrays`: its fields)."""
    if "delta" in arrays:
        return w + arrays["delta"].astype(F32)
    low_rank = jnp.einsum("eor,eri->eoi", arrays["b"].astype(F32), arrays["a"].astype(F32), precision="highest")
    return w + low_rank * np.float32(scale)


def merged_expert_weight(fp4, scales, arrays: dict | None, adapter: ExpertAdapter | None):
    """The fp32 weights [experts, out, in] of an expert projection with its adapter added
    (`arrays`: the adapter's fields, possibly one device's share); MXFP4-rounded when the
    adapter is `quantized` (straight-through gradient)."""
    w = mxfp4.dequantize(fp4, scales, F32)
    if adapter is None:
        return w
    w = adapted_weight(w, arrays, adapter.scale)
    if adapter.quantized:
        w = w + jax.lax.stop_gradient(mxfp4.fake_quantize(w) - w)
    return w


class LayerCache(NamedTuple):
    """KV cache of one attention layer. Full layers hold `max_len` slots indexed by position;
    sliding layers hold a ring of exactly `sliding_window` slots indexed by position modulo
    the window. `positions` is the absolute position held in each slot (NO_POSITION: empty)."""

    k: jax.Array  # [batch, slots, kv_heads, head_dim]
    v: jax.Array
    positions: jax.Array  # [batch, slots] int32


# Logical axes of each cache field (for gptoss_jax.sharding.rules).
CACHE_AXES = LayerCache(k=("batch", "seq", "kv_heads", "head_dim"), v=("batch", "seq", "kv_heads", "head_dim"),
                        positions=("batch", "seq"))


class RMSNorm(nnx.Module):
    def __init__(self, config: GptOssConfig, dtype):
        self.eps = config.rms_norm_eps
        self.scale = _param((config.hidden_size,), dtype, ("norm",))

    def __call__(self, x):
        # docs/architecture.md 2.2: normalise in fp32, multiply the gain in fp32, then round once.
        t = x.astype(F32)
        t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + self.eps)
        return (t * self.scale[...].astype(F32)).astype(x.dtype)


def rope_tables(config: GptOssConfig, positions, dtype):
    """cos and sin [..., head_dim/2] for YaRN half-split RoPE, scaled by the concentration (docs/architecture.md 2.4)."""
    d_half = config.head_dim // 2
    freq = np.float32(config.rope_theta) ** (np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim))
    factor = config.rope_scaling_factor
    if factor > 1.0:
        low, high = yarn_correction_range(config)
        ramp = np.clip((np.arange(d_half, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation_weight = (1 - ramp).astype(np.float32)
        inv_freq = (1.0 / (factor * freq)) * (1 - extrapolation_weight) + (1.0 / freq) * extrapolation_weight
        concentration = 0.1 * math.log(factor) + 1.0
    else:
        inv_freq, concentration = 1.0 / freq, 1.0
    angle = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)
    return (jnp.cos(angle) * concentration).astype(dtype), (jnp.sin(angle) * concentration).astype(dtype)


def apply_rope(x, cos, sin):
    """x [b, t, heads, head_dim]; cos/sin [b, t, head_dim/2]. Half-split ("rotate half") pairs."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, config: GptOssConfig, layer: int, dtype):
        c = config
        self.config = c
        self.dtype = dtype
        self.sliding = c.is_sliding(layer)
        h, kv, d, hd = c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.head_dim
        self.norm = RMSNorm(c, dtype)
        self.wq = _param((h, hd, d), dtype, ("q_heads", "head_dim", "embed"))
        self.bq = _param((h, hd), dtype, ("q_heads", "head_dim"))
        self.wk = _param((kv, hd, d), dtype, ("kv_heads", "head_dim", "embed"))
        self.bk = _param((kv, hd), dtype, ("kv_heads", "head_dim"))
        self.wv = _param((kv, hd, d), dtype, ("kv_heads", "head_dim", "embed"))
        self.bv = _param((kv, hd), dtype, ("kv_heads", "head_dim"))
        self.wo = _param((d, h, hd), dtype, ("embed", "q_heads", "head_dim"))
        self.bo = _param((d,), dtype, ("embed",))
        self.sinks = _param((h,), dtype, ("q_heads",))
        # LoRA adapters by target: "q", "k", "v", "o" (gptoss_jax.train adds them).
        self.adapters = nnx.Dict()

    @property
    def window(self) -> int | None:
        return self.config.sliding_window if self.sliding else None

    def __call__(self, x, positions, cache: LayerCache | None = None, *, kernels: Kernels = XLA,
                 add_input: bool = False, segment_ids=None):
        """x [b, t, embed]; positions [b, t] (NO_POSITION for padding). With a cache, the new
        keys are attended together with the cached ones, then written into the cache.
        `segment_ids` [b, t] (no cache): tokens attend only to tokens of their own segment
        (packed documents). Returns (output, cache); with add_input the output is x + the
        attention output (the residual connection, which the one-token projection kernel adds
        itself)."""
        qkv_params = tuple(getattr(self, name)[...] for name in ("wq", "bq", "wk", "bk", "wv", "bv"))
        q, k, v = dispatch.run_norm_qkv(kernels, x, self.norm, qkv_params, reference=self.norm_qkv,
                                        adapted=any(name in self.adapters for name in "qkv"))
        rope = rope_tables(self.config, positions, self.dtype)
        out, new_cache = dispatch.run_cached_attention(
            kernels, q, k, v, positions, cache, self.sinks[...], rope, self.window,
            reference=functools.partial(self.rope_attend_write, kernels=kernels, segment_ids=segment_ids),
            apply_rope=apply_rope, write_cache=self.write_cache)
        out = dispatch.run_output(kernels, out, self.wo[...], self.bo[...], x if add_input else None,
                                  reference=self.output, adapted="o" in self.adapters)
        return out, new_cache

    def norm_qkv(self, x):
        h = self.norm(x)
        return tuple(self.project(h, getattr(self, "w" + name), getattr(self, "b" + name), self.adapters.get(name))
                     for name in "qkv")

    def project(self, h, w, b, adapter: LoraAdapter | None = None):
        # A linear layer with bias rounds once, after the bias (docs/architecture.md 2.7).
        out = (_einsum("btd,nkd->btnk", h, w[...], self.dtype) + b[...].astype(F32)).astype(self.dtype)
        return out if adapter is None else out + adapter(h, self.dtype)

    def rope_attend_write(self, q, k, v, positions, cache, rope, *, kernels: Kernels = XLA, segment_ids=None):
        """RoPE on the new q and k, attention over the cache and the new keys, and the cache
        with the new keys written (None without a cache)."""
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            keys, values, key_positions = k, v, positions
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids are for whole packed sequences; they cannot be used with a KV cache")
            keys = jnp.concatenate([cache.k, k], axis=1)
            values = jnp.concatenate([cache.v, v], axis=1)
            key_positions = jnp.concatenate([cache.positions, positions], axis=1)
        out = dispatch.run_attend(kernels, q, keys, values, positions, key_positions, self.sinks[...], self.window,
                                  reference=functools.partial(self.attend, segment_ids=segment_ids),
                                  segmented=segment_ids is not None)
        return out, (None if cache is None else self.write_cache(cache, k, v, positions))

    def output(self, out, residual=None):
        """The output projection of the heads [b, t, heads, head_dim] -> [b, t, embed] (docs/architecture.md 2.7),
        plus `residual` [b, t, embed] when given."""
        projected = (_einsum("btnk,dnk->btd", out, self.wo[...], self.dtype) + self.bo[...].astype(F32)).astype(self.dtype)
        if "o" in self.adapters:
            projected = projected + self.adapters["o"](out, self.dtype)
        return projected if residual is None else residual + projected

    def attend(self, q, k, v, q_positions, k_positions, segment_ids=None):
        """Softmax attention with the learned sink as an extra logit per head (docs/architecture.md 2.3).
        `segment_ids` [b, t] (keys = queries): attention only within a segment."""
        c, dt = self.config, self.dtype
        b, t, _, hd = q.shape
        groups = c.q_heads_per_kv_head
        q = q.reshape(b, t, c.num_key_value_heads, groups, hd)  # q head n = kv head * groups + g
        # The rounded scores times the Python float 1/sqrt(head_dim), in fp32, rounded once.
        scores = (_einsum("btkgd,bskd->bkgts", q, k, dt).astype(dt).astype(F32) * np.float32(hd ** -0.5)).astype(dt)

        qp, kp = q_positions[:, :, None], k_positions[:, None, :]
        allowed = (kp <= qp) & (kp != NO_POSITION)
        if self.sliding:
            allowed &= qp - kp < c.sliding_window
        if segment_ids is not None:
            allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
        scores = jnp.where(allowed[:, None, None], scores.astype(F32), -jnp.inf)

        sinks = self.sinks[...].astype(F32).reshape(1, c.num_key_value_heads, groups, 1, 1)
        peak = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
        weights = jnp.exp(scores - peak)
        probs = (weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sinks - peak))).astype(dt)
        out = _einsum("bkgts,bskd->btkgd", probs, v, dt).astype(dt)
        return out.reshape(b, t, c.num_attention_heads, hd)

    def write_cache(self, cache: LayerCache, k, v, positions) -> LayerCache:
        slots = cache.positions.shape[1]
        if self.sliding:
            # Only the newest `slots` positions of each sequence go into the ring, so no two
            # new tokens land on the same slot.
            newest = jnp.max(positions, axis=1, keepdims=True)
            write = (positions != NO_POSITION) & (positions > newest - slots)
            slot = positions % slots
        else:
            write = (positions != NO_POSITION) & (positions < slots)
            slot = positions
        slot = jnp.where(write, slot, slots)  # out of range: dropped by the scatter
        rows = jnp.arange(k.shape[0])[:, None]
        return LayerCache(
            k=cache.k.at[rows, slot].set(k, mode="drop"),
            v=cache.v.at[rows, slot].set(v, mode="drop"),
            positions=cache.positions.at[rows, slot].set(positions, mode="drop"),
        )


# Logical axes of the model's ExpertWeights (for gptoss_jax.sharding.rules).
EXPERT_AXES = ExpertWeights(
    mlp1_fp4=("experts", "expert_mlp", "embed_blocks", "block"), mlp1_scales=("experts", "expert_mlp", "embed_blocks"),
    mlp1_bias=("experts", "expert_mlp"), mlp2_fp4=("experts", "embed", "expert_mlp_blocks", "block"),
    mlp2_scales=("experts", "embed", "expert_mlp_blocks"), mlp2_bias=("experts", "embed"))


def expert_hidden_shards(config: GptOssConfig, mesh) -> int:
    """How many ways a mesh splits the experts' hidden units (its model axis, when the
    rules split them over it; 1 without a mesh)."""
    if mesh is None or partition_spec(("expert_mlp",), (config.intermediate_size,), mesh)[0] is None:
        return 1
    return mesh.shape[MODEL]


def tpu_expert_shapes(config: GptOssConfig, dtype, shards: int = 1) -> TpuExperts:
    """ShapeDtypeStructs of one layer's experts in the TPU kernel's layout (global shapes)."""
    c, s, block = config, jax.ShapeDtypeStruct, mxfp4.BLOCK
    e, d, i = c.num_experts, c.hidden_size, c.intermediate_size
    standard = ExpertWeights(s((e, 2 * i, d // block, block), mxfp4.FP4), s((e, 2 * i, d // block), mxfp4.E8M0),
                             s((e, 2 * i), dtype), s((e, d, i // block, block), mxfp4.FP4),
                             s((e, d, i // block), mxfp4.E8M0), s((e, d), dtype))
    return jax.eval_shape(functools.partial(moe_tpu.tpu_experts, hidden_shards=shards), standard)


def experts_for_tpu(w: ExpertWeights, mesh, shards: int) -> TpuExperts:
    """One layer's experts re-laid out for the TPU kernel, placed by the rules on `mesh`
    (None: the default device): the once-only conversion at load. Raises ValueError for
    scales the kernel cannot decode."""
    moe_tpu.check_scales(w.mlp1_scales, w.mlp2_scales)
    shapes = jax.eval_shape(functools.partial(moe_tpu.tpu_experts, hidden_shards=shards), w)
    shardings = TpuExperts(*(named_sharding(axes, a.shape, mesh) for axes, a in zip(TPU_EXPERT_AXES, shapes)))
    return _tpu_converter(shards, shardings)(w)


@functools.lru_cache(maxsize=None)
def _tpu_converter(shards: int, shardings: TpuExperts):
    return jax.jit(functools.partial(moe_tpu.tpu_experts, hidden_shards=shards), out_shardings=shardings)


class TpuExpertParams(nnx.Module):
    """One MoE layer's experts in the TPU kernel's layout: the fields of moe_tpu.TpuExperts,
    each a parameter with its logical axes (moe_tpu.TPU_EXPERT_AXES)."""

    def __init__(self, arrays: TpuExperts):
        for name, array, axes in zip(TpuExperts._fields, arrays, TPU_EXPERT_AXES):
            setattr(self, name, nnx.Param(array, axes=axes))

    def arrays(self) -> TpuExperts:
        return TpuExperts(*(getattr(self, name)[...] for name in TpuExperts._fields))


class MoE(nnx.Module):
    """`tpu_layout`: the experts are stored for the TPU expert kernel (`self.tpu_experts`)
    instead of as ExpertWeights (`self.mlp1_fp4`, ...)."""

    def __init__(self, config: GptOssConfig, dtype, mesh=None, tpu_layout: bool = False):
        c = config
        self.config = c
        self.dtype = dtype
        # With a mesh, the experts are spread over it (gptoss_jax.sharding.moe).
        self.mesh = mesh
        self.tpu_layout = tpu_layout
        self.hidden_shards = expert_hidden_shards(c, mesh)
        # Every E8M0 scale of the layer is at most 128 (true of trained weights), so the
        # grouped GEMM kernel may decode FP4 straight to bf16. A fact about the weights' values:
        # set by `update_weight_facts` when weights are loaded or replaced; False is always safe.
        self.scales_fit_bf16 = False
        e, d, i = c.num_experts, c.hidden_size, c.intermediate_size
        block = mxfp4.BLOCK
        self.norm = RMSNorm(c, dtype)
        self.router_w = _param((e, d), dtype, ("experts", "embed"))
        self.router_b = _param((e,), dtype, ("experts",))
        # Adapters by target: "router" (a LoraAdapter), "mlp1" and "mlp2" (ExpertAdapters).
        self.adapters = nnx.Dict()
        if tpu_layout:
            shapes = tpu_expert_shapes(c, dtype, self.hidden_shards)
            self.tpu_experts = TpuExpertParams(TpuExperts(*(jnp.zeros(a.shape, a.dtype) for a in shapes)))
            return
        # mlp1 rows alternate gate, up, gate, up, ... (docs/architecture.md 2.5); blocks run along the input axis.
        shapes = ExpertWeights((e, 2 * i, d // block, block), (e, 2 * i, d // block), (e, 2 * i),
                               (e, d, i // block, block), (e, d, i // block), (e, d))
        dtypes = ExpertWeights(mxfp4.FP4, mxfp4.E8M0, dtype, mxfp4.FP4, mxfp4.E8M0, dtype)
        for name, shape, dt, axes in zip(ExpertWeights._fields, shapes, dtypes, EXPERT_AXES):
            setattr(self, name, _param(shape, dt, axes))

    def update_weight_facts(self) -> None:
        """Recomputes `scales_fit_bf16` from the layer's (concrete) expert scales."""
        w = self.stored_experts()
        self.scales_fit_bf16 = mxfp4.scales_at_most(mxfp4.BF16_DECODE_MAX_SCALE, w.mlp1_scales, w.mlp2_scales)

    def stored_experts(self) -> ExpertWeights | TpuExperts:
        """The expert arrays as stored: TpuExperts with the TPU layout, else ExpertWeights, with
        the arrays of the layer's expert adapters when it has any (`adapted_expert_weights`), so
        that a mesh splits them like the experts."""
        if self.tpu_layout:
            return self.tpu_experts.arrays()
        base = [getattr(self, name)[...] for name in ExpertWeights._fields]
        fields = self.expert_adapter_fields()
        if not fields:
            return ExpertWeights(*base)
        return adapted_expert_weights(fields)(*base, *(self._adapter_variable(f)[...] for f in fields))

    def stored_axes(self) -> ExpertWeights | TpuExperts:
        """Logical axes of `stored_experts()`, in the same NamedTuple."""
        if self.tpu_layout:
            return TPU_EXPERT_AXES
        fields = self.expert_adapter_fields()
        if not fields:
            return EXPERT_AXES
        return adapted_expert_weights(fields)(*EXPERT_AXES, *(self._adapter_variable(f).get_metadata()["axes"]
                                                              for f in fields))

    def expert_weights(self) -> ExpertWeights:
        """The experts as ExpertWeights (with the TPU layout: its exact inverse re-layout)."""
        if self.tpu_layout:
            return moe_tpu.expert_weights_of(self.tpu_experts.arrays(), self.hidden_shards)
        return self.stored_experts()

    def expert_axes(self) -> ExpertWeights:
        """Logical axes of `expert_weights()`, in the same NamedTuple."""
        if self.tpu_layout:
            return EXPERT_AXES
        return self.stored_axes()

    def store_for_tpu(self) -> None:
        """Re-lays out this layer's experts for the TPU expert kernel (nothing when they are)."""
        if self.tpu_layout:
            return
        if self.expert_adapter_fields():
            raise ValueError("the TPU expert kernel cannot run experts with fine-tuning adapters; merge the adapters "
                             "first (gptoss_jax.train.merge) or keep kernels without moe_tpu")
        converted = experts_for_tpu(self.stored_experts(), self.mesh, self.hidden_shards)
        for name in ExpertWeights._fields:
            delattr(self, name)
        self.tpu_experts = TpuExpertParams(converted)
        self.tpu_layout = True

    def expert_adapter_fields(self) -> tuple[str, ...]:
        """Names of the expert adapters' arrays, e.g. ("mlp1_a", "mlp1_b")."""
        return tuple(f"{target}_{field}" for target in ("mlp1", "mlp2") if target in self.adapters
                     for field in self.adapters[target].fields)

    def _adapter_variable(self, field: str):
        target, name = field.split("_")
        return getattr(self.adapters[target], name)

    def _adapter_arrays(self, w, target: str) -> dict | None:
        """The arrays of expert adapter `target` held in `w` (possibly one device's share)."""
        if target not in self.adapters:
            return None
        return {name: getattr(w, f"{target}_{name}") for name in self.adapters[target].fields}

    def expert_projection(self, w, target: str):
        """Weights [experts, out, in] in the compute dtype of projection `target` of the experts in
        `w`, with its adapter added when the adapter works on the weights."""
        fp4, scales = getattr(w, f"{target}_fp4"), getattr(w, f"{target}_scales")
        adapter = self.adapters.get(target)
        if adapter is None or not adapter.on_weights:
            return mxfp4.dequantize(fp4, scales, self.dtype)
        return merged_expert_weight(fp4, scales, self._adapter_arrays(w, target), adapter).astype(self.dtype)

    def low_rank(self, w, target: str):
        """(a, b, scale) of projection `target`'s low-rank adapter applied to activations, or None."""
        adapter = self.adapters.get(target)
        if adapter is None or adapter.on_weights:
            return None
        arrays = self._adapter_arrays(w, target)
        return arrays["a"].astype(self.dtype), arrays["b"].astype(self.dtype), adapter.scale

    def norm_route(self, x):
        """RMSNorm, then the top-k experts per token and their weights (docs/architecture.md 2.5)."""
        h = self.norm(x)
        return (h, *self.route(h))

    def route(self, h):
        """Top-k experts per token and their weights: softmax over the k logits (docs/architecture.md 2.5)."""
        logits = (_einsum("nd,ed->ne", h, self.router_w[...], self.dtype)
                  + self.router_b[...].astype(F32)).astype(self.dtype)
        if "router" in self.adapters:
            logits = logits + self.adapters["router"](h, self.dtype)
        values, experts = jax.lax.top_k(logits, self.config.experts_per_token)
        return experts, jax.nn.softmax(values.astype(F32), axis=-1).astype(self.dtype)

    def swiglu(self, u):
        """Clamped SwiGLU on interleaved gate/up columns, with the +1 on the linear branch."""
        c, dt = self.config, self.dtype
        gate, up = u[..., 0::2], u[..., 1::2]
        gate = jnp.minimum(gate, jnp.asarray(c.swiglu_limit, dt))
        up = jnp.clip(up, -c.swiglu_limit, c.swiglu_limit).astype(dt)
        # torch multiplies a bf16 tensor by a Python float in fp32, then rounds; its sigmoid of a
        # bf16 tensor is evaluated in fp32 and rounded once (docs/architecture.md 2.5).
        z = (gate.astype(F32) * c.swiglu_alpha).astype(dt)
        glu = gate * jax.nn.sigmoid(z.astype(F32)).astype(dt)
        return glu * (up + jnp.asarray(1, dt))

    def __call__(self, x, *, kernels: Kernels = XLA, add_input: bool = False):
        """The MoE block on x [b, t, embed]; with add_input, x + that (the residual
        connection, which the batch-1 expert kernel adds itself)."""
        b, t, d = x.shape
        h, experts, weights = dispatch.run_norm_route(kernels, x.reshape(b * t, d), self.norm, self.router_w[...],
                                                      self.router_b[...], k=self.config.experts_per_token,
                                                      reference=self.norm_route, adapted="router" in self.adapters)
        residual = x.reshape(b * t, d) if add_input and self.mesh is None else None
        mix = functools.partial(self.expert_mix, kernels=kernels)
        if self.mesh is None:
            out = mix(h, experts, weights, self.stored_experts(), residual)
        else:
            out = sharded_expert_mix(self.mesh, mix, h, experts, weights, self.stored_experts(), self.stored_axes(),
                                     check_vma=not kernels.names())
        out = out.astype(self.dtype).reshape(b, t, d)
        return x + out if add_input and residual is None else out

    def expert_mix(self, h, experts, weights, w: ExpertWeights | TpuExperts, residual=None, *,
                   kernels: Kernels = XLA):
        """sum_k weights[n, k] * expert_{experts[n, k]}(h[n]) [n, embed], in fp32: the
        per-device expert computation. `w` (ExpertWeights or TpuExperts) may be one device's
        share of the experts; ids outside [0, experts in w) add nothing. With residual
        [n, embed]: residual + that sum rounded to the compute dtype."""
        c = self.config
        return dispatch.run_expert_mix(kernels, h, experts, weights, w, residual,
                                       swiglu=(c.swiglu_limit, c.swiglu_alpha), scales_fit_bf16=self.scales_fit_bf16,
                                       reference=self.weighted_sum, adapted="mlp1" in self.adapters or "mlp2" in self.adapters)

    def weighted_sum(self, h, experts, weights, w: ExpertWeights | TpuExperts, residual=None, outputs=None):
        """expert_mix from the expert outputs [n, k, embed] that `outputs(h, experts, w)`
        gives (None: the XLA reference, gathered for few pairs, grouped for many)."""
        n, k = experts.shape
        known = (experts >= 0) & (experts < w[0].shape[0])  # both layouts lead with the experts axis
        if outputs is None and isinstance(w, TpuExperts):
            w = moe_tpu.expert_weights_of(w)  # one device's share, or all of it without a mesh
        if outputs is not None:
            y = outputs(h, experts, w)
        elif n * k < self.config.num_experts:  # by the whole model's experts: every mesh takes the same path
            y = self.experts_gathered(h, jnp.where(known, experts, 0), w)
        else:
            y = self.experts_grouped(h, experts, w)
        y = jnp.where(known[..., None], y, jnp.zeros_like(y))
        mix = _einsum("nko,nk->no", y, weights, self.dtype)
        return mix if residual is None else residual + mix.astype(self.dtype)

    def experts_gathered(self, h, experts, w: ExpertWeights | None = None):
        """Few tokens: dequantize only the routed experts' weights. Returns [n, k, embed]."""
        w = self.expert_weights() if w is None else w
        dt = self.dtype

        def project(x, target, x_spec):
            if target in self.adapters and self.adapters[target].on_weights:
                weights = self.expert_projection(w, target)[experts]
            else:
                fp4, scales = getattr(w, f"{target}_fp4"), getattr(w, f"{target}_scales")
                weights = mxfp4.dequantize(fp4[experts], scales[experts], dt)
            out = _einsum(f"{x_spec}i,nkoi->nko", x, weights, dt).astype(dt)
            low_rank = self.low_rank(w, target)
            if low_rank is not None:
                a, b, scale = low_rank
                t = _einsum(f"{x_spec}i,nkri->nkr", x, a[experts], dt).astype(dt)
                delta = _einsum("nkr,nkor->nko", t, b[experts], dt).astype(dt)
                out = out + (delta.astype(F32) * scale).astype(dt)
            return out

        u = project(h, "mlp1", "n") + w.mlp1_bias[experts]
        y = project(self.swiglu(u), "mlp2", "nk")
        return y + w.mlp2_bias[experts]

    def experts_grouped(self, h, experts, w: ExpertWeights | None = None):
        """Many tokens: sort the (token, expert) pairs by expert and run one grouped GEMM per
        projection over all experts, dequantized inside the forward. Returns [n, k, embed];
        rows of ids outside [0, experts in w) are left unspecified."""
        w = self.expert_weights() if w is None else w
        dt = self.dtype
        n, k = experts.shape
        num_experts = w.mlp1_fp4.shape[0]
        flat = experts.reshape(-1)
        flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # unknown ids sort last
        order = jnp.argsort(flat, stable=True)
        token_of = order // k
        expert_of = jnp.minimum(flat[order], num_experts - 1)
        group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # unknown ids: in no group
        x = h[token_of]

        def grouped(x, weights):  # x [rows, in], weights [e, out, in] -> [rows, out]
            return jax.lax.ragged_dot(x, jnp.swapaxes(weights, 1, 2), group_sizes, preferred_element_type=F32,
                                      precision=_precision(dt)).astype(dt)

        def frozen_product(x, w, target):
            return grouped(x, self.expert_projection(w, target))

        # A layer's dequantized experts are recomputed for each projection's backward pass rather
        # than kept from the forward: one projection's weights live at a time (docs/finetuning.md).
        frozen_product = jax.checkpoint(frozen_product, static_argnums=2)

        def project(x, target):
            out = frozen_product(x, w, target)
            low_rank = self.low_rank(w, target)
            if low_rank is not None:
                a, b, scale = low_rank
                out = out + (grouped(grouped(x, a), b).astype(F32) * scale).astype(dt)
            return out

        a = self.swiglu(project(x, "mlp1") + w.mlp1_bias[expert_of])
        y = project(a, "mlp2") + w.mlp2_bias[expert_of]
        return jnp.zeros_like(y).at[order].set(y).reshape(n, k, -1)


@functools.cache
def adapted_expert_weights(adapter_fields: tuple[str, ...]) -> type:
    """The NamedTuple type of a layer's ExpertWeights followed by the arrays of its expert
    adapters (`adapter_fields`, e.g. ("mlp1_a", "mlp1_b")): one flat tuple, which
    gptoss_jax.sharding.moe splits over a mesh like the experts."""
    return NamedTuple("AdaptedExpertWeights", [(name, jax.Array) for name in ExpertWeights._fields + adapter_fields])


class Block(nnx.Module):
    def __init__(self, config: GptOssConfig, layer: int, dtype, mesh=None, tpu_experts: bool = False):
        self.attn = Attention(config, layer, dtype)
        self.mlp = MoE(config, dtype, mesh, tpu_experts)

    def __call__(self, x, positions, cache=None, *, kernels: Kernels = XLA, segment_ids=None):
        x, cache = self.attn(x, positions, cache, kernels=kernels, add_input=True, segment_ids=segment_ids)
        return self.mlp(x, kernels=kernels, add_input=True), cache


class GptOss(nnx.Module):
    """`model(tokens)` -> logits [batch, seq, vocab] for the whole causal sequence.
    `mesh`: the jax.sharding.Mesh its parameters are spread over (None: one device).
    `kernels`: which kernels run (gptoss_jax.kernels.Kernels; default the XLA path); with
    the TPU expert kernel the experts are stored in its layout (MoE.tpu_layout)."""

    def __init__(self, config: GptOssConfig, dtype=jnp.bfloat16, mesh=None, kernels: Kernels = XLA):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.kernels = kernels
        c = config
        # Read a row per token: stored row-major on TPUs (sharding.placement.param_placement).
        self.embedding = _param((c.vocab_size, c.hidden_size), dtype, ("vocab", "embed"), row_lookup=True)
        self.blocks = nnx.List([Block(c, i, dtype, mesh, kernels.moe_tpu) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c, dtype)
        self.unembedding = _param((c.vocab_size, c.hidden_size), dtype, ("vocab", "embed"))

    def __call__(self, tokens, positions=None, segment_ids=None):
        """`segment_ids` [batch, seq]: several documents packed in a row, each attending only to
        itself (with positions restarting at 0 for each)."""
        tokens = self._checked_tokens(tokens, positions)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, _ = self.forward(tokens, positions, None, segment_ids)
        return logits

    def extend(self, tokens, positions, caches: list[LayerCache]):
        """Runs new tokens at the given positions against the caches.
        Returns (logits [b, t, vocab], updated caches)."""
        return self.forward(self._checked_tokens(tokens, positions), positions, caches)

    def _checked_tokens(self, tokens, positions=None):
        """tokens as int32 [batch, seq], or a ValueError saying what is wrong. The ids' values
        are checked when they are known (not while jit traces)."""
        if not isinstance(tokens, jax.Array | np.ndarray):
            tokens = np.asarray(tokens)
        shape = tuple(tokens.shape)
        if len(shape) != 2:
            raise ValueError(f"tokens must be a 2-D array [batch, seq] of token ids, got shape {shape}; for one "
                             f"sequence pass tokens[None]")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer token ids, got {tokens.dtype}")
        if positions is not None and tuple(np.shape(positions)) != shape:
            raise ValueError(f"positions must have the tokens' shape {shape}, got {tuple(np.shape(positions))}")
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {low if low < 0 else high}")
        return jnp.asarray(tokens, jnp.int32)

    def with_kernels(self, kernels: Kernels) -> GptOss:
        """The same model (the same parameter arrays) running `kernels`; with the TPU expert
        kernel, experts stored as ExpertWeights are re-laid out for it (new arrays, once)."""
        graphdef, state = nnx.split(self)
        model = nnx.merge(graphdef, state)
        model.kernels = kernels
        if kernels.moe_tpu:
            for block in model.blocks:
                block.mlp.store_for_tpu()
        return model

    def update_weight_facts(self) -> None:
        """Recomputes what the kernels may assume about the weights' values (MoE.scales_fit_bf16):
        the loader calls it; call it after replacing weights."""
        for block in self.blocks:
            block.mlp.update_weight_facts()

    def init_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        c = self.config
        caches = []
        for layer in range(c.num_hidden_layers):
            slots = min(c.sliding_window, max_len) if c.is_sliding(layer) else max_len
            shape = (batch, slots, c.num_key_value_heads, c.head_dim)
            caches.append(LayerCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                                     jnp.full((batch, slots), NO_POSITION, jnp.int32)))
        return caches

    def forward(self, tokens, positions, caches, segment_ids=None):
        h, new_caches = self.hidden_states(tokens, positions, caches, segment_ids)
        return self.unembed(h), new_caches

    def hidden_states(self, tokens, positions, caches=None, segment_ids=None, *, remat: bool = False):
        """The final normalised hidden states [b, t, embed] (what `unembed` reads) and the
        updated caches (None without caches). `remat`: each block's activations are
        recomputed in the backward pass instead of being kept (training long sequences)."""
        x = self.embedding[...][tokens]
        kernels = self.kernels.on(self.mesh)

        def run(block, x, cache):
            return block(x, positions, cache, kernels=kernels, segment_ids=segment_ids)

        if remat:
            run = nnx.remat(run)
        new_caches = []
        for layer, block in enumerate(self.blocks):
            x, cache = run(block, x, None if caches is None else caches[layer])
            new_caches.append(cache)
        return self.norm(x), (None if caches is None else new_caches)

    def unembed(self, h):
        """Logits [..., vocab] of final hidden states h [..., embed]."""
        return _einsum("...d,vd->...v", h, self.unembedding[...], self.dtype).astype(self.dtype)


def abstract_model(config: GptOssConfig, dtype, mesh=None, kernels: Kernels = XLA) -> tuple[nnx.GraphDef, list]:
    """The module tree without memory: its graph and (path, Variable) leaves."""
    if mesh is not None:
        check_mesh_fits_model(config, mesh)
    abstract = nnx.eval_shape(lambda: GptOss(config, dtype, mesh, kernels))
    graphdef, state = nnx.split(abstract)
    return graphdef, list(nnx.to_flat_state(state))
