"""Expert and tensor parallelism: every mesh gives the single-device model's results.

Runs on the default devices: 8 host devices on CPU (tests/conftest.py provisions them), or
the accelerators of the machine; meshes needing more devices than there are are skipped.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import gptoss_jax.sharding.moe as moe_sharding
from gptoss_jax.config import GptOssConfig
from gptoss_jax.generate import generate, main
from gptoss_jax.loader import load, random_model, shard_model
from gptoss_jax.model import CACHE_AXES
from gptoss_jax.plan import planned_bytes_per_device
from gptoss_jax.sharding.memory import EXPERT_LEAVES, FP4, bytes_per_device
from gptoss_jax.sharding.mesh import MeshError, check_mesh_fits_model, make_mesh, parse_mesh_spec
from gptoss_jax.sharding.rules import partition_spec
from gptoss_jax.testing import write_random_checkpoint

# 8 experts, 8 query heads, 2 KV heads (split 2 ways, replicated on 4- and 8-way model
# axes), 8 MXFP4 blocks of expert hidden units: every mesh of 8 devices fits.
CONFIG = GptOssConfig.preset("tiny").replace(
    name="mesh-test", num_hidden_layers=2, vocab_size=512, hidden_size=64, intermediate_size=256, head_dim=16,
    num_attention_heads=8, num_key_value_heads=2, num_experts=8, experts_per_token=4, sliding_window=8)
SEED = 5
# The meshes of the issue on 8 devices (8 host devices on CPU); on a machine with fewer
# devices (2 GPUs, say), the meshes that fit it.
DEVICES = len(jax.devices())
MESHES = (["1x1", "8x1", "4x2", "2x4", "1x8", "2x2x2"] if DEVICES >= 8 else
          [s for s in ("1x1", "2x1", "1x2", "4x1", "2x2", "1x4") if parse_mesh_spec(s).size <= DEVICES])


def mesh_of(spec: str, devices=None):
    devices = jax.devices() if devices is None else devices
    size = parse_mesh_spec(spec).size
    if size > len(devices):
        pytest.skip(f"mesh {spec} needs {size} devices; this machine has {len(devices)}")
    return make_mesh(spec, devices[:size])


@pytest.fixture(scope="module")
def single():
    return random_model(CONFIG, dtype=jnp.float32, seed=SEED, expert_scale_shift=1)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def tokens_of(shape, seed):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, shape).astype(np.int32)


def prompt_of(length, seed):
    return [int(t) for t in tokens_of((length,), seed)]


# Decode-sized batches use the replicated strategy, prefill-sized ones the all-to-all.
SHORT, LONG = (2, 8), (4, 72)
PROMPTS = [prompt_of(3, 1), prompt_of(11, 2), prompt_of(6, 3)]


@pytest.fixture(scope="module")
def single_results(single):
    return {"short": np.asarray(forward(single, tokens_of(SHORT, 0))),
            "long": np.asarray(forward(single, tokens_of(LONG, 1))),
            "greedy": generate(single, PROMPTS, max_new_tokens=12, temperature=0, stop_tokens=[])}


@pytest.mark.parametrize("spec", MESHES)
def test_mesh_matches_single_device(spec, single, single_results, monkeypatch):
    mesh = mesh_of(spec)
    model = shard_model(single, mesh)
    used = []
    for name in ("_replicated", "_all_to_all"):
        body = getattr(moe_sharding, name)
        monkeypatch.setattr(moe_sharding, name, lambda *a, _body=body, _name=name: used.append(_name) or _body(*a))

    short = forward(model, tokens_of(SHORT, 0))
    assert set(used) == {"_replicated"}
    used.clear()
    long = forward(model, tokens_of(LONG, 1))
    assert set(used) == ({"_all_to_all"} if mesh.shape["expert"] > 1 else {"_replicated"})
    for name, got in (("short", short), ("long", long)):
        rel = relative_error(got, single_results[name])
        print(f"mesh {spec} {name}: max|mesh - single| / max|single| = {rel:.1e}")
        assert rel <= 1e-5

    got = generate(model, PROMPTS, max_new_tokens=12, temperature=0, stop_tokens=[])
    assert got == single_results["greedy"]


@pytest.mark.parametrize("spec, n_tokens, skew", [("4x2", 40, True), ("4x2", 40, False), ("2x2x2", 13, False),
                                                   ("8x1", 21, True), ("2x1", 9, True)])
def test_both_strategies_are_dropless(spec, n_tokens, skew, single):
    """Both strategies give the single-device expert output, also when every token picks
    experts 0..k-1 (all pairs on the first devices of the expert axis: the worst load a
    dropless dispatch must carry), and for token counts the axes do not divide."""
    mesh = mesh_of(spec)
    model = shard_model(single, mesh)
    rng = np.random.default_rng(n_tokens)
    h = rng.normal(size=(n_tokens, CONFIG.hidden_size)).astype(np.float32)
    k, e = CONFIG.experts_per_token, CONFIG.num_experts
    if skew:
        experts = np.tile(np.arange(k), (n_tokens, 1))
    else:
        experts = np.stack([rng.permutation(e)[:k] for _ in range(n_tokens)])
    weights = jax.nn.softmax(rng.normal(size=(n_tokens, k)).astype(np.float32), axis=-1)
    oracle_moe = single.blocks[1].mlp
    want = oracle_moe.expert_mix(jnp.asarray(h), jnp.asarray(experts), weights, oracle_moe.expert_weights())
    moe = model.blocks[1].mlp
    for strategy in ("replicated", "all_to_all"):
        run = jax.jit(lambda h, x, w, p, s=strategy: moe_sharding.sharded_expert_mix(
            mesh, moe.expert_mix, h, x, w, p, moe.expert_axes(), strategy=s))
        got = run(h, experts.astype(np.int32), weights, moe.expert_weights())
        assert relative_error(got, want) <= 1e-5, strategy


@pytest.mark.parametrize("spec, n_tokens", [("2x1", 1), ("2x1", 24), ("4x2", 24), ("2x2x2", 30)])
def test_both_strategies_have_the_single_device_gradients(spec, n_tokens, single):
    """The gradients of the expert output with respect to the tokens, the routing weights
    and the expert biases (what fine-tuning differentiates) are the single-device ones for
    both strategies, for a decode-sized batch (the gathered expert path) and larger ones
    (the grouped path, where each device of the expert axis sorts its own pairs)."""
    mesh = mesh_of(spec)
    model = shard_model(single, mesh)
    rng = np.random.default_rng(n_tokens)
    k, e = CONFIG.experts_per_token, CONFIG.num_experts
    h = rng.normal(size=(n_tokens, CONFIG.hidden_size)).astype(np.float32)
    experts = np.stack([rng.permutation(e)[:k] for _ in range(n_tokens)]).astype(np.int32)
    weights = jax.nn.softmax(rng.normal(size=(n_tokens, k)).astype(np.float32), axis=-1)
    cotangent = rng.normal(size=h.shape).astype(np.float32)

    def gradients(moe, mix):
        def loss(h, weights, biases):
            params = moe.expert_weights()._replace(mlp1_bias=biases[0], mlp2_bias=biases[1])
            return jnp.sum(mix(h, experts, weights, params) * cotangent)

        biases = (moe.mlp1_bias[...], moe.mlp2_bias[...])
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(h, weights, biases)

    oracle_moe = single.blocks[1].mlp
    want = gradients(oracle_moe, oracle_moe.expert_mix)
    moe = model.blocks[1].mlp
    for strategy in ("replicated", "all_to_all"):
        got = gradients(moe, lambda h, x, w, p, s=strategy: moe_sharding.sharded_expert_mix(
            mesh, moe.expert_mix, h, x, w, p, moe.expert_axes(), strategy=s))
        for name, g, w in zip(("tokens", "weights", "mlp1_bias", "mlp2_bias"), jax.tree.leaves(got),
                              jax.tree.leaves(want)):
            assert relative_error(g, w) <= 1e-5, (strategy, name, relative_error(g, w))


def expert_leaves(model):
    return [getattr(block.mlp, name)[...] for block in model.blocks for name in EXPERT_LEAVES]


@pytest.mark.parametrize("spec", ["2x1", "8x1", "4x2", "2x4", "1x8", "2x2x2"])
def test_expert_bytes_per_device(spec, single):
    mesh = mesh_of(spec)
    model = shard_model(single, mesh)
    a, b = mesh.shape["expert"], mesh.shape["model"]
    total = sum(bytes_per_device(single, experts_only=True).values())
    # FP4 counts as half a byte (nbytes, one byte per FP4 value on CPU and GPU, over-counts).
    assert total == sum(x.size / 2 if x.dtype == FP4 else x.nbytes for x in expert_leaves(single))
    assert total < sum(x.nbytes for x in expert_leaves(single))
    per_device = bytes_per_device(model, experts_only=True)
    assert len(per_device) == mesh.size
    if b == 1:
        assert all(v == total / a for v in per_device.values())  # 1/A under A-way expert parallelism
    else:
        # The model axis splits the FP4 values, scales and mlp1 biases further; only the
        # small mlp2 biases (one per output, not per hidden unit) stay whole.
        mlp2_bias = sum(x.nbytes for x in expert_leaves(single) if x.ndim == 2 and x.shape[1] == CONFIG.hidden_size)
        assert all(v == (total - mlp2_bias) / (a * b) + mlp2_bias / a for v in per_device.values())
    planned = planned_bytes_per_device(CONFIG, spec, "float32")
    assert set(per_device.values()) == {planned["experts"]}
    assert set(bytes_per_device(model).values()) == {planned["total"]}


def test_random_weights_are_created_on_their_devices(single):
    """random_model on a mesh makes each shard on its device, with the single-device values."""
    mesh = mesh_of("4x2")
    model = random_model(CONFIG, mesh=mesh, dtype=jnp.float32, seed=SEED, expert_scale_shift=1)
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(single))):
        np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(want[...]), err_msg=str(path))
    mlp = model.blocks[0].mlp
    assert mlp.mlp1_fp4[...].sharding.spec == P("expert", "model")  # canonical: no trailing Nones
    assert mlp.mlp2_fp4[...].sharding.spec == P("expert", None, "model")
    shard = mlp.mlp1_fp4[...].addressable_shards[0]
    assert shard.data.shape == (CONFIG.num_experts // 4, 2 * CONFIG.intermediate_size // 2,
                                CONFIG.hidden_size // 32, 32)
    attn = model.blocks[0].attn
    assert attn.wq[...].sharding.spec == P("model")
    assert attn.wk[...].sharding.spec == P("model")  # 2 KV heads split 2 ways
    assert model.embedding[...].sharding.spec == P("model")


def test_kv_heads_fewer_than_the_model_axis_are_replicated():
    wide = mesh_of("2x4")
    notes = check_mesh_fits_model(CONFIG, wide)
    assert any("2 KV heads" in n and "replicated" in n for n in notes)
    assert partition_spec(("kv_heads", "head_dim", "embed"), (2, 16, 64), wide) == P(None, None, None)
    assert partition_spec(CACHE_AXES.k, (4, 32, 2, 16), wide) == P(None, None, None, None)  # data axis of 1
    data = mesh_of("2x2x2")
    assert partition_spec(CACHE_AXES.k, (4, 32, 2, 16), data) == P("data", None, "model", None)


@pytest.mark.parametrize("text", ["4", "4x", "x2", "0x8", "4x2x1x1", "axb", "-2x4", "4*2"])
def test_malformed_mesh_specs_are_rejected(text):
    with pytest.raises(MeshError, match="not a mesh spec; use AxB"):
        parse_mesh_spec(text)


def test_mesh_spec_axes():
    assert parse_mesh_spec("4x2").shape == (1, 4, 2)
    assert parse_mesh_spec("2x2x2").shape == (2, 2, 2)
    assert str(parse_mesh_spec(" 8X1 ")) == "8x1"


@pytest.mark.parametrize("config_changes, spec, message", [
    (dict(num_experts=6), "4x2", "the expert axis must divide the 6 experts; use an expert axis in 1, 2, 3, 6"),
    (dict(num_attention_heads=6, num_key_value_heads=2), "2x4", "must divide the 6 attention heads"),
    (dict(intermediate_size=96), "2x4", "must divide the experts' 3 MXFP4 blocks of hidden units"),
])
def test_meshes_that_do_not_fit_the_model_are_rejected(config_changes, spec, message):
    config = CONFIG.replace(**config_changes)
    with pytest.raises(MeshError, match=message):
        check_mesh_fits_model(config, parse_mesh_spec(spec))
    devices = jax.devices()
    if len(devices) >= parse_mesh_spec(spec).size:
        with pytest.raises(MeshError, match=message):
            random_model(config, mesh=make_mesh(spec, devices[:parse_mesh_spec(spec).size]))


def test_120b_fits_a_v5e_8_under_4x2():
    config = GptOssConfig.preset("gpt-oss-120b")
    assert check_mesh_fits_model(config, parse_mesh_spec("4x2")) == []
    with pytest.raises(MeshError, match="90 MXFP4 blocks"):
        check_mesh_fits_model(config, parse_mesh_spec("2x4"))
    planned = planned_bytes_per_device(config, "4x2")
    whole = planned_bytes_per_device(config, "1x1")
    assert planned["experts"] == pytest.approx(whole["experts"] / 8, rel=1e-3)  # mlp2 biases split 4 ways only
    assert planned["total"] < 10 * 2**30  # of a v5e chip's 16 GB


def test_explicit_mesh_axes_are_rejected():
    mesh = jax.make_mesh((1, 1, 1), ("data", "expert", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 3,
                         devices=jax.devices()[:1])
    with pytest.raises(MeshError, match="not AxisType.Auto .* gptoss_jax.sharding.make_mesh"):
        random_model(CONFIG, mesh=mesh)


def test_mesh_larger_than_the_devices_is_rejected():
    n = len(jax.devices())
    with pytest.raises(MeshError, match=f"needs {2 * n} devices .* but {n} "):
        make_mesh(f"{2 * n}x1")


def run_main(capsys, *args):
    code = main([*args, "--no-compilation-cache", "--max-new-tokens", "2"])
    return code, capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--mesh", "4x"], "error: --mesh '4x' is not a mesh spec; use AxB"),
    (["--mesh", "4x8x2", "--checkpoint", "tiny"], "error: --mesh 4x8x2 needs 64 devices"),
    (["--num-processes", "2"], "--coordinator HOST:PORT, --num-processes N and --process-id I together"),
    (["--mesh", "2x1", "--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "--coordinator 'localhost' is not HOST:PORT; give the port too, e.g. localhost:1234"),
    (["--mesh", "2x1", "--coordinator", "host:http", "--num-processes", "2", "--process-id", "0"],
     "--coordinator 'host:http' is not HOST:PORT"),
    (["--mesh", "2x1", "--coordinator", "host:70000", "--num-processes", "2", "--process-id", "0"],
     "port must be in 1..65535"),
])
def test_cli_rejects_bad_meshes_in_one_line(capsys, args, message):
    code, out = run_main(capsys, *args)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error") and message in lines[0], out.err


def test_cli_rejects_a_mesh_the_model_cannot_use(capsys):
    if len(jax.devices()) < 8:
        pytest.skip(f"needs 8 devices; this machine has {len(jax.devices())}")
    code, out = run_main(capsys, "--mesh", "1x8")  # the built-in model: 4 attention heads, 2 blocks of hidden units
    assert code == 2
    assert out.err.strip().splitlines()[-1].startswith("error: mesh 1x8 (expert 1 x model 8) for model 'builtin'")


def test_help_documents_the_mesh(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--mesh AxB|DxAxB" in text and "expert parallelism" in text and "TPU v5e-8" in text


# ----------------------------------------------------------------------- multi-process
CLI_CONFIG = GptOssConfig.preset("tiny").replace(name="mp-test", num_hidden_layers=2, intermediate_size=128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """Two processes of 4 host devices each, joined by jax.distributed on localhost, load a
    checkpoint onto one 4x2 mesh and generate what one process with 8 devices does."""
    cpus = jax.devices("cpu")
    if len(cpus) < 8:
        pytest.skip(f"needs 8 host devices for the one-process reference; this process has {len(cpus)}")
    root = write_random_checkpoint(tmp_path / "ckpt", CLI_CONFIG, "hf", seed=9)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    port = free_port()
    common = ["--checkpoint", str(root), "--mesh", "4x2", "--coordinator", f"localhost:{port}", "--num-processes",
              "2", "--raw", "--json", "--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32",
              "--no-compilation-cache", "--prompt", "The sky is", "--prompt", "1 2 3 4 5 6 7"]
    procs = [subprocess.Popen([sys.executable, "-m", "gptoss_jax.generate", *common, "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    (out0, err0), (out1, err1) = outputs
    assert out1 == "" and err1 == ""  # only process 0 prints
    assert "runs on 8 host (CPU) devices (4 in this process)" in err0
    assert all(line.startswith("note: ") for line in err0.splitlines()), err0  # no connection chatter
    records = [json.loads(line) for line in out0.splitlines()]
    assert len(records) == 2

    from gptoss_jax.tokenizer import ENDOFTEXT

    model = load(root, mesh=make_mesh("4x2", cpus[:8]), dtype="float32")
    reference = generate(model, [r["prompt_tokens"] for r in records], max_new_tokens=6, temperature=0,
                         stop_tokens=[ENDOFTEXT])
    assert [r["tokens"] for r in records] == reference


def takes_grouped_expert_path(model, tokens: int) -> bool:
    """Whether a step of `tokens` tokens runs MoE.experts_grouped (the only user of ragged_dot)
    rather than experts_gathered, read from the traced program."""
    caches = model.init_cache(1, 32)
    step = jax.make_jaxpr(model.extend)(jnp.zeros((1, tokens), jnp.int32), jnp.arange(tokens)[None], caches)
    return "ragged_dot" in str(step)


@pytest.mark.parametrize("spec", ["2x1", "8x1"])
def test_a_share_of_the_experts_takes_the_whole_models_expert_path(spec):
    """The expert path is chosen by the model's expert count, not the device's share: a decode
    step (n * k < experts) gathers the routed experts on every mesh, as on one device, and a
    prompt groups them. (On the CPU this makes expert-parallel bf16 decoding token-identical;
    GPUs reduce in other orders.)"""
    for model in (load("tiny"), load("tiny", mesh=mesh_of(spec))):
        assert not takes_grouped_expert_path(model, 1)
        assert takes_grouped_expert_path(model, 16)


@pytest.mark.parametrize("spec", ["2x1", "1x2", "2x2x2"])
def test_decode_loop_compiles_once_on_a_mesh(spec):
    from gptoss_jax.engine import decode_chunk

    model = load("tiny", mesh=mesh_of(spec))
    decode_chunk.clear_cache()
    generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20, temperature=0, stop_tokens=[], chunk=4)
    assert decode_chunk._cache_size() == 1  # the state comes back with the shardings it went in with


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_process_that_never_joins_is_reported_in_bounded_time(process_id):
    """Process 0 waits for the others, the others for process 0: when one never comes,
    each says what to check after --join-timeout seconds, in one line."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    address = f"localhost:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "gptoss_jax.generate", "--mesh", "2x1", "--coordinator", address,
                             "--num-processes", "2", "--process-id", str(process_id), "--join-timeout", "3",
                             "--no-compilation-cache"], capture_output=True, text=True, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error (process {process_id}): ") and address in lines[0]
    assert "within 3 s" in lines[0] and "--num-processes 2" in lines[0]


def test_a_mesh_far_larger_than_any_host_is_refused_at_once():
    """The size checks that need only the spec and the model's config run before JAX
    provisions a single host device (a million of them take minutes and gigabytes)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    for spec, message in [("1000x1000", "mesh 1000x1000 (expert 1000 x model 1000) for model 'builtin'"),
                          ("1000000x1x1", "--mesh 1000000x1x1 needs 1000000 devices in one process")]:
        result = subprocess.run([sys.executable, "-m", "gptoss_jax.generate", "--mesh", spec], capture_output=True,
                                text=True, env=env, timeout=60)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_the_embedding_alone_is_placed_row_major_and_only_on_tpus(single):
    """sharding.placement.param_placement: the token embedding (read a row per token) gets a
    row-major layout on TPU devices; every other parameter, and every parameter on other
    platforms, keeps its sharding as it is (tests/test_tpu_aot.py compiles the TPU case)."""
    from gptoss_jax.sharding.placement import param_placement

    leaves = dict(nnx.to_flat_state(nnx.state(single)))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert param_placement(leaves[("embedding",)], cpu) is cpu
    assert [path for path, var in leaves.items() if var.get_metadata().get("row_lookup")] == [("embedding",)]
    assert single.embedding[...].format.layout.major_to_minor == (0, 1)  # CPU arrays are row-major anyway
