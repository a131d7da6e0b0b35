import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_bit_identical, hf_logits, rewrite_tensor

import gptoss_jax
from gptoss_jax import CheckpointError
from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters import convert as convert_module
from gptoss_jax.converters import destination, orbax_io
from gptoss_jax.converters.convert import Progress, main
from gptoss_jax.converters.layouts import HF_INDEX, Checkpoint
from gptoss_jax.converters.safetensors_io import SafetensorsFile
from gptoss_jax.loader import random_model
from gptoss_jax.testing import write_random_checkpoint

SMALL = GptOssConfig.preset("tiny").replace(name="small", vocab_size=256, num_hidden_layers=2)
SEED = 5
REPO = Path(__file__).resolve().parents[1]


def tensors(root: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint folder, as stored."""
    out = {}
    for path in sorted(root.glob("*.safetensors")):
        f = SafetensorsFile(path)
        out.update({name: np.array(f.get(name)) for name in f.names()})
    return out


def run(argv, capsys):
    code = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(dst: Path) -> list[Path]:
    return [p for p in dst.parent.iterdir() if p.name.startswith(dst.name)]


def assert_refused(code, err, dst: Path, *needles):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert leftovers(dst) == [], leftovers(dst)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    hf = write_random_checkpoint(base / "hf", SMALL, "hf", seed=SEED, max_shard_bytes=50_000)
    write_random_checkpoint(base / "orig", SMALL, "original", seed=SEED)
    for name in ("tokenizer_config.json", "generation_config.json"):  # extras of a real HF download
        (hf / name).write_text(json.dumps({"file": name}))
    return {"hf": hf, "original": base / "orig"}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    base = tmp_path_factory.mktemp("converted")
    out = {}
    for layout, src in sources.items():
        assert main([str(src), str(base / layout), "--no-progress"]) == 0
        out[layout] = base / layout
    return out


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_round_trip_restores_the_source_bit_for_bit(layout, sources, converted):
    dst = converted[layout]
    marker = json.loads((dst / orbax_io.MARKER).read_text())
    assert marker["format"] == orbax_io.FORMAT and marker["format_version"] == orbax_io.FORMAT_VERSION
    assert marker["source"]["layout"] == layout and marker["tokenizer"]["encoding"] == "o200k_harmony"
    assert GptOssConfig.from_json(dst / "config.json") == SMALL.replace(name=sources[layout].name)
    model = gptoss_jax.load(dst)
    assert_bit_identical(model, gptoss_jax.load(sources[layout]))
    assert_bit_identical(model, random_model(SMALL, seed=SEED))
    tokens = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 24)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(gptoss_jax.load(dst, dtype="float32")(tokens)),
                                  np.asarray(gptoss_jax.load(sources[layout], dtype="float32")(tokens)))


def test_converted_checkpoint_stores_checkpoint_bytes(converted, sources):
    checkpoint = orbax_io.ConvertedCheckpoint(converted["hf"])
    stored = checkpoint.leaves[("blocks", 1, "mlp", "mlp1_fp4")]
    assert stored.dtype == np.uint8 and stored.shape[-1] == 16
    assert checkpoint.leaves[("blocks", 1, "mlp", "mlp1_scales")].dtype == ml_dtypes.float8_e8m0fnu
    assert checkpoint.leaves[("embedding",)].dtype == ml_dtypes.bfloat16
    source = tensors(sources["hf"])
    host = checkpoint.read_host([stored.path])[stored.path]
    np.testing.assert_array_equal(host, source["model.layers.1.mlp.experts.gate_up_proj_blocks"])
    # A converted HF source keeps its config and tokenizer files for the way back.
    assert (converted["hf"] / "source" / "config.json").read_bytes() == (sources["hf"] / "config.json").read_bytes()
    assert (converted["hf"] / "source" / "tokenizer_config.json").is_file()


def test_export_reproduces_an_hf_source_byte_for_byte_and_loads_in_transformers(sources, converted, tmp_path,
                                                                                  capsys):
    dst = tmp_path / "back"
    code, out, err = run([converted["hf"], dst, "--to", "hf"], capsys)
    assert code == 0, err
    assert f"wrote {dst}" in out
    original, exported = tensors(sources["hf"]), tensors(dst)
    assert original.keys() == exported.keys()
    for name in original:
        assert original[name].dtype == exported[name].dtype and original[name].shape == exported[name].shape, name
        assert original[name].tobytes() == exported[name].tobytes(), name
    index = json.loads((dst / HF_INDEX).read_text())
    assert set(index["weight_map"]) == set(original)
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (sources["hf"] / name).read_bytes(), name

    import torch

    tokens = np.random.default_rng(1).integers(0, SMALL.vocab_size, (2, 40)).astype(np.int32)
    ref = hf_logits(dst, tokens, torch.float32)
    ours = np.asarray(gptoss_jax.load(converted["hf"], dtype="float32")(tokens))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, rel


def test_export_of_an_original_source_matches_the_hf_writer(converted, tmp_path, capsys):
    code, _, err = run([converted["original"], tmp_path / "back", "--to", "hf"], capsys)
    assert code == 0, err
    reference = write_random_checkpoint(tmp_path / "reference", SMALL, "hf", seed=SEED)
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "back").iterdir())
    for name in names:  # same shards, index, config: identical files
        assert (reference / name).read_bytes() == (tmp_path / "back" / name).read_bytes(), name


def test_a_saved_model_loads_and_exports(tmp_path, capsys):
    model = random_model(SMALL, seed=7)
    orbax_io.save_model(model, tmp_path / "saved")
    assert_bit_identical(gptoss_jax.load(tmp_path / "saved"), model)
    code, _, err = run([tmp_path / "saved", tmp_path / "hf", "--to", "hf"], capsys)
    assert code == 0, err
    assert_bit_identical(gptoss_jax.load(tmp_path / "hf"), model)
    with pytest.raises(convert_module.ConversionError, match="already exists"):
        orbax_io.save_model(model, tmp_path / "saved")


def test_dry_run_and_force(sources, tmp_path, capsys):
    dst = tmp_path / "dst"
    code, out, err = run([sources["hf"], dst, "--dry-run"], capsys)
    assert code == 0, err
    assert out.startswith("ok: ") and "hf-layout" in out and not dst.exists()
    dst.mkdir()
    (dst / "stale").write_text("x")
    code, out, err = run([sources["original"], dst, "--force"], capsys)
    assert code == 0, err
    assert not (dst / "stale").exists()
    assert_bit_identical(gptoss_jax.load(dst), random_model(SMALL, seed=SEED))
    assert [p.name for p in leftovers(dst)] == ["dst"]


def test_progress_line_shows_bytes_rate_and_eta():
    stream = io.StringIO()
    bar = Progress(4 * 2**30, stream=stream, enabled=True, interval=0)
    bar.advance(2**30, "model.embed_tokens.weight")
    bar.advance(2**30, "lm_head.weight")
    bar.close()
    text = stream.getvalue()
    assert "1.00/4.00 GiB" in text and "2.00/4.00 GiB" in text and "ETA" in text and "MB/s" in text
    assert "lm_head.weight" in text


# ------------------------------------------------------------------------------ sharded restore
MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import gptoss_jax
    from gptoss_jax.converters import orbax_io
    from gptoss_jax.sharding import make_mesh
    converted, source = sys.argv[1], sys.argv[2]
    mesh = make_mesh("1x4x2")  # data 1, expert 4, model 2
    model = gptoss_jax.load(converted, mesh=mesh)
    reference = gptoss_jax.load(source)
    meta = orbax_io._ocp().metadata(orbax_io.ConvertedCheckpoint(converted).params).metadata
    report = []
    for layer in range(len(model.blocks)):
        for name in ("mlp1_fp4", "mlp1_scales", "mlp1_bias", "mlp2_fp4", "mlp2_scales", "mlp2_bias"):
            array = getattr(model.blocks[layer].mlp, name)[...]
            full = np.asarray(getattr(reference.blocks[layer].mlp, name)[...])
            shards = []
            for shard in array.addressable_shards:
                experts = shard.index[0]
                data = np.asarray(shard.data)
                shards.append({"device": shard.device.id, "experts": [experts.start, experts.stop],
                               "equal": bool(np.array_equal(data.view(np.uint8), full[shard.index].view(np.uint8)))})
            chunk = meta["blocks"][str(layer)]["mlp"][name].storage_metadata.chunk_shape
            report.append({"name": f"{layer}/{name}", "spec": [str(a) for a in array.sharding.spec],
                           "devices": len(array.sharding.device_set), "chunk_experts": chunk[0], "shards": shards})
    print(json.dumps({"mesh": {str(k): v for k, v in mesh.shape.items()},
                      "device_ids": [[[d.id for d in row] for row in plane] for plane in mesh.devices],
                      "report": report}))
""")


def test_restore_onto_an_8_device_mesh_puts_each_expert_shard_on_its_devices(tmp_path):
    # Experts large enough (>= orbax_io.MIN_CHUNK_BYTES each) to be stored one per chunk.
    config = SMALL.replace(name="mesh", hidden_size=512, intermediate_size=512)
    source = write_random_checkpoint(tmp_path / "src", config, "hf", seed=2)
    assert main([str(source), str(tmp_path / "dst"), "--no-progress"]) == 0
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "dst"), str(source)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    device_ids = np.array(out["device_ids"])[0]  # [expert, model] for the single data row
    per_expert_group = config.num_experts // 4
    assert len(out["report"]) == 6 * config.num_hidden_layers
    for leaf in out["report"]:
        assert leaf["spec"][0] == "expert", leaf
        if leaf["name"].endswith("_fp4"):
            assert leaf["chunk_experts"] == 1, leaf  # a process reads only its experts' chunks
        assert len(leaf["shards"]) == 8 and leaf["devices"] == 8
        for shard in leaf["shards"]:
            assert shard["equal"], (leaf["name"], shard)
            start, stop = shard["experts"]
            assert stop - start == per_expert_group
            group = start // per_expert_group
            assert shard["device"] in device_ids[group], (leaf["name"], shard)  # only on its expert row


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def original_source(tmp_path):
    write_random_checkpoint(tmp_path / "src", SMALL, "original", seed=0)
    return tmp_path / "src", tmp_path / "src" / "original" / "model.safetensors"


def _drop_config_field(src):
    config = json.loads((src / "original" / "config.json").read_text())
    del config["num_attention_heads"]
    (src / "original" / "config.json").write_text(json.dumps(config))


BAD_SOURCES = {
    "truncated shard": (lambda src, f: f.write_bytes(f.read_bytes()[:-100]),
                        ["model.safetensors", "is truncated", "'unembedding.weight'"]),
    "corrupt header": (lambda src, f: f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"),
                       ["model.safetensors", "corrupt header"]),
    "missing tensor": (lambda src, f: rewrite_tensor(f, "block.0.attn.sinks", None), ["missing tensor 'block.0.attn.sinks'"]),
    "unexpected tensor": (lambda src, f: rewrite_tensor(f, "block.9.extra", np.zeros(3, np.float32)),
                          ["model.safetensors", "unexpected tensor 'block.9.extra'"]),
    "wrong shape": (lambda src, f: rewrite_tensor(f, "norm.scale", np.zeros(7, ml_dtypes.bfloat16)),
                    ["model.safetensors", "'norm.scale' has shape [7]"]),
    "blocks stored as bf16": (lambda src, f: rewrite_tensor(f, "block.1.mlp.mlp1_weight.blocks",
                                                      np.zeros((8, 128, 2, 16), ml_dtypes.bfloat16)),
                              ["model.safetensors", "'block.1.mlp.mlp1_weight.blocks' has dtype BF16, expected U8"]),
    "E8M0 scale 255": (lambda src, f: rewrite_tensor(f, "block.0.mlp.mlp2_weight.scales", np.full((8, 64, 2), 255, np.uint8)),
                       ["model.safetensors", "'block.0.mlp.mlp2_weight.scales' has E8M0 scale 255"]),
    "config missing a field": (lambda src, f: _drop_config_field(src), ["config.json", "'num_attention_heads' is missing"]),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source_is_refused_in_one_line_and_writes_nothing(case, original_source, capsys):
    src, shard = original_source
    edit, needles = BAD_SOURCES[case]
    edit(src, shard)
    dst = src.parent / "dst"
    code, _, err = run([src, dst], capsys)
    assert_refused(code, err, dst, *needles)
    code, _, err = run([src, dst, "--dry-run"], capsys)
    assert_refused(code, err, dst, *needles)


def test_index_naming_a_missing_shard(tmp_path, capsys):
    root = write_random_checkpoint(tmp_path / "src", SMALL, "hf", seed=0, max_shard_bytes=50_000)
    victim = sorted(root.glob("model-*.safetensors"))[1]
    victim.unlink()
    code, _, err = run([root, tmp_path / "dst"], capsys)
    assert_refused(code, err, tmp_path / "dst", HF_INDEX, f"names shard '{victim.name}'")


def test_sources_that_are_not_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for src, needle in ((tmp_path / "nope", "no such checkpoint directory"), (tmp_path / "empty", "not a gpt-oss"),
                        (tmp_path / "file", "not a directory")):
        code, _, err = run([src, tmp_path / "dst"], capsys)
        assert_refused(code, err, tmp_path / "dst", str(src), needle)


def test_existing_destination_needs_force(sources, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    code, _, err = run([sources["hf"], dst], capsys)
    assert code == 2 and err.startswith("error: ") and "already exists; pass --force" in err
    assert (dst / "keep").read_text() == "x" and [p.name for p in leftovers(dst)] == ["dst"]
    code, _, err = run([sources["hf"], sources["hf"] / "inside", "--force"], capsys)
    assert code == 2 and "must not be, contain or lie inside the source" in err


def test_too_little_free_space_is_refused_before_writing(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    dst = tmp_path / "dst"
    code, _, err = run([sources["hf"], dst], capsys)
    assert_refused(code, err, dst, str(dst), "GiB free; free some space")


def test_a_write_failure_mid_conversion_leaves_no_destination(sources, tmp_path, capsys, monkeypatch):
    real_save = orbax_io._ocp().partial.save
    calls = []

    def failing_save(path, state, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(path, state, **kwargs)

    monkeypatch.setattr(orbax_io, "GROUP_BYTES", 40_000)  # several groups, so the failure comes mid-way
    monkeypatch.setattr(orbax_io._ocp().partial, "save", failing_save)
    dst = tmp_path / "dst"
    code, _, err = run([sources["hf"], dst], capsys)
    assert len(calls) == 2
    assert_refused(code, err, dst, str(dst), "writing failed (No space left on device)", "blocks/")


def test_a_real_write_error_from_the_file_system_leaves_no_destination(sources, tmp_path):
    """A file-size limit makes the kernel refuse the first large write (EFBIG), inside tensorstore."""
    dst = tmp_path / "dst"
    limited = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); "
               "os.execv(sys.executable, [sys.executable, '-m', 'gptoss_jax.convert', *sys.argv[1:]])")
    result = subprocess.run([sys.executable, "-c", limited, str(sources["hf"]), str(dst)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert_refused(result.returncode, result.stderr, dst, str(dst), "writing failed (File too large)")


def test_an_interrupted_conversion_leaves_no_destination(sources, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io._ocp().partial, "finalize", interrupt)
    dst = tmp_path / "dst"
    code, _, err = run([sources["hf"], dst], capsys)
    assert code == 130 and err.startswith("error: ") and "interrupted" in err
    assert leftovers(dst) == []


def test_a_killed_conversion_leaves_no_destination(sources, tmp_path):
    dst = tmp_path / "dst"
    process = subprocess.Popen([sys.executable, "-m", "gptoss_jax.convert", str(sources["hf"]), str(dst)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith("dst.incomplete-") for p in tmp_path.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    process.kill()
    process.wait()
    assert not dst.exists()
    for temp in leftovers(dst):  # the temporary sibling is never mistaken for a checkpoint
        assert not orbax_io.is_converted(temp)
        with pytest.raises(CheckpointError):
            gptoss_jax.load(temp)


def test_bad_converted_checkpoints_are_refused(converted, tmp_path, capsys):
    dst = tmp_path / "out"
    code, _, err = run([tmp_path, dst, "--to", "hf"], capsys)
    assert_refused(code, err, dst, "not a converted gptoss-jax checkpoint")

    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted["hf"], copy)
    marker = json.loads((copy / orbax_io.MARKER).read_text())
    (copy / orbax_io.MARKER).write_text(json.dumps({**marker, "format_version": 99}))
    code, _, err = run([copy, dst, "--to", "hf"], capsys)
    assert_refused(code, err, dst, orbax_io.MARKER, "format version 99")

    (copy / orbax_io.MARKER).write_text(json.dumps(marker))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_experts": 4, "experts_per_token": 2}))
    code, _, err = run([copy, dst, "--to", "hf"], capsys)
    assert_refused(code, err, dst, "params", "has shape [8,")
    with pytest.raises(CheckpointError, match="has shape"):
        gptoss_jax.load(copy)


# ------------------------------------------------------------------------------ relative paths
def test_checkpoints_given_by_relative_paths(sources, converted, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(converted["hf"].parent)
    model = gptoss_jax.load("hf")
    assert_bit_identical(model, random_model(SMALL, seed=SEED))
    monkeypatch.chdir(converted["hf"])
    assert_bit_identical(gptoss_jax.load("."), model)
    monkeypatch.chdir(tmp_path)
    code, _, err = run([os.path.relpath(converted["hf"]), "back", "--to", "hf"], capsys)
    assert code == 0, err
    assert tensors(tmp_path / "back").keys() == tensors(sources["hf"]).keys()
    code, _, err = run([os.path.relpath(sources["original"]), "again"], capsys)
    assert code == 0, err
    assert_bit_identical(gptoss_jax.load("again"), model)
    orbax_io.save_model(model, "saved")
    assert_bit_identical(gptoss_jax.load("saved"), model)


# ------------------------------------------------------------------------------ damaged checkpoints
def largest_file(folder: Path) -> Path:
    """A converted checkpoint's largest file: one holding array data."""
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE = {"truncated": lambda f: os.truncate(f, f.stat().st_size // 2), "deleted": lambda f: f.unlink()}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_data_file_is_refused_in_one_line_by_load_and_both_clis(damage, converted, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(converted["hf"], copy)
    data = largest_file(copy / "params")
    DAMAGE[damage](data)
    with pytest.raises(CheckpointError) as info:
        gptoss_jax.load(copy)
    for needle in (str(copy), data.name, "damaged; convert the source again"):
        assert needle in str(info.value), (needle, str(info.value))
    code, _, err = run([copy, tmp_path / "out", "--to", "hf"], capsys)
    assert_refused(code, err, tmp_path / "out", str(copy), data.name, "convert the source again")
    result = subprocess.run([sys.executable, "-m", "gptoss_jax.generate", "--checkpoint", str(copy), "--prompt", "hi"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False, env=cpu_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr[-3000:]
    assert data.name in result.stderr and "convert the source again" in result.stderr


def test_damage_found_only_while_reading_names_the_parameter(converted, tmp_path, capsys):
    """A checkpoint written without the list of its data files (or damaged in a way that
    keeps file sizes) is found damaged when its arrays are read."""
    copy = tmp_path / "copy"
    shutil.copytree(converted["hf"], copy)
    marker = json.loads((copy / orbax_io.MARKER).read_text())
    marker.pop("params_file_sizes", None)
    (copy / orbax_io.MARKER).write_text(json.dumps(marker))
    data = largest_file(copy / "params")
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(CheckpointError) as info:
        gptoss_jax.load(copy)
    message = str(info.value)
    assert str(copy) in message and "damaged; convert the source again" in message, message
    assert re.search(r"parameter '(blocks/\d+/\w+/\w+|embedding|unembedding|norm/scale)'", message), message
    code, _, err = run([copy, tmp_path / "out", "--to", "hf"], capsys)
    assert_refused(code, err, tmp_path / "out", str(copy), "parameter '", "convert the source again")


def test_unreadable_parameter_metadata_is_reported_as_damage(converted, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(converted["hf"], copy)
    for node in (copy / "params" / "state" / "d").iterdir():  # the b-tree nodes that index the arrays
        node.write_bytes(bytes(node.stat().st_size))
    with pytest.raises(CheckpointError, match="damaged; convert the source again") as info:
        gptoss_jax.load(copy)
    assert str(copy) in str(info.value)
    code, _, err = run([copy, tmp_path / "out", "--to", "hf"], capsys)
    assert_refused(code, err, tmp_path / "out", str(copy), "damaged; convert the source again")


# ------------------------------------------------------------------------------ messages
NOT_UTF8 = b"\xff\xfe{\"not\": \"utf-8 \x80\"}"


@pytest.mark.parametrize("layout, name", [("hf", "config.json"), ("hf", HF_INDEX), ("original", "original/config.json")])
def test_a_source_file_that_is_not_utf8_is_named(layout, name, sources, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(sources[layout], src)
    (src / name).write_bytes(NOT_UTF8)
    code, _, err = run([src, tmp_path / "dst"], capsys)
    assert_refused(code, err, tmp_path / "dst", str(src / name), "UTF-8")


@pytest.mark.parametrize("name", ["config.json", orbax_io.MARKER, "source/config.json"])
def test_a_converted_file_that_is_not_utf8_is_named(name, converted, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(converted["hf"], copy)
    (copy / name).write_bytes(NOT_UTF8)
    code, _, err = run([copy, tmp_path / "dst", "--to", "hf"], capsys)
    assert_refused(code, err, tmp_path / "dst", str(copy / name), "UTF-8")


def test_the_free_space_message_counts_the_margin_it_asks_for(sources, tmp_path, capsys, monkeypatch):
    data = convert_module.source_bytes(Checkpoint(sources["hf"]))
    free = data + destination.SPACE_MARGIN // 2  # room for the data, not for the margin
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda path: type("U", (), {"free": free})())
    dst = tmp_path / "dst"
    code, _, err = run([sources["hf"], dst], capsys)
    assert_refused(code, err, dst, str(dst), "GiB free; free some space")
    needs, has = (float(x) for x in re.search(r"needs ([\d.]+) GiB.* has ([\d.]+) GiB free", err).groups())
    assert needs > has, err
    assert "margin" in err, err


def test_converting_a_converted_checkpoint_suggests_the_way_back(converted, tmp_path, capsys):
    dst = tmp_path / "dst"
    code, _, err = run([converted["hf"], dst], capsys)
    assert_refused(code, err, dst, str(converted["hf"]), "already a converted", "--to hf")


def test_the_progress_bar_shows_the_finishing_phase(sources, tmp_path, capsys):
    bar_text = io.StringIO()
    bar = Progress(2**30, stream=bar_text, enabled=True, interval=0)
    bar.advance(2**30, "lm_head.weight")
    assert "finishing" in bar_text.getvalue() and "ETA 00:00:00" not in bar_text.getvalue()
    convert_module.convert(sources["hf"], tmp_path / "dst", progress=True)
    renders = capsys.readouterr().err.split("\r\033[K")
    assert "finishing" in renders[-1], renders


# ------------------------------------------------------------------------------ interruption
MEDIUM = SMALL.replace(name="medium", hidden_size=512, intermediate_size=512, num_experts=32, experts_per_token=4)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A source large enough (~26 MB) that an Orbax save takes a while."""
    base = tmp_path_factory.mktemp("medium")
    source = write_random_checkpoint(base / "src", MEDIUM, "hf", seed=1)
    assert main([str(source), str(base / "converted"), "--no-progress"]) == 0
    return {"source": source, "converted": base / "converted"}


# Runs the converter CLI with one function wrapped; on its nth call the wrapper prints
# "reached POINT" and, in plain Python code, sleeps. Inside Orbax ("saving", "opening",
# "reading") it arms a hook instead: the next array Orbax opens, in one of its worker threads,
# prints "reached POINT" and waits a second, so the test's signal lands while Orbax is at work.
INTERRUPT_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import tensorstore
    from gptoss_jax.converters import convert, layouts, orbax_io

    ocp = orbax_io._ocp()
    orbax_io.GROUP_BYTES = 8 << 20  # several Orbax saves and reads
    point, argv = sys.argv[1], sys.argv[2:]
    armed, lock = [], threading.Lock()

    def reached():
        print("reached", point, flush=True)

    def pause():
        reached()
        time.sleep(60)

    def wrap(owner, name, nth, action):
        real, calls = getattr(owner, name), []

        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == nth:
                action()
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    def open_array(*args, **kwargs):
        with lock:
            fire = bool(armed)
            armed.clear()
        if fire:
            reached()
            time.sleep(1)
        return real_open(*args, **kwargs)

    real_open, tensorstore.open = tensorstore.open, open_array
    POINTS = {  # point: (owner, function, nth call, action)
        "checking": (convert, "check_free_space", 1, pause),
        "saving": (ocp.partial, "save", 2, lambda: armed.append(1)),
        "finalizing": (ocp.partial, "finalize", 1, reached),
        "marking": (orbax_io, "write_marker", 1, pause),
        "opening": (ocp, "metadata", 1, lambda: armed.append(1)),
        "reading": (ocp, "load", 2, lambda: armed.append(1)),
        "exporting": (layouts, "write_safetensors", 1, pause),
    }
    wrap(*POINTS[point])
    sys.exit(convert.main(argv))
""")
EXPORT_POINTS = ("opening", "reading", "exporting")


def cpu_env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def finish_interrupted(process, dst: Path, sig):
    """Waits (bounded) for the signalled converter; checks its one line, exit status and
    that nothing is left beside DST."""
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, (process.returncode, err[-3000:])
    assert err.count("\n") == 1 and err.startswith("error: ") and "nothing was written" in err, err[-3000:]
    assert "Traceback" not in err
    assert leftovers(dst) == [], leftovers(dst)


@pytest.mark.parametrize("point, sig", [
    ("checking", signal.SIGINT), ("saving", signal.SIGINT), ("saving", signal.SIGTERM),
    ("finalizing", signal.SIGINT), ("marking", signal.SIGTERM),
    ("opening", signal.SIGINT), ("reading", signal.SIGINT), ("exporting", signal.SIGTERM)])
def test_a_signal_at_any_point_leaves_nothing_and_says_so_in_one_line(point, sig, medium, tmp_path):
    dst = tmp_path / "dst"
    src, to = (medium["converted"], ["--to", "hf"]) if point in EXPORT_POINTS else (medium["source"], [])
    process = subprocess.Popen([sys.executable, "-c", INTERRUPT_SCRIPT, point, str(src), str(dst), "--no-progress", *to],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env())
    watchdog = threading.Timer(300, process.kill)  # bounds the blocking read below
    watchdog.start()
    try:
        reached = process.stdout.readline()
        assert reached.strip() == f"reached {point}", (reached, process.stderr.read()[-3000:])
        process.send_signal(sig)
        finish_interrupted(process, dst, sig)
    finally:
        watchdog.cancel()
        process.kill()


def test_ctrl_c_as_soon_as_the_temporary_folder_appears(medium, tmp_path):
    dst = tmp_path / "dst"
    process = subprocess.Popen([sys.executable, "-m", "gptoss_jax.convert", str(medium["source"]), str(dst),
                                "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cpu_env())
    try:
        deadline = time.monotonic() + 120
        while not leftovers(dst):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        process.send_signal(signal.SIGINT)
        finish_interrupted(process, dst, signal.SIGINT)
    finally:
        process.kill()


def test_a_later_conversion_removes_temporary_folders_of_ended_processes(sources, tmp_path, capsys):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True).stdout.strip()
    stale = tmp_path / f"dst.incomplete-{ended}-0123abcd"
    running = tmp_path / f"dst.incomplete-{os.getpid()}-4567cdef"  # this process: still at work
    other = tmp_path / f"dst2.incomplete-{ended}-89abcdef"  # another destination's
    for folder in (stale, running, other):
        (folder / "params").mkdir(parents=True)
    code, _, err = run([sources["hf"], tmp_path / "dst"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dst", running.name, other.name])
