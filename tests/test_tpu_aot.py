"""The TPU programs compiled ahead of time for TPU v5e and v6e by the real XLA:TPU and Mosaic
compilers (gptoss_jax.kernels.tpu_aot), at the gpt-oss shapes, on a machine without TPUs:
the kernels alone, and the engine's prefill and decode step of the real-width models cut
to two layers, through `python -m gptoss_jax.plan` (20b on a v5e-1, 120b on a v5e-8 split
4x2). Outside the kernels no op copies, converts or transposes the experts or the KV
cache, and a decode step moves about the bytes it must. Needs libtpu (`pip install
"libtpu==0.0.42.*"`, the version jax[tpu] 0.10.2 pins). Marked tpu_aot; a few minutes on
2 cores."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import mxfp4, plan
from gptoss_jax.kernels import moe_tpu, tpu_aot
from gptoss_jax.sharding import mesh as mesh_lib
from gptoss_jax.sharding import rules
from gptoss_jax.sharding.moe import sharded_expert_mix

pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU compiler for the AOT checks "
                                     "(pip install 'libtpu==0.0.42.*')")

pytestmark = pytest.mark.tpu_aot
MB = 2**20
EXPERT_ARRAYS = ("mlp1_bytes", "mlp1_scales", "mlp2_bytes", "mlp2_scales")


def assert_read_in_place(text, names, count):
    """The `count` named arrays (entry parameters) are read by the kernels alone."""
    users = tpu_aot.non_kernel_users(text, names)
    assert len(users) == count and not any(users.values()), users


def compile_moe(m, tokens, chip="v5e:1x1"):
    mesh = tpu_aot.one_chip(chip)
    s = jax.ShapeDtypeStruct
    args = tpu_aot.placed((s((tokens, m.embed), jnp.bfloat16), s((tokens, m.experts_per_token), jnp.int32),
                           tpu_aot.expert_shapes(m)), mesh)
    return tpu_aot.compile_for(tpu_aot.moe_decode_fn(), *args)


@pytest.mark.parametrize("chip", ["v5e:1x1", "v6e:1x1"])
def test_moe_decode_step_20b_moves_no_expert_copies(chip):
    compiled = compile_moe(tpu_aot.GPT_OSS_20B, tokens=1, chip=chip)
    text = compiled.as_text()
    assert tpu_aot.kernel_calls(text) == 2  # mlp1 + SwiGLU, mlp2
    assert_read_in_place(text, EXPERT_ARRAYS, 4)
    assert tpu_aot.large_ops(text, 1 * MB) == []
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes < 1 * MB
    # The layer's experts are passed as they are stored: arguments = the TpuExperts + h + ids.
    stored = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in tpu_aot.expert_shapes(tpu_aot.GPT_OSS_20B))
    assert stored <= memory.argument_size_in_bytes < stored * 1.03  # HBM tiles pad 2880 lanes to 2944


def test_moe_prefill_20b_reads_the_experts_in_place():
    text = compile_moe(tpu_aot.GPT_OSS_20B, tokens=64).as_text()
    assert tpu_aot.kernel_calls(text) == 2
    assert_read_in_place(text, EXPERT_ARRAYS, 4)


def test_moe_120b_under_shard_map_on_a_4x2_mesh():
    """gpt-oss-120b's experts split over a v5e-8 as 4 (experts) x 2 (hidden units): each chip
    runs the kernels on its 32 experts inside sharded_expert_mix's shard_map (check_vma on)."""
    m = tpu_aot.GPT_OSS_120B
    mesh = mesh_lib.make_mesh("4x2", devices=tpu_aot.topology("v5e:2x4").devices)
    shapes = tpu_aot.expert_shapes(m, hidden_shards=2)
    params = ShardedTpuExperts(*(jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rules.named_sharding(a, s.shape, mesh))
                                 for s, a in zip(shapes, moe_tpu.TPU_EXPERT_AXES)))
    s, replicated = jax.ShapeDtypeStruct, NamedSharding(mesh, PartitionSpec())
    tokens = [s((1, m.embed), jnp.bfloat16, sharding=replicated), s((1, 4), jnp.int32, sharding=replicated),
              s((1, 4), jnp.bfloat16, sharding=replicated)]
    mix = tpu_aot.moe_decode_fn()

    def expert_mix(h, experts, weights, w):
        y = mix(h, experts, moe_tpu.TpuExperts(*w))
        return jnp.einsum("nko,nk->no", y, weights, preferred_element_type=jnp.float32)

    def step(h, experts, weights, params):
        return sharded_expert_mix(mesh, expert_mix, h, experts, weights, params,
                                  ShardedTpuExperts(*moe_tpu.TPU_EXPERT_AXES))

    compiled = tpu_aot.compile_for(step, *tokens, params)
    text = compiled.as_text()
    assert tpu_aot.kernel_calls(text) == 2
    assert_read_in_place(text, EXPERT_ARRAYS, 4)
    assert tpu_aot.large_ops(text, 1 * MB) == []
    # Each chip holds a quarter of the experts and half of their hidden units.
    stored = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in shapes)
    assert compiled.memory_analysis().argument_size_in_bytes < stored / 8 * 1.07


class ShardedTpuExperts(moe_tpu.TpuExperts):
    """sharding/moe.py counts a device's experts on `mlp1_fp4`; TpuExperts names it mlp1_bytes."""

    @property
    def mlp1_fp4(self):
        return self.mlp1_bytes


@pytest.mark.parametrize("chip, slots, window", [("v5e:1x1", 4096, None), ("v5e:1x1", 128, 128),
                                                 ("v5e:1x1", 131072, None), ("v6e:1x1", 4096, None)])
def test_decode_attention_reads_the_cache_in_place(chip, slots, window):
    m = tpu_aot.GPT_OSS_20B
    args = tpu_aot.placed(tpu_aot.attention_shapes(m, batch=1, slots=slots), tpu_aot.one_chip(chip))
    compiled = tpu_aot.compile_for(tpu_aot.attention_fn(window), *args)
    text = compiled.as_text()
    assert tpu_aot.kernel_calls(text) == 1
    assert_read_in_place(text, ("cache_k", "cache_v"), 2)
    # No copy or transpose of the cache: the kernel's [b, kv, hd, slots] view is a bitcast.
    cache_bytes = slots * m.kv_heads * m.head_dim * 2
    assert tpu_aot.large_ops(text, min(cache_bytes, 64 * 1024)) == []
    assert compiled.memory_analysis().temp_size_in_bytes < 1 * MB


# ------------------------------------------------------------------- whole programs
GiB = 2**30
PLANS = {
    "20b-v5e-1": ["--model", "gpt-oss-20b", "--target", "v5e-1", "--context", "8192"],
    "120b-v5e-8-4x2": ["--model", "gpt-oss-120b", "--target", "v5e-8", "--mesh", "4x2", "--context", "32768"],
}


@pytest.fixture(scope="module", params=list(PLANS))
def planned(request):
    """`python -m gptoss_jax.plan` on two layers of the real width: (exit status, what it
    printed, the Plan it printed)."""
    capture = pytest.MonkeyPatch()
    made = []
    real = plan.plan
    capture.setattr(plan, "plan", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = plan.main([*PLANS[request.param], "--layers", "2", "--prompt", "64"])
    capture.undo()
    return status, out.getvalue(), made[0]


def test_plan_command_reports_the_compiled_programs(planned):
    status, printed, result = planned
    assert status == 0 and result.compiled and result.fits
    assert "moe_tpu, decode_attention_tpu" in printed and "fits" in printed and "not measured on a TPU" in printed
    assert result.decode.kernel_calls == 2 * (2 + 1)  # per layer: mlp1 + SwiGLU, mlp2, decode attention
    assert result.available == 15.75 * GiB


def test_experts_are_read_by_the_kernels_alone(planned):
    """No op outside a kernel reads (so none copies, converts or transposes) a layer's
    stored experts, in the decode step or in prefill."""
    _, _, result = planned
    for program in (result.decode, result.prefill):
        assert_read_in_place(program.hlo, EXPERT_ARRAYS, 2 * 4)


def test_decode_step_moves_about_the_bytes_it_must(planned):
    _, _, result = planned
    assert result.decode_bytes <= 1.25 * result.bound_bytes
    assert result.decode.kernel_bytes > 0


@pytest.mark.parametrize("name, want", [("v5e-1", 15.75), ("v6e-1", 31.25), ("v5p-8", 95.74), ("v4-8", 30.75)])
def test_available_hbm_as_the_compiler_states_it(name, want):
    assert plan.available_hbm(plan.target_named(name)) == want * GiB


def compiled_text(fn, *args, donate=()):
    return jax.jit(fn, donate_argnums=donate).lower(*tpu_aot.placed(args, tpu_aot.one_chip())).compile()


def test_hbm_traffic_of_plain_programs():
    """The walk over the compiled HLO against what the programs must move: an elementwise
    op too large for VMEM reads and writes its array, an in-place row update moves the row,
    a row lookup reads the row."""
    s = jax.ShapeDtypeStruct
    big = s((16384, 8192), jnp.float32)  # 512 MiB
    compiled = compiled_text(lambda x: x * 2, big)
    traffic = tpu_aot.hbm_traffic(compiled.as_text())
    assert traffic == {"kernels": 0.0, "xla": 2 * 512 * 2**20}
    cost = compiled.cost_analysis()
    assert traffic["xla"] == (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]
    row = s((1, 8192), jnp.float32)
    update = compiled_text(lambda x, r, i: jax.lax.dynamic_update_slice(x, r, (i, 0)), big, row, s((), jnp.int32),
                           donate=(0,))
    assert tpu_aot.hbm_traffic(update.as_text())["xla"] <= 3 * 8192 * 4
    lookup = compiled_text(lambda x, i: x[i], big, s((), jnp.int32))
    assert tpu_aot.hbm_traffic(lookup.as_text())["xla"] <= 3 * 8192 * 4


def test_programs_larger_than_the_chip_are_reported_as_not_fitting():
    """The compiler refuses a program larger than the chip's HBM and says what it needs;
    the plan reports that instead of failing (the tiny model, 256 sequences of 131072 slots)."""
    result = plan.plan("tiny", "v5e-1", batch=256, context=131072, prompt=16)
    assert not result.fits
    for program in (result.prefill, result.decode):
        assert program.needed > 15.75 * GiB
    report = result.report()
    assert report.count("does NOT fit: the compiler needs") == 2 and "GiB over" in report


def test_a_layer_of_experts_dequantizes_without_integer_temporaries():
    """The XLA expert path (training, adapters) dequantizes a whole layer's experts. On a TPU
    a minor axis of 32 pads to 128 lanes, and table lookups do not fuse: laid out as
    [..., blocks, 32] with gathers, gpt-oss-20b's mlp1 took 8.44 GiB per int32 temporary and a
    LoRA step of two layers 25.46 GiB. Flat and arithmetic, it is one fusion into the output."""
    mesh = tpu_aot.one_chip("v5e:1x1")
    s = jax.ShapeDtypeStruct
    fp4, scales = tpu_aot.placed((s((32, 5760, 90, 32), jnp.float4_e2m1fn), s((32, 5760, 90), jnp.float8_e8m0fnu)),
                                 mesh)
    compiled = jax.jit(mxfp4.dequantize).lower(fp4, scales).compile()
    memory = compiled.memory_analysis()
    assert memory.output_size_in_bytes == 32 * 5760 * 2880 * 2
    assert memory.temp_size_in_bytes < 64 * MB, memory


def test_the_embedding_is_placed_for_row_lookups():
    """XLA:TPU's default layout for gpt-oss's [201088, 2880] embedding puts the vocabulary on
    the lanes, and a lookup of a prompt's rows then copies the whole table first (1.10 GiB of
    temporaries); placed as sharding.placement.param_placement says, the lookup reads the rows
    where they lie. The unembedding keeps the default layout, which its GEMM reads as it is."""
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.model import abstract_model
    from gptoss_jax.sharding.placement import param_placement

    mesh = tpu_aot.one_chip("v5e:1x1")
    sharding = NamedSharding(mesh, PartitionSpec())
    _, leaves = abstract_model(GptOssConfig.preset("gpt-oss-20b"), jnp.bfloat16)
    leaves = dict(leaves)
    tokens = jax.ShapeDtypeStruct((1024,), jnp.int32, sharding=sharding)
    table = (201088, 2880)
    for name, temporaries in (("unembedding", 1.10 * GiB), ("embedding", 0)):  # the default layout, then ours
        placement = param_placement(leaves[(name,)], sharding)
        compiled = jax.jit(lambda t, i: t[i]).lower(jax.ShapeDtypeStruct(table, jnp.bfloat16, sharding=placement),
                                                    tokens).compile()
        assert compiled.memory_analysis().temp_size_in_bytes == pytest.approx(temporaries, abs=0.01 * GiB), name


def test_planned_programs_receive_the_embedding_row_major(planned):
    _, _, result = planned
    for program in (result.decode, result.prefill):
        entry = [line for line in program.hlo.splitlines() if "embedding\\'].value" in line and "parameter(" in line]
        layouts = {("un" if "unembedding" in line else "") + "embedding": line.split("]{")[1].split(":")[0]
                   for line in entry}
        assert layouts == {"embedding": "1,0", "unembedding": "0,1"}  # minor-to-major: 1,0 is row-major
