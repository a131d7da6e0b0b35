import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.config import GptOssConfig
from gptoss_jax.generate import generate
from gptoss_jax.loader import random_model

WINDOW = 4


@pytest.fixture(scope="module")
def model():
    config = GptOssConfig.preset("tiny").replace(vocab_size=512, sliding_window=WINDOW, num_hidden_layers=3)
    return random_model(config, dtype=jnp.float32, seed=1)


FULL_LEN = 32


@nnx.jit
def full_forward(model, tokens):
    return model(tokens)


def greedy_by_full_forward(model, prompt, n):
    """Re-runs the whole sequence each step. The sequence is right-padded to a fixed length
    (one compilation); causal attention makes the padding irrelevant."""
    seq = list(prompt)
    for _ in range(n):
        logits = full_forward(model, jnp.asarray([seq + [0] * (FULL_LEN - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


@nnx.jit
def extend(model, tokens, positions, caches):
    return model.extend(tokens, positions, caches)


def prompt_of(length, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 512, length)]


@pytest.mark.parametrize("length", [3, 7])  # shorter and longer than the window
def test_greedy_cache_matches_full_forward(model, length):
    prompt, n = prompt_of(length, length), 14  # wraps the 4-slot ring several times
    got = generate(model, [prompt], max_new_tokens=n, temperature=0, stop_tokens=[])
    assert got == [greedy_by_full_forward(model, prompt, n)]


def test_cached_logits_match_full_forward(model):
    seq = prompt_of(20, 5)
    prompt_len = 6
    caches = model.init_cache(1, len(seq))
    logits, caches = model.extend(jnp.asarray([seq[:prompt_len]]), jnp.arange(prompt_len)[None], caches)
    full = full_forward(model, jnp.asarray([seq]))
    np.testing.assert_allclose(logits[0], full[0, :prompt_len], atol=1e-5, rtol=0)
    for pos in range(prompt_len, len(seq)):
        logits, caches = extend(model, jnp.asarray([[seq[pos]]]), jnp.asarray([[pos]]), caches)
        np.testing.assert_allclose(logits[0, 0], full[0, pos], atol=1e-5, rtol=0)


def test_ragged_batch_matches_single(model):
    prompts = [prompt_of(2, 10), prompt_of(9, 11), prompt_of(5, 12)]
    batch = generate(model, prompts, max_new_tokens=10, temperature=0, stop_tokens=[])
    alone = [generate(model, [p], max_new_tokens=10, temperature=0, stop_tokens=[])[0] for p in prompts]
    assert batch == alone


def test_stop_token_and_max_new_tokens(model):
    prompts = [prompt_of(4, 20), prompt_of(6, 21)]
    free = generate(model, prompts, max_new_tokens=12, temperature=0, stop_tokens=[])
    assert [len(t) for t in free] == [12, 12]
    stop = free[0][3]
    first = free[0].index(stop)
    streamed = [[], []]
    stopped = generate(model, prompts, max_new_tokens=12, temperature=0, stop_tokens=[stop],
                       on_tokens=lambda new: [s.extend(t) for s, t in zip(streamed, new)], chunk=3)
    assert stopped[0] == free[0][: first + 1]
    expected_1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert stopped[1] == expected_1
    assert streamed == stopped


def test_chunks_queued_ahead_but_not_past_the_limit(model, monkeypatch):
    """generate queues chunk i + 1 before reading chunk i's tokens; it queues none past the
    chunk in which every sequence reaches max_new_tokens, and one at most after a stop
    token ends them all."""
    from gptoss_jax import engine

    calls = []
    real = engine.decode_chunk

    def counting(*args, **kwargs):
        calls.append(kwargs["chunk"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_chunk", counting)
    prompt = [prompt_of(4, 20)]
    free = generate(model, prompt, max_new_tokens=12, temperature=0, stop_tokens=[], chunk=3)
    assert calls == [3] * 4 and len(free[0]) == 12
    calls.clear()
    stopped = generate(model, prompt, max_new_tokens=12, temperature=0, stop_tokens=[free[0][1]], chunk=3)
    assert stopped[0] == free[0][:2] and len(calls) == 2


def test_decode_chunk_has_a_static_trip_count(model):
    """A loop without a data-dependent exit: on a GPU, XLA then runs the steps without a
    device-to-host copy and a wait after each one."""
    import jax

    from gptoss_jax.engine import decode_chunk

    graphdef, state = nnx.split(model)
    caches = model.init_cache(1, 64)
    zeros = jnp.zeros(1, jnp.int32)
    compiled = decode_chunk.lower(
        graphdef, state, caches, jnp.zeros((1, model.config.vocab_size)), zeros, zeros, jnp.zeros(1, bool),
        jnp.int32(0), zeros + 5, jnp.array([-1], jnp.int32), jax.random.key(0), jnp.float32(1), jnp.float32(1),
        chunk=6, greedy=True, top_k=0, use_top_p=False).compile()
    assert '"known_trip_count":{"n":"6"}' in compiled.as_text()


def test_max_len_caps_generation(model):
    out = generate(model, [prompt_of(5, 1), prompt_of(3, 2)], max_new_tokens=10, max_len=8,
                   temperature=0, stop_tokens=[])
    assert [len(t) for t in out] == [3, 5]


def test_sampling_reproducible(model):
    prompts = [prompt_of(5, 30), prompt_of(3, 31)]
    kw = dict(max_new_tokens=12, temperature=1.0, stop_tokens=[])
    a = generate(model, prompts, seed=0, **kw)
    assert a == generate(model, prompts, seed=0, **kw)
    assert a != generate(model, prompts, seed=1, **kw)
    filtered = generate(model, prompts, seed=0, top_k=5, top_p=0.9, **kw)
    assert all(len(t) == 12 for t in filtered)


def test_top_k_one_is_greedy(model):
    prompts = [prompt_of(5, 40)]
    greedy = generate(model, prompts, max_new_tokens=8, temperature=0, stop_tokens=[])
    assert generate(model, prompts, max_new_tokens=8, temperature=0.7, top_k=1, stop_tokens=[]) == greedy
    assert generate(model, prompts, max_new_tokens=8, temperature=0.7, top_p=1e-6, stop_tokens=[]) == greedy


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[]), "non-empty"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_len=3), "max_len"),
    (dict(prompts=[[1, 512]]), "outside"),
])
def test_invalid_arguments(model, kwargs, message):
    args = dict(prompts=[[1, 2, 3, 4]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), **args)


def run_cli(*args, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu") | (env or {})
    return subprocess.run([sys.executable, "-m", "gptoss_jax.generate", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_default_run():
    # No --checkpoint: the built-in model (trained on a small synthetic task) answers in harmony,
    # its analysis on stderr with --show-analysis and its final answer on stdout.
    result = run_cli("--prompt", "What is 23 + 19?", "--temperature", "0", "--show-analysis")
    assert result.returncode == 0, result.stderr
    assert "using the built-in model: trained on a small synthetic task" in result.stderr
    assert "2 3 + 1 9: 3+9=12, carry 1; 2+1+1=4. Answer 42." in result.stderr
    assert result.stdout.strip() == "23 + 19 = 42"
    assert "harmony format" not in result.stderr


def test_cli_preset_tiny_is_random_weights_not_harmony():
    # Random weights do not speak harmony: after a header that never ends the CLI streams raw text.
    result = run_cli("--checkpoint", "tiny", "--max-new-tokens", "48", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "--checkpoint tiny is a preset: random weights" in result.stderr
    assert "does not follow the harmony format" in result.stderr
    assert result.stdout.strip()


def test_cli_repo_id_from_local_hf_cache(tiny_hf_checkpoint, tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny-gptoss" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in tiny_hf_checkpoint.iterdir():
        (snapshot / file.name).symlink_to(file)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    result = run_cli("--checkpoint", "someone/tiny-gptoss", "--max-new-tokens", "4", "--raw", "--json",
                     env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 4


def test_cli_json_raw():
    result = run_cli("--json", "--raw", "--max-new-tokens", "4", "--prompt", "hi", "--prompt", "hello you")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2
    for record in records:
        assert {"prompt_tokens", "tokens", "text"} <= record.keys()
        assert 1 <= len(record["tokens"]) <= 4


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--checkpoint", "/nonexistent/checkpoint"], "not found"),
    (["--checkpoint", "someone/not-downloaded"], "someone/not-downloaded"),
])
def test_cli_bad_input(args, message, tmp_path):
    result = run_cli(*args, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def harmony_stream(tokens, show_analysis=False):
    from gptoss_jax.streaming import HarmonyStream
    from gptoss_jax.tokenizer import get_tokenizer

    stream = HarmonyStream(get_tokenizer(), echo=True, show_analysis=show_analysis)
    for i in range(0, len(tokens), 3):  # in chunks, as the decode loop delivers them
        stream.feed(tokens[i:i + 3])
    return stream


def test_stream_prints_final_channel_live(capsys):
    from gptoss_jax.tokenizer import get_tokenizer

    completion = get_tokenizer().encode(
        "<|channel|>analysis<|message|>Think: 2+2.<|end|><|start|>assistant<|channel|>final<|message|>"
        "Es ist 4 ☃.<|return|>", allowed_special="all")
    stream = harmony_stream(completion, show_analysis=True)
    out = capsys.readouterr()
    assert out.out == "Es ist 4 ☃." and out.err == "Think: 2+2.\n"  # the analysis ends its line
    assert not stream.not_harmony and stream.printed_anything


def test_stream_falls_back_to_raw_text_for_non_harmony_output(capsys):
    from gptoss_jax.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    words = tokenizer.encode("snow " * 40 + "☃☃")
    stream = harmony_stream(words)
    out = capsys.readouterr()
    assert stream.not_harmony and "does not follow the harmony format" in out.err
    assert out.out == tokenizer.decode(words)  # every token, multi-byte characters intact


def test_package_level_generate_is_the_function(model):
    import gptoss_jax

    kw = dict(max_new_tokens=3, temperature=0, stop_tokens=[])
    assert gptoss_jax.generate(model, [[5, 6, 7]], **kw) == generate(model, [[5, 6, 7]], **kw)


def test_cli_mesh_4x2_provisions_host_devices_and_matches_one_device():
    env = {"XLA_FLAGS": ""}  # let the CLI provision the 8 host devices itself
    args = ["--json", "--raw", "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "6",
            "--prompt", "The sky is"]
    meshed, single = run_cli("--mesh", "4x2", *args, env=env), run_cli(*args, env=env)
    assert meshed.returncode == 0 and single.returncode == 0, meshed.stderr + single.stderr
    assert "8 host (CPU) devices" in meshed.stderr and "mesh 4x2" in meshed.stderr
    assert json.loads(meshed.stdout)["tokens"] == json.loads(single.stdout)["tokens"]


def test_decode_loop_compiles_once_per_shape(model):
    from gptoss_jax.engine import decode_chunk

    decode_chunk.clear_cache()
    generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=12, temperature=0, stop_tokens=[], chunk=3)
    assert decode_chunk._cache_size() == 1  # later chunks reuse the first chunk's executable


def test_nearby_prompt_and_cache_lengths_share_compiled_code(model):
    """The turns of a chat differ a little in prompt length and hence in cache length:
    shapes are bucketed (at most ~25% padding), so such calls reuse one prefill and one
    decode executable."""
    from gptoss_jax.engine import bucket, decode_chunk, prefill

    assert [bucket(n, 16) for n in (1, 17, 130, 150, 161, 5000)] == [16, 32, 160, 160, 192, 5120]
    prefill.clear_cache()
    decode_chunk.clear_cache()
    prompts = [prompt_of(130, 40), prompt_of(150, 41)]
    out = [generate(model, [p], max_new_tokens=n, temperature=0, stop_tokens=[]) for p, n in zip(prompts, (40, 30))]
    assert prefill._cache_size() == 1 and decode_chunk._cache_size() == 1
    assert [len(o[0]) for o in out] == [40, 30]


@pytest.mark.parametrize("argv", [["--kernels", "pallas"], ["--kernels", "auto"], ["--kernels", "pallas", "--mesh", "4x2"]])
def test_cli_and_library_choose_the_same_kernels(argv):
    """The CLI loads through gptoss_jax.load: its --kernels choice is Kernels.auto for the
    devices the model is placed on (here host devices; on a mesh every kernel runs per device)."""
    from gptoss_jax.cli import load_model
    from gptoss_jax.generate import build_parser
    from gptoss_jax.kernels import Kernels

    model = load_model(build_parser().parse_args(argv))
    assert model.kernels == Kernels.auto(argv[1], mesh=model.mesh)
    if "--mesh" in argv:
        assert {"moe_gemv", "decode_attention", "prefill_attention", "projection", "router"} <= set(model.kernels.names())


# ----------------------------------------------------------------------- long prompts
def test_long_prompts_prefill_in_chunks_like_one_call(model, monkeypatch):
    """Prompts longer than a prefill step run in several steps against the cache, ragged rows
    ending in different steps: the tokens are those of the whole-sequence forward."""
    from gptoss_jax import engine

    monkeypatch.setattr(engine, "PREFILL_TOKENS", 24)  # 3 rows of 8 tokens per step: a 29-token prompt takes 4
    prompts = [prompt_of(29, 50), prompt_of(13, 51), prompt_of(3, 52)]
    steps = []
    real = engine.prefill

    def counting(graphdef, state, tokens, *args):
        steps.append(tokens.shape)
        return real(graphdef, state, tokens, *args)

    monkeypatch.setattr(engine, "prefill", counting)
    batch = generate(model, prompts, max_new_tokens=2, temperature=0, stop_tokens=[])
    assert steps == [(3, 8)] * 4  # three rows of 8 tokens per step, whatever the longest prompt's bucket
    assert batch == [greedy_by_full_forward(model, p, 2) for p in prompts]


def test_long_prompts_prefill_in_chunks_with_the_flash_kernel(model, monkeypatch):
    """The flash prefill kernel (Pallas interpret mode on a CPU) takes the same steps."""
    from gptoss_jax import engine
    from gptoss_jax.kernels import Kernels

    monkeypatch.setattr(engine, "PREFILL_TOKENS", 16)
    prompts = [prompt_of(21, 53), prompt_of(6, 54)]
    flash = model.with_kernels(Kernels(prefill_attention=True, interpret=True))
    kw = dict(max_new_tokens=3, temperature=0, stop_tokens=[])
    assert generate(flash, prompts, **kw) == generate(model, prompts, **kw)


def prefill_temp_bytes(model, prompt_length, monkeypatch):
    """The most temporary memory one of generate's prefill calls needs for a prompt of
    `prompt_length` tokens, read from the compiled calls (which are compiled, not run)."""
    import jax

    from gptoss_jax import engine

    peak, real = [], engine.prefill

    def measured(graphdef, state, tokens, positions, caches, last_index):
        compiled = real.lower(graphdef, state, tokens, positions, caches, last_index).compile()
        peak.append(compiled.memory_analysis().temp_size_in_bytes)
        logits = jax.numpy.zeros((tokens.shape[0], model.config.vocab_size), jax.numpy.float32)
        return jax.device_put(logits, jax.devices()[0]), caches

    with monkeypatch.context() as patch:
        patch.setattr(engine, "prefill", measured)
        generate(model, [[1] * prompt_length], max_new_tokens=1, temperature=0, stop_tokens=[])
    return max(peak)


def test_prefill_memory_grows_at_most_linearly_with_the_prompt(monkeypatch):
    """On the XLA path a prefill call holds its queries' scores against every key: in one
    call that is quadratic in the prompt (a 32k prompt of the tiny model: ~70 GB). Prompts
    go through in steps sized so that a step's memory stays bounded."""
    tiny = random_model(GptOssConfig.preset("tiny").replace(vocab_size=4096), seed=2)
    short, long = (prefill_temp_bytes(tiny, n, monkeypatch) for n in (4096, 32768))
    assert long <= 4 * short * 1.1 and long < 2**30, (short, long)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_len=200_000), "max_len=200000 exceeds the model's 131072 positions"),
    (dict(max_new_tokens=131_070), r"3 prompt tokens \+ max_new_tokens 131070 = 131073 positions exceed the model's 131072"),
    (dict(max_new_tokens=10**9), "exceed the model's 131072 positions"),
    (dict(prompts=[[1] * 131_073], max_new_tokens=1), "a prompt of 131073 tokens exceeds the model's 131072 positions"),
])
def test_the_models_positions_are_enforced_before_any_work(model, kwargs, message, monkeypatch):
    from gptoss_jax import engine

    monkeypatch.setattr(engine, "init_caches", lambda *a: pytest.fail("allocated a cache"))
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), **args)


def test_max_len_up_to_the_positions_caps_a_huge_max_new_tokens(model):
    assert generate(model, [[1, 2, 3]], max_new_tokens=10**9, max_len=6, temperature=0, stop_tokens=[])[0] != []


def test_a_2d_array_is_a_batch_of_prompts(model):
    rows = np.array([prompt_of(5, 60), prompt_of(5, 61)], np.int64)
    kw = dict(max_new_tokens=3, temperature=0, stop_tokens=[])
    assert generate(model, rows, **kw) == generate(model, rows.tolist(), **kw)
    assert generate(model, jnp.asarray(rows), **kw) == generate(model, rows.tolist(), **kw)


@pytest.mark.parametrize("prompts, message", [
    (np.array([1, 2, 3]),
     r"one flat array of token ids; pass a list of prompts \(\[ids\] for one prompt, or a 2-D array \[batch, length\]\)"),
    (np.zeros((1, 2, 3), np.int32), r"shape \(1, 2, 3\); expected .* 2-D array \[batch, length\]"),
    (np.array([[1.0, 2.0]]), "integer token ids"),
])
def test_arrays_of_other_shapes_are_refused_with_the_expected_shape(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=2**70), r"seed must be an integer in \[0, 2\*\*32\), got 1180591620717411303424"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=1.5), r"seed must be an integer"),
    (dict(stop_tokens=[2**40]), r"stop_tokens must be token ids in \[0, 512\), got 1099511627776"),
    (dict(stop_tokens=[-3]), r"stop_tokens must be token ids in \[0, 512\), got -3"),
    (dict(stop_tokens=5), r"stop_tokens must be a list of token ids"),
    (dict(max_new_tokens=2.5), r"max_new_tokens must be an integer"),
])
def test_out_of_range_numbers_get_a_clear_error(model, kwargs, message):
    args = dict(max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2, 3]], **args)


# ----------------------------------------------------------------------- the CLI
def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"])
def test_cli_empty_prompt_file_is_an_error(content, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    line = one_error_line(run_cli("--prompt-file", str(path)))
    assert str(path) in line and "no prompt" in line


def test_cli_prompt_file_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    line = one_error_line(run_cli("--prompt-file", str(path)))
    assert str(path) in line and "UTF-8" in line and "byte 3" in line


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "1000000000"], "exceed the model's 131072 positions"),
    (["--max-new-tokens", "200000"], "exceed the model's 131072 positions"),
    (["--seed", str(2**70)], "--seed must be an integer in [0, 2**32)"),
    (["--checkpoint", "tinyy"], "tiny, gpt-oss-20b, gpt-oss-120b"),
    (["--prompt", "  "], "--prompt is empty"),
])
def test_cli_numbers_and_names_out_of_range(args, message):
    line = one_error_line(run_cli(*args))
    assert message in line


def test_cli_without_a_prompt_says_which_prompt_it_answers():
    result = run_cli("--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "note: no --prompt given; answering the example prompt 'Why is the sky blue?'" in result.stderr


def test_cli_short_output_that_is_not_harmony_goes_to_stdout():
    """Too few tokens for the stream to see a header that never ends: still raw text on stdout."""
    tiny = ("--checkpoint", "tiny", "--max-new-tokens", "5", "--temperature", "0")
    result = run_cli(*tiny, "--prompt", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "raw output" not in result.stderr
    assert "does not follow the harmony format" in result.stderr
    batch = run_cli(*tiny, "--prompt", "hi", "--prompt", "hi")
    answers = [line.strip() for line in batch.stdout.splitlines() if not line.startswith("===")]
    assert answers == [result.stdout.strip()] * 2


def test_cli_preset_names_load_random_weights():
    result = run_cli("--checkpoint", "tiny", "--max-new-tokens", "2", "--raw", "--json", "--prompt", "hi")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 2


def test_cli_ctrl_c_stops_without_a_traceback():
    import signal
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "gptoss_jax.generate", "--checkpoint", "tiny", "--max-new-tokens", "100000",
                             "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    while "does not follow the harmony format" not in line:  # it is generating
        line = proc.stderr.readline()
        assert line, "the CLI ended before generating"
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert out.strip()  # what was generated so far stays printed


def test_readme_first_command_runs_on_one_device():
    """The README's first command is the quick one on any machine: no mesh (on a CPU a mesh
    of host devices is several times slower than one device)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    command = first_block.split("&&")[-1].strip()
    assert command.startswith("python -m gptoss_jax.generate ") and "--mesh" not in command
    argv = shlex.split(command)[3:]
    result = run_cli(*argv)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_a_long_prompt_compiles_each_prefill_step_once(model, monkeypatch):
    """The first step gets caches committed to the device like every later step's, so the
    steps of a long prompt share one compiled prefill."""
    from gptoss_jax import engine

    monkeypatch.setattr(engine, "PREFILL_TOKENS", 8)
    engine.prefill.clear_cache()
    generate(model, [prompt_of(40, 70)], max_new_tokens=1, temperature=0, stop_tokens=[])
    assert engine.prefill._cache_size() == 1
