"""Compiling the TPU kernels ahead of time on a machine without TPUs ("deviceless AOT").

With libtpu installed, JAX describes a TPU topology (`topology`) and compiles for its
devices with the real XLA:TPU and Mosaic compilers; the compiled executable reports its
memory use, its HLO and XLA's cost analysis. The helpers here build the kernels' inputs at
the gpt-oss shapes, list the non-kernel ops that move large buffers (`large_ops`) and count
the bytes the kernels' block specs move (`moe_block_bytes`, `attention_block_bytes`);
XLA's cost analysis counts a custom call's whole operands instead.

libtpu takes a lock file (/tmp/libtpu_lockfile) when it starts, and another process's lock
(any JAX process that started with libtpu installed and JAX_PLATFORMS unset) makes the
topology fail; ALLOW_MULTIPLE_LIBTPU_LOAD=1 lifts that, and `topology` sets it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax.kernels import attention_tpu, moe_tpu
from gptoss_jax.kernels.common import max_tiles

LANES = 128
# Chips per host when none is given (a v5e/v6e host of the tests' topologies holds 2x2).
CHIPS_PER_HOST = {"1x1": (1, 1, 1), "2x2": (2, 2, 1), "2x4": (2, 2, 1)}


@functools.cache
def topology(name: str, chips_per_host: tuple[int, int, int] | None = None, chip_config: str = "default"):
    """A TPU topology such as "v5e:1x1", "v5e:2x4" or "v6e:1x1" (needs libtpu): its
    `devices` are what programs compile for. `chips_per_host`: the host bounds (default
    CHIPS_PER_HOST); `chip_config`: "default", or "megacore" for a v4's two cores as one
    device."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chips = name.split(":")[1]
    return topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip_config,
                                        chips_per_host_bounds=chips_per_host or CHIPS_PER_HOST[chips], num_slices=1)


def one_chip(name: str = "v5e:1x1") -> Mesh:
    return Mesh(np.array(topology(name).devices[:1]), ("chip",))


def placed(shapes, mesh: Mesh, specs=None):
    """ShapeDtypeStructs (a pytree) with NamedShardings on `mesh` (replicated unless a
    PartitionSpec pytree is given)."""
    leaves, tree = jax.tree.flatten(shapes)
    spec_leaves = [PartitionSpec()] * len(leaves) if specs is None else tree.flatten_up_to(specs)
    return tree.unflatten([jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, p))
                           for s, p in zip(leaves, spec_leaves)])


def compile_for(fn, *args):
    """jax.jit(fn) compiled for the devices of the arguments' shardings."""
    return jax.jit(fn).lower(*args).compile()


# ------------------------------------------------------------------------- model shapes
@dataclasses.dataclass(frozen=True)
class Shapes:
    """The dimensions of a gpt-oss model that the kernels see."""

    name: str
    layers: int
    experts: int
    embed: int = 2880
    hidden: int = 2880
    experts_per_token: int = 4
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    window: int = 128


GPT_OSS_20B = Shapes("gpt-oss-20b", layers=24, experts=32)
GPT_OSS_120B = Shapes("gpt-oss-120b", layers=36, experts=128)


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def expert_shapes(m: Shapes, dtype=jnp.bfloat16, hidden_shards: int = 1) -> moe_tpu.TpuExperts:
    """ShapeDtypeStructs of one layer's TpuExperts (global shapes)."""
    s = jax.ShapeDtypeStruct
    e, d, i = m.experts, m.embed, m.hidden
    mlp2_rows = hidden_shards * _padded(i // 32 // hidden_shards, moe_tpu.SCALE_ROWS)
    return moe_tpu.TpuExperts(
        s((e, 2, d // 2, i), jnp.uint8), s((e, 2, _padded(d // 32, moe_tpu.SCALE_ROWS), i), jnp.uint8),
        s((e, 2, i), dtype), s((e, i // 2, d), jnp.uint8), s((e, mlp2_rows, d), jnp.uint8), s((e, d), dtype))


def attention_shapes(m: Shapes, batch: int, slots: int, dtype=jnp.bfloat16):
    """ShapeDtypeStructs of decode_attention_tpu's inputs (cache of `slots` slots)."""
    s = jax.ShapeDtypeStruct
    return (s((batch, 1, m.heads, m.head_dim), dtype), s((batch, 1, m.kv_heads, m.head_dim), dtype),
            s((batch, 1, m.kv_heads, m.head_dim), dtype), s((batch, 1), jnp.int32),
            s((batch, slots, m.kv_heads, m.head_dim), dtype), s((batch, slots, m.kv_heads, m.head_dim), dtype),
            s((batch, slots), jnp.int32), s((m.heads,), dtype))


def moe_decode_fn(limit: float = 7.0, alpha: float = 1.702, **tuning):
    return functools.partial(moe_tpu.experts_tpu, limit=limit, alpha=alpha, interpret=False, **tuning)


def attention_fn(window: int | None, **tuning):
    return functools.partial(attention_tpu.decode_attention_tpu, window=window, interpret=False, **tuning)


# -------------------------------------------------------------------------- HLO reading
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\(")
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_FREE = {"parameter", "custom-call", "bitcast", "get-tuple-element", "tuple", "constant", "copy-start",
         "copy-done", "slice-start", "slice-done"}


def _bits(dtype: str) -> int:
    """Bits of an HLO element type ("bf16", "f4e2m1fn", "pred"; 0 for "token")."""
    if dtype == "pred":
        return 8
    digits = re.search(r"\d+", dtype)
    return int(digits.group()) if digits else 0


def _bytes(shape_text: str) -> int:
    """Bytes of the arrays in an HLO result type such as "bf16[4,2880]{1,0:T(4,128)}"."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        total += int(np.prod([int(d) for d in dims.split(",") if d])) * _bits(dtype) // 8
    return total


def large_ops(hlo_text: str, min_bytes: int) -> list[tuple[str, str, int]]:
    """(name, op, bytes) of each instruction, kernels (custom calls) and pass-through ops
    aside, whose result takes at least `min_bytes`: the copies, converts and transposes a
    layout mismatch or a per-call conversion would add."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match and match.group(3) not in _FREE:
            size = _bytes(match.group(2))
            if size >= min_bytes:
                found.append((match.group(1), match.group(3), size))
    return found


def _entry(hlo_text: str) -> list[str]:
    lines = hlo_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return lines[start + 1:end]


def non_kernel_users(hlo_text: str, parameter_names) -> dict[str, list[str]]:
    """For each entry parameter whose name or source path contains one of
    `parameter_names` (such as "mlp1_bytes" or "cache_k"), the ops other than the TPU kernels (following bitcasts)
    that read it: empty lists mean the kernels read those arrays where they lie."""
    entry = _entry(hlo_text)
    defined = {}
    for line in entry:
        match = _INSTRUCTION.match(line)
        if match:
            defined[match.group(1)] = (match.group(3), line)
    users: dict[str, list[str]] = {}
    for name, (op, line) in defined.items():
        source = re.search(r'op_name="([^"]*)"', line)
        label = name + (source.group(1) if source else "")
        if op == "parameter" and any(p in label for p in parameter_names):
            found, frontier = [], [name]
            while frontier:
                current = frontier.pop()
                for user, (user_op, line) in defined.items():
                    if re.search(rf"[(,]\s*%{re.escape(current)}[,)]", line.split("=", 1)[1]):
                        if user_op == "bitcast":
                            frontier.append(user)
                        elif not (user_op == "custom-call" and 'custom_call_target="tpu_custom_call"' in line):
                            found.append(f"{user_op} {user}")
            users[name] = found
    return users


def kernel_calls(hlo_text: str) -> int:
    return hlo_text.count('custom_call_target="tpu_custom_call"')


# ------------------------------------------------------------------ HBM bytes of a program
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_CALLED = re.compile(r"(?:body|condition|true_computation|false_computation)=%([\w.\-]+)|"
                     r"branch_computations=\{([^}]*)\}")
_TYPED = re.compile(r"([a-z]+\d*)\[([\d,]*)\](\{[^}]*\})?")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "copy-done", "slice-done", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
               "all-reduce-done", "all-gather-done", "collective-permute-done"}
_SLICING = {"dynamic-slice", "slice", "gather"}


def _hbm(type_text: str) -> int:
    """Bytes of the arrays in an HLO type that live in HBM (no S(n) memory space: S(1) is
    VMEM, S(2) SMEM)."""
    total = 0
    for dtype, dims, layout in _TYPED.findall(type_text):
        if layout and re.search(r"S\(\d+\)", layout):
            continue
        total += int(np.prod([int(d) for d in dims.split(",") if d])) * _bits(dtype) // 8
    return total


def _computations(hlo_text: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """name -> [(instruction, result type, op, the rest of the line)] of each computation."""
    found, current = {}, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = found.setdefault("ENTRY" if line.startswith("ENTRY") else head.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            current.append((match.group(1), match.group(2), match.group(3), line[match.end():]))
    return found


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", re.split(r"\), [a-z_]+=", rest, maxsplit=1)[0])


def hbm_traffic(hlo_text: str) -> dict[str, float]:
    """The HBM bytes one run of a compiled TPU program moves, by kind of op: {"kernels":
    what the Pallas kernels' cost estimates declare (their block specs), "xla": the other
    ops}. Every op outside fusions (in the entry computation and the loops and branches it
    runs, each loop body once) counts the HBM-resident arrays it reads and writes; arrays
    in VMEM or SMEM (XLA's prefetches) count where they are copied from HBM; a fusion
    counts only the slices of an operand it reads through slicing ops, and an in-place
    update (a fusion or op whose result is a dynamic-update-slice of an operand) counts the
    update, not the whole buffer. docs/tpu.md explains the method."""
    computations = _computations(hlo_text)
    types = {name: t for body in computations.values() for name, t, _, _ in body}
    top, frontier = set(), ["ENTRY"]
    while frontier:
        name = frontier.pop()
        if name in top or name not in computations:
            continue
        top.add(name)
        for _, _, _, rest in computations[name]:
            for single, several in _CALLED.findall(rest):
                frontier += [single] if single else re.findall(r"%([\w.\-]+)", several)
    totals = {"kernels": 0.0, "xla": 0.0}
    for name in top:
        for _instruction, result, op, rest in computations[name]:
            if op in _NO_TRAFFIC:
                continue
            if op == "custom-call" and 'custom_call_target="tpu_custom_call"' in rest:
                totals["kernels"] += sum(float(b) for b in re.findall(r'"bytes_accessed":"?(\d+)', rest))
                continue
            operands = _operands(rest)
            if op in ("copy-start", "slice-start"):  # one array moved between memories: count its HBM sides
                # copy-start: (destination, source, context); slice-start: ((source), slice, context)
                arrays = _TYPED.findall(result)
                moved, ends = (arrays[0], arrays[:2]) if op == "copy-start" else (arrays[1], arrays[:2])
                in_hbm = sum(not re.search(r"S\(\d+\)", layout or "") for _, _, layout in ends)
                totals["xla"] += in_hbm * _bytes("{}[{}]".format(*moved[:2]))
                continue
            totals["xla"] += _op_traffic(op, result, rest, operands, types, computations)
    return totals


def _op_traffic(op, result, rest, operands, types, computations) -> float:
    if op == "dynamic-update-slice":  # in place: the update is read and written
        return 2 * _hbm(types.get(operands[1], "")) if _hbm(result) else 0
    if op != "fusion":
        return _hbm(result) + sum(_hbm(types.get(a, "")) for a in operands)
    called = re.search(r"calls=%([\w.\-]+)", rest)
    body = computations.get(called.group(1), []) if called else []
    inner = {name: t for name, t, _, _ in body}
    index_of = {name: int(re.match(r"(\d+)\)", line_rest).group(1)) for name, _, o, line_rest in body
                if o == "parameter"}
    uses = {name: [] for name in index_of}
    for _name, t, o, line_rest in body:
        for position, a in enumerate(_operands(line_rest)):
            if a in uses:
                uses[a].append((o, position, t))
    total, in_place = 0.0, False
    for param, index in index_of.items():
        outer = types.get(operands[index], "") if index < len(operands) else ""
        if not _hbm(outer):
            continue
        used = uses[param]
        if used and all(o == "dynamic-update-slice" and position == 0 for o, position, _ in used):
            # Updated in place: the updates are written (and read, counted as operands).
            in_place = True
            for _name, _, o, line_rest in body:
                if o == "dynamic-update-slice" and _operands(line_rest)[0] == param:
                    total += _hbm_like(outer, inner.get(_operands(line_rest)[1], ""))
        elif used and all(o in _SLICING and position == 0 for o, position, _ in used):
            total += sum(_hbm_like(outer, t) for _, _, t in used)
        else:
            total += _hbm(outer)
    return total if in_place else total + _hbm(result)


def _hbm_like(outer_type: str, inner_type: str) -> int:
    """Bytes of `inner_type`'s arrays (a slice of the fusion operand `outer_type`) when
    the operand is in HBM, whatever memory space the slice itself is given."""
    return _bytes(re.sub(r"\{[^}]*\}", "", inner_type)) if _hbm(outer_type) else 0


# ------------------------------------------------------------------ bytes per kernel call
def moe_block_bytes(m: Shapes, tokens: int, hidden_shards: int = 1, expert_shards: int = 1,
                    dtype=jnp.bfloat16) -> int:
    """HBM bytes the two expert kernels move on one device for `tokens` tokens whose
    (token, expert) pairs go to as many different experts as they can (the worst case;
    each routed expert's blocks are read once): every column block of its packed bytes
    and scales (lanes padded to 128, as HBM tiles hold them), the tiles' inputs, outputs
    and mlp1 bias, and the mlp2 bias rows the XLA add reads. Experts of other devices move
    nothing."""
    hidden = m.hidden // hidden_shards
    pairs = tokens * m.experts_per_token
    routed = min(pairs, m.experts // expert_shards)
    block_m = moe_tpu.default_block_m(pairs, m.experts // expert_shards)
    tiles = max_tiles(pairs, m.experts // expert_shards, block_m)
    item = jnp.dtype(dtype).itemsize
    mlp1_rows = m.embed // 2 + _padded(m.embed // 32, moe_tpu.SCALE_ROWS)
    mlp2_rows = hidden // 2 + _padded(hidden // 32, moe_tpu.SCALE_ROWS)
    weights = routed * (2 * mlp1_rows * _padded(hidden, LANES) + mlp2_rows * _padded(m.embed, LANES))
    activations = tiles * block_m * item * (m.embed + hidden + hidden + m.embed)  # x, a in and out, y
    biases = tiles * item * (2 * hidden + m.embed)
    return weights + activations + biases


def attention_block_bytes(m: Shapes, batch: int, slots: int, position: int, window: int | None,
                          block: int | None = None, dtype=jnp.bfloat16) -> int:
    """HBM bytes the decode attention kernel moves for one layer when every sequence is at
    `position`: the valid key and value blocks and their positions, q, the new key and
    value, the output."""
    block = block or attention_tpu.default_block(slots)
    valid_blocks = -(-min(position + 1, slots) // block)
    item = jnp.dtype(dtype).itemsize
    cache = 2 * valid_blocks * m.kv_heads * m.head_dim * block * item
    # Each sequence's key and value passes read the positions of the whole batch per block.
    positions = 2 * valid_blocks * batch * block * 4
    small = (2 * m.heads + 2 * m.kv_heads) * m.head_dim * item
    return batch * (cache + positions + small)
