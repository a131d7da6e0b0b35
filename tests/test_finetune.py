"""`python -m gptoss_jax.finetune`, run in this process: training a small model from scratch on
a harmony task until it answers, LoRA with resume, export to HF transformers, and bad input
(data, hyper-parameters, a full disk during a checkpoint save)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hf_logits

import gptoss_jax
from gptoss_jax import chat_format as cf
from gptoss_jax import finetune, train
from gptoss_jax.config import GptOssConfig
from gptoss_jax.converters.convert import export_hf
from gptoss_jax.converters.safetensors_io import SafetensorsFile
from gptoss_jax.engine import generate
from gptoss_jax.testing import write_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
# Small everywhere but the vocabulary, which harmony's special tokens need whole.
SMALL = GptOssConfig.preset("tiny").replace(name="small", hidden_size=32, intermediate_size=32, num_attention_heads=2,
                                            num_key_value_heads=1, sliding_window=16, num_hidden_layers=2,
                                            num_experts=4, experts_per_token=2)
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo"}


def question(country):
    return f"What is the capital of {country}?"


def capital_record(country):
    capital = CAPITALS[country]
    return {"messages": [{"role": "user", "content": question(country)},
                         {"role": "assistant", "channel": "analysis", "content": f"The capital of {country} is {capital}."},
                         {"role": "assistant", "channel": "final", "content": capital}],
            "reasoning_effort": "low"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    config = root / "small.json"
    config.write_text(json.dumps(SMALL.to_dict()))
    data = root / "capitals.jsonl"
    data.write_text("".join(json.dumps(capital_record(c)) + "\n" for c in CAPITALS))
    return {"root": root, "config": config, "data": data}


@pytest.fixture(scope="module")
def base_checkpoint(files):
    return write_random_checkpoint(files["root"] / "base", SMALL, "hf", seed=1)


COMMON = ["--batch-size", "2", "--seq-len", "96", "--no-progress", "--no-compilation-cache"]
SCRATCH = ["--method", "full", "--warmup-steps", "10", "--learning-rate", "1e-2", *COMMON]


def run(argv, capsys):
    code = finetune.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if "loss" in json.loads(line)]


def test_a_model_trained_from_scratch_answers_after_export(files, tmp_path, capsys):
    """A few hundred steps of full training from random weights (experts as deltas over
    random FP4), the last 20 quantization-aware; the exported model, experts re-quantized
    to MXFP4, answers every question with an analysis then a final message."""
    out = tmp_path / "scratch"
    code, stdout, err = run(["--from-scratch", files["config"], "--data", files["data"], "--output", out,
                             "--steps", 120, "--qat-steps", 20, *SCRATCH], capsys)
    assert code == 0, err
    curve = losses(out / "metrics.jsonl")
    print("loss every 10 steps: " + " ".join(f"{x:.3f}" for x in curve[::10]) + f" ... last {curve[-1]:.3f}")
    assert len(curve) == 120 and curve[-1] < 0.2 < 5 < curve[0]
    report = json.loads((out / "quantization.json").read_text())
    assert len(report) == 2 * SMALL.num_hidden_layers  # every expert tensor re-quantized
    model = gptoss_jax.load(out / "merged")
    prompts = [cf.render_for_completion(cf.Conversation([cf.user(question(c))], reasoning_effort="low"))
               for c in CAPITALS]
    answers = [cf.parse_completion(tokens) for tokens in generate(model, prompts, max_new_tokens=24, temperature=0)]
    for (country, capital), answer in zip(CAPITALS.items(), answers):
        assert answer.complete and [m.channel for m in answer.messages] == ["analysis", "final"]
        assert answer.final_text == capital, (country, answer.messages)


def test_lora_resumes_as_if_uninterrupted_and_exports_to_transformers(files, base_checkpoint, tmp_path, capsys,
                                                                       monkeypatch):
    argv = ["--checkpoint", base_checkpoint, "--data", files["data"], "--eval-data", files["data"], "--steps", 4,
            "--save-every", 2, "--lora-targets", "q,k,v,o,router,mlp1,mlp2", "--lora-expert-layers", 1,
            "--learning-rate", "1e-2", *COMMON]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    code, stdout, err = run([*argv, "--output", whole, "--merge"], capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 4] and "eval_loss" in metrics[-1]
    assert metrics[3]["loss"] < metrics[0]["loss"]

    # Interrupted after the checkpoint of batch 2, then a save of batch 4 killed half-way.
    real_step, calls = train.Trainer.step, []

    def interrupted_step(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(train.Trainer, "step", interrupted_step)
    code, stdout, err = run([*argv, "--output", parts], capsys)
    assert code == 130 and err.strip().endswith("interrupted")
    monkeypatch.setattr(train.Trainer, "step", real_step)
    killed = parts / "checkpoints" / "4.orbax-checkpoint-tmp-1"
    shutil.copytree(parts / "checkpoints" / "2", killed)
    code, stdout, err = run([*argv, "--output", parts, "--merge"], capsys)
    assert code == 0, err
    assert "resuming from" in err and "at batch 2 of 4" in err and not killed.exists()
    assert (parts / "metrics.jsonl").read_text() != "" and losses(parts / "metrics.jsonl") == losses(whole / "metrics.jsonl")
    (lora_a, config_a, arrays_a), (lora_b, config_b, arrays_b) = (train.read_adapters(d / "adapters.safetensors")
                                                                  for d in (whole, parts))
    assert lora_a == lora_b and config_a == config_b and arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name])

    # Other settings are refused rather than mixed in.
    code, stdout, err = run([*argv, "--output", parts, "--lora-rank", 4], capsys)
    assert code == 2 and err.startswith("error: ") and "lora.rank (8 then, 4 now)" in err

    # The merged checkpoint as HF safetensors: HF transformers gives our logits, and the
    # experts of layer 0 (no adapters) are the source's bytes.
    report = json.loads((whole / "quantization.json").read_text())
    assert [r["tensor"] for r in report] == ["blocks/1/mlp/mlp1", "blocks/1/mlp/mlp2"]
    hf = tmp_path / "hf"
    export_hf(whole / "merged", hf, progress=False)
    tokens = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 24))
    ours = np.asarray(gptoss_jax.load(whole / "merged", dtype="float32")(tokens))
    theirs = hf_logits(hf, tokens, torch.float32)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    source = {n: SafetensorsFile(p) for p in base_checkpoint.glob("*.safetensors") for n in SafetensorsFile(p).names()}
    exported = {n: SafetensorsFile(p) for p in hf.glob("*.safetensors") for n in SafetensorsFile(p).names()}
    for kind in ("gate_up_proj", "down_proj"):
        for part in ("blocks", "scales"):
            name = f"model.layers.0.mlp.experts.{kind}_{part}"
            assert np.asarray(exported[name].get(name)).tobytes() == np.asarray(source[name].get(name)).tobytes()
            name = f"model.layers.1.mlp.experts.{kind}_{part}"
            assert np.asarray(exported[name].get(name)).tobytes() != np.asarray(source[name].get(name)).tobytes()


# The CLI with a 1 MiB file-size limit from its second checkpoint save on: the file system
# refuses the state's arrays (EFBIG) inside tensorstore.
FULL_DISK_FROM_THE_SECOND_SAVE = """
import resource, signal, sys
from gptoss_jax import finetune, train
save = train.Checkpoints.save
def save_on_a_full_disk(self, step, state, progress):
    if step > 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return save(self, step, state, progress)
train.Checkpoints.save = save_on_a_full_disk
sys.exit(finetune.main(sys.argv[1:]))
"""


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_checkpoint(files, tmp_path):
    out = tmp_path / "full"
    argv = ["--from-scratch", files["config"], "--data", files["data"], "--output", out, *SCRATCH, "--steps", 2,
            "--warmup-steps", 0, "--save-every", 1]
    result = subprocess.run([sys.executable, "-c", FULL_DISK_FROM_THE_SECOND_SAVE, *map(str, argv)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {out / 'checkpoints'}: saving the checkpoint of step 2 failed (File too "
                                    f"large); the checkpoint of step 1 is kept")
    assert "2" not in [p.name for p in (out / "checkpoints").iterdir()]  # only a temporary folder
    assert train.Checkpoints(out / "checkpoints").manager.all_steps() == [1]


@pytest.mark.parametrize("extra, message", [
    (["--learning-rate", "-1"], "--learning-rate must be a number > 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a number > 0"),
    (["--warmup-steps", "5", "--steps", "5"], "--warmup-steps (5) must be fewer than the optimizer steps (5)"),
    (["--lora-rank", "0"], "LoRA rank must be a positive integer"),
    (["--lora-targets", "q,gate"], "LoRA targets must be distinct names among q, k, v, o, router, mlp1, mlp2"),
    (["--lora-dropout", "1"], "LoRA dropout must be in [0, 1)"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--steps", "3", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--steps", "3", "--qat-steps", "4"], "--qat-steps (4) must be at most the optimizer steps (3)"),
    (["--seq-len", "40"], "rows hold 41"),
    (["--method", "full", "--lora-rank", "4", "--adapters", "x"], "--adapters starts LoRA training"),
])
def test_bad_settings_give_one_error_line_and_write_nothing(files, base_checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, stdout, err = run(["--checkpoint", base_checkpoint, "--data", files["data"], "--output", out, *COMMON,
                             *extra], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err and not out.exists()


def test_a_bad_record_is_named_by_file_and_line(files, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(files["data"].read_text() + '{"messages": [{"role": "user", "content": "Hi"}]}\n')
    code, stdout, err = run(["--from-scratch", "tiny", "--method", "full", "--data", data, "--output", tmp_path / "o",
                             *COMMON], capsys)
    assert code == 2 and err.strip() == (f"error: {data}:5: the conversation has no assistant message to train on "
                                         f"(fix the record, or pass --skip-bad-records to skip bad records)")
    assert not (tmp_path / "o").exists()


def test_a_preset_name_fine_tunes_random_weights_of_that_shape(capsys):
    args = finetune.build_parser().parse_args(["--checkpoint", "tiny", "--data", "unused.jsonl", "--output", "unused"])
    model = finetune._load_model(args)
    assert model.config == GptOssConfig.preset("tiny")
    assert "--checkpoint tiny is a preset: random weights" in capsys.readouterr().err
