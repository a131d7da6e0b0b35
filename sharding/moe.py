"""Expert parallelism for the MoE layers: two dropless shard_map strategies.

Each device holds a slice of the experts (the "experts" dimension, split over the expert
mesh axis) and, of each of its experts, a slice of the hidden units (split over the model
axis). Routing is dropless: every token reaches its k experts whatever the load, so every
buffer has room for all (token, expert) pairs.

- replicated (decode: few tokens): every device sees all tokens of its data slice, runs
  the pairs routed to its own experts and contributes zero for the others; one psum over
  the expert and model axes adds the partial outputs.
- all_to_all (prefill: many tokens): the devices of the expert axis split the tokens;
  each sends every (token, expert) pair to the device holding that expert (an all-to-all
  whose chunks hold up to all pairs), the owners run their experts and send the weighted
  outputs back (a second all-to-all), each device sums its tokens' k outputs, and one psum
  over the expert and model axes gathers the token shares and sums the hidden-unit split.

Both give the single-device result up to fp32 summation order. The per-device expert
computation is a function passed in (`expert_mix`, the model's `MoE.expert_mix`), so a
fused kernel can replace it without touching the communication here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from gptoss_jax.sharding.rules import partition_spec

# Tokens per data slice from which the all-to-all strategy is used (prefill); fewer tokens
# (decode batches) use the replicated strategy.
ALL_TO_ALL_MIN_TOKENS = 128
STRATEGIES = ("auto", "replicated", "all_to_all")
HIDDEN_AXES = ("expert_mlp", "expert_mlp_blocks")
F32 = jnp.float32

# expert_mix(h [n, embed], experts [n, k] local ids, weights [n, k], local expert weights)
#   -> [n, embed] fp32: sum_k weights * expert(h); ids outside [0, local experts) add nothing.
ExpertMix = Callable[..., jax.Array]


class ExpertLayout(NamedTuple):
    """Which mesh axes split the experts, their hidden units and the tokens (None: not split)."""

    expert_axis: str | None
    hidden_axis: str | None
    token_axis: str | None
    weight_specs: tuple  # a PartitionSpec per expert weight, same structure as the weights


def expert_layout(mesh: Mesh, h, params, axes) -> ExpertLayout:
    """Reads the split from the rules table, so the shard_map specs equal the shardings the
    loader gave the parameters. The hidden units count as split only when every weight
    that has them splits them over the same axis."""
    specs = [partition_spec(a, p.shape, mesh) for a, p in zip(axes, params)]
    expert_axes, hidden_axes = set(), set()
    for a, spec in zip(axes, specs):
        for name, mesh_axis in zip(a, spec):
            if name == "experts":
                expert_axes.add(mesh_axis)
            elif name in HIDDEN_AXES:
                hidden_axes.add(mesh_axis)
    expert_axis = expert_axes.pop() if len(expert_axes) == 1 else None
    hidden_axis = hidden_axes.pop() if len(hidden_axes) == 1 else None

    def spec_for(a):
        return PartitionSpec(*(expert_axis if n == "experts" else hidden_axis if n in HIDDEN_AXES else None
                               for n in a))

    token_axis = partition_spec(("batch", "embed"), h.shape, mesh)[0]
    return ExpertLayout(expert_axis, hidden_axis, token_axis, type(params)(*(spec_for(a) for a in axes)))


def choose_strategy(n_tokens: int, layout: ExpertLayout, mesh: Mesh) -> str:
    """all_to_all for large token counts (per data slice) when the experts are split."""
    per_slice = n_tokens // (mesh.shape[layout.token_axis] if layout.token_axis else 1)
    if layout.expert_axis is None or mesh.shape[layout.expert_axis] == 1 or per_slice < ALL_TO_ALL_MIN_TOKENS:
        return "replicated"
    return "all_to_all"


def sharded_expert_mix(mesh: Mesh, expert_mix: ExpertMix, h, experts, weights, params, axes,
                       *, strategy: str = "auto", check_vma: bool = True) -> jax.Array:
    """The MoE output [n, embed] in fp32 for tokens `h` [n, embed] routed to global expert ids
    `experts` [n, k] with `weights` [n, k]. `params` holds the layer's expert weights as
    global arrays (a NamedTuple), `axes` their logical axes (the same NamedTuple type).
    check_vma: shard_map's type check of what varies over which mesh axis; kernels whose
    outputs do not state it, and Pallas' interpreter, need it off."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got '{strategy}'")
    layout = expert_layout(mesh, h, params, axes)
    if strategy == "auto":
        strategy = choose_strategy(h.shape[0], layout, mesh)
    if strategy == "all_to_all" and layout.expert_axis is None:
        strategy = "replicated"  # nothing to dispatch to
    body = _replicated if strategy == "replicated" else _all_to_all
    tokens = PartitionSpec(layout.token_axis, None)
    run = jax.shard_map(lambda h, e, w, p: body(layout, expert_mix, h, e, w, p), mesh=mesh,
                        in_specs=(tokens, tokens, tokens, layout.weight_specs), out_specs=tokens, check_vma=check_vma)
    return run(h, experts, weights, params)


# --------------------------------------------------------------------- per-device bodies
def _axis_size(axis):
    return 1 if axis is None else jax.lax.axis_size(axis)


def _axis_index(axis):
    return 0 if axis is None else jax.lax.axis_index(axis)


def _bias_once(layout: ExpertLayout, params):
    """With the hidden units split, each device's output is a partial sum over its hidden
    units; the output bias must enter it only once, on the first device of the axis."""
    if layout.hidden_axis is None:
        return params
    first = _axis_index(layout.hidden_axis) == 0
    return params._replace(mlp2_bias=jnp.where(first, params.mlp2_bias, jnp.zeros_like(params.mlp2_bias)))


def _reduce_axes(layout: ExpertLayout) -> tuple[str, ...]:
    return tuple(a for a in (layout.expert_axis, layout.hidden_axis) if a is not None)


def _replicated(layout: ExpertLayout, expert_mix, h, experts, weights, params):
    num_local = params[0].shape[0]
    local = experts - _axis_index(layout.expert_axis) * num_local
    mine = (local >= 0) & (local < num_local)
    axes = _reduce_axes(layout)
    if axes:
        # Each device uses the tokens differently. Said explicitly, since shard_map's type
        # check cannot always infer it: jax's sort types an argsort's indices by its iota
        # (invariant), not by the varying keys, so the grouped path's h[order] would count
        # as invariant and its gradient be summed over the devices before being scattered
        # back through each device's own order.
        h = jax.lax.pcast(h, axes, to="varying")
    out = expert_mix(h, jnp.where(mine, local, num_local), jnp.where(mine, weights, 0),
                     _bias_once(layout, params))
    return jax.lax.psum(out, axes) if axes else out


def _all_to_all(layout: ExpertLayout, expert_mix, h, experts, weights, params):
    axis = layout.expert_axis
    devices, num_local = _axis_size(axis), params[0].shape[0]
    n, k = experts.shape
    d = h.shape[1]

    # This device's share of the tokens (padded so the expert axis splits them evenly;
    # padding pairs have expert -1 and are never sent).
    share = -(-n // devices)
    pad = devices * share - n
    h = jnp.pad(h, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=-1)
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    start = _axis_index(axis) * share
    x = jax.lax.dynamic_slice_in_dim(h, start, share)
    ids = jax.lax.dynamic_slice_in_dim(experts, start, share).reshape(-1)  # [pairs]
    wts = jax.lax.dynamic_slice_in_dim(weights, start, share).reshape(-1)
    pairs = share * k

    # Dispatch: pair p goes to device dest[p], into slot rank[p] of the chunk for it.
    dest = jnp.where(ids >= 0, ids // num_local, devices)  # `devices`: not sent
    onehot = dest[:, None] == jnp.arange(devices)[None, :]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, jnp.minimum(dest, devices - 1)[:, None], 1)[:, 0]
    send_x = jnp.zeros((devices, pairs, d), h.dtype).at[dest, rank].set(x[jnp.arange(pairs) // k], mode="drop")
    send_id = jnp.full((devices, pairs), -1, jnp.int32).at[dest, rank].set(ids - dest * num_local, mode="drop")
    send_w = jnp.zeros((devices, pairs), weights.dtype).at[dest, rank].set(wts, mode="drop")
    recv_x, recv_id, recv_w = (jax.lax.all_to_all(a, axis, 0, 0) for a in (send_x, send_id, send_w))

    # The owners run their experts on every pair they received (k = 1 per row).
    rows_id = recv_id.reshape(-1, 1)
    y = expert_mix(recv_x.reshape(-1, d), jnp.where(rows_id >= 0, rows_id, num_local), recv_w.reshape(-1, 1),
                   _bias_once(layout, params))

    # Return: each pair's weighted output comes back to the slot it was sent from.
    back = jax.lax.all_to_all(y.reshape(devices, pairs, d), axis, 0, 0)
    sent = (dest < devices)[:, None]
    pair_out = jnp.where(sent, back[jnp.minimum(dest, devices - 1), rank], 0)
    out = pair_out.reshape(share, k, d).sum(axis=1)
    # One psum both gathers the shares of the expert axis and sums the hidden-unit partials.
    out = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((devices * share, d), out.dtype), out, start, 0)
    return jax.lax.psum(out, _reduce_axes(layout))[:n]
