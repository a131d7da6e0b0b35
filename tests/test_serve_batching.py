"""ContinuousBatch (gptoss_jax.engine): generations join and leave a running decode batch
between chunks, each producing exactly what `generate` produces for it alone.

In fp32: in bf16 a row's logits can depend on how many rows the batch has (see
docs/serving.md, "Batching and numerics"), as in any batched server."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.config import GptOssConfig
from gptoss_jax.engine import ContinuousBatch, Generation, decode_slots, generate, insert_slot
from gptoss_jax.loader import random_model, shard_model
from gptoss_jax.sharding.mesh import make_mesh

WINDOW = 4


@pytest.fixture(scope="module")
def model():
    config = GptOssConfig.preset("tiny").replace(vocab_size=512, sliding_window=WINDOW, num_hidden_layers=3)
    return random_model(config, dtype=jnp.float32, seed=1)


def prompt_of(length, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 512, length)]


def run(batch, generations):
    """Admits the generations in order as slots free up; returns the occupancy of each chunk."""
    waiting, occupancy = list(generations), []
    while waiting or batch.busy:
        while waiting and batch.free_slots:
            batch.add(waiting.pop(0))
        batch.step()
        occupancy.append(batch.occupancy)
    return occupancy


def solo(model, generation, **kwargs):
    return generate(model, [generation.prompt], max_new_tokens=generation.max_new_tokens,
                    temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k,
                    seed=generation.seed % 2**32, stop_tokens=generation.stop_tokens, **kwargs)[0]


def test_generations_join_and_leave_and_match_generate_alone(model):
    lengths, limits = [3, 11, 6, 20, 2, 14], [9, 4, 12, 7, 10, 8]
    generations = [Generation(prompt_of(n, i), m, temperature=0, stop_tokens=[]) for i, (n, m) in
                   enumerate(zip(lengths, limits))]
    expected = [solo(model, g) for g in generations]
    # A stop token that one generation meets, and one it may not.
    stop = expected[2][4]
    generations += [Generation(g.prompt, g.max_new_tokens, temperature=0, stop_tokens=[stop, 511])
                    for g in generations[1:3]]
    expected += [solo(model, g) for g in generations[6:]]
    batch = ContinuousBatch(model, slots=3, max_len=40, chunk=3)
    occupancy = run(batch, generations)
    assert [g.tokens for g in generations] == expected
    assert [g.finish_reason for g in generations] == [
        "stop" if g.tokens[-1] in (g.stop_tokens or []) else "length" for g in generations]
    assert "stop" in [g.finish_reason for g in generations]
    assert max(occupancy) == 3 and occupancy[-1] == 0 and batch.free_slots == 3


def test_prompts_admitted_together_are_prefilled_as_one_batch(model, monkeypatch):
    """add_many: three prompts of different lengths (and one that may generate nothing) in
    one prefill of 4 rows, each then decoding what `generate` gives it alone."""
    from gptoss_jax import engine

    shapes, real = [], engine.prefill

    def counting(graphdef, state, tokens, *args):
        shapes.append(tokens.shape)
        return real(graphdef, state, tokens, *args)

    monkeypatch.setattr(engine, "prefill", counting)
    generations = [Generation(prompt_of(n, 90 + n), 7, temperature=t, seed=n, stop_tokens=[])
                   for n, t in ((5, 0), (17, 1.0), (2, 0))]
    nothing = Generation(prompt_of(3, 99), 0, temperature=0, stop_tokens=[])
    batch = ContinuousBatch(model, slots=4, max_len=40, chunk=3)
    batch.add_many([generations[0], nothing, *generations[1:]])
    assert shapes == [(4, 32)] and batch.free_slots == 1 and nothing.finish_reason == "length"
    run(batch, [])
    monkeypatch.setattr(engine, "prefill", real)
    assert [g.tokens for g in generations] == [solo(model, g) for g in generations]
    batch.add_many([Generation([1], 5), Generation([2], 5)])
    with pytest.raises(ValueError, match="3 generations for 2 free slots"):
        batch.add_many([Generation([1], 5) for _ in range(3)])
    with pytest.raises(ValueError, match="outside"):  # one invalid generation: none is added
        batch.add_many([Generation([1], 5), Generation([1, 512], 1)])
    assert batch.free_slots == 2


def test_sampling_settings_per_slot(model):
    settings = [dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=0.9, top_k=40, top_p=0.9, seed=-6),
                dict(temperature=1.3, top_k=40, top_p=0.5, seed=2**40 + 5)]
    generations = [Generation(prompt_of(5 + i, 30 + i), 10, stop_tokens=[], **s) for i, s in enumerate(settings)]
    batch = ContinuousBatch(model, slots=len(settings), max_len=32, chunk=4)
    assert max(run(batch, generations)) == len(settings)
    assert [g.tokens for g in generations] == [solo(model, g) for g in generations]
    assert len({tuple(g.tokens) for g in generations}) == len(generations)


def test_a_cancelled_generation_frees_its_slot_for_a_clean_start(model):
    batch = ContinuousBatch(model, slots=1, max_len=48, chunk=2)
    long = Generation(prompt_of(30, 50), 16, temperature=0, stop_tokens=[])
    batch.add(long)
    for _ in range(3):
        batch.step()
    batch.cancel(long)
    assert long.finish_reason == "cancelled" and batch.free_slots == 1
    assert long.tokens == solo(model, long)[:len(long.tokens)] and 0 < len(long.tokens) < 16
    short = Generation(prompt_of(3, 51), 12, temperature=0, stop_tokens=[])
    run(batch, [short])  # the slot held 30+ cached positions of the cancelled generation
    assert short.tokens == solo(model, short) and long.finish_reason == "cancelled"


def test_limits(model):
    batch = ContinuousBatch(model, slots=2, max_len=12, chunk=4)
    capped = Generation(prompt_of(9, 60), 10, temperature=0, stop_tokens=[])
    nothing = Generation(prompt_of(4, 61), 0, temperature=0, stop_tokens=[])
    run(batch, [capped, nothing])
    assert (capped.finish_reason, len(capped.tokens)) == ("length", 3)
    assert capped.tokens == solo(model, capped, max_len=12)
    assert (nothing.finish_reason, nothing.tokens, nothing.slot) == ("length", [], None)
    for generation, message in [
            (Generation(prompt_of(12, 62), 1), "no room"),
            (Generation([], 1), "empty"),
            (Generation([1, 512], 1), "outside"),
            (Generation([1], 1, temperature=-1), "temperature"),
            (Generation([1], 1, top_p=0), "top_p"),
            (Generation([1], -1), "max_new_tokens"),
            (Generation([1], 1, stop_tokens=[1, 2, 3, 4, 5]), "at most 4"),
            (Generation([1], 1, stop_tokens=[-1]), "stop tokens")]:
        with pytest.raises(ValueError, match=message):
            batch.add(generation)
    batch.add(Generation([1], 5))
    batch.add(Generation([2], 5))
    with pytest.raises(ValueError, match="no free slot"):
        batch.add(Generation([3], 5))


def test_joining_reuses_compiled_code(model):
    """New generations enter between chunks without recompiling the decode loop; inserting
    compiles once per prefill cache size."""
    batch = ContinuousBatch(model, slots=2, max_len=40, chunk=2)
    run(batch, [Generation(prompt_of(5, 70), 3, temperature=0, stop_tokens=[])])
    decode_sizes, insert_sizes = decode_slots._cache_size(), insert_slot._cache_size()
    run(batch, [Generation(prompt_of(n, 71 + n), 5, temperature=0, stop_tokens=[]) for n in (4, 9, 13, 2)])
    assert decode_slots._cache_size() == decode_sizes and insert_slot._cache_size() == insert_sizes


def test_on_a_mesh(model):
    """Rows split over a data axis (3 slots: 4 rows on 2x2x2), experts and heads over the others:
    the same tokens as one device, and one decode executable for every chunk."""
    meshed = shard_model(model, make_mesh("2x2x2", jax.devices()[:8]))
    generations = [Generation(prompt_of(n, 80 + n), 6, temperature=0, stop_tokens=[]) for n in (4, 9, 2, 7)]
    batch = ContinuousBatch(meshed, slots=3, max_len=24, chunk=3)
    decode_slots.clear_cache()
    assert max(run(batch, generations)) == 3
    assert [g.tokens for g in generations] == [solo(model, g) for g in generations]
    assert decode_slots._cache_size() == 1


def test_a_long_prompt_joins_in_bounded_prefill_steps(model, monkeypatch):
    """`add` prefills a prompt longer than one prefill step in several steps, as `generate` does."""
    from gptoss_jax import engine

    monkeypatch.setattr(engine, "PREFILL_TOKENS", 8)
    steps, real = [], engine.prefill

    def counting(graphdef, state, tokens, *args):
        steps.append(tokens.shape)
        return real(graphdef, state, tokens, *args)

    monkeypatch.setattr(engine, "prefill", counting)
    generation = Generation(prompt_of(29, 60), 6, temperature=0, stop_tokens=[])
    run(ContinuousBatch(model, slots=2, max_len=48, chunk=4), [generation])
    assert steps == [(1, 8)] * 4
    monkeypatch.setattr(engine, "prefill", real)
    assert generation.tokens == solo(model, generation)


def test_max_len_within_the_model_positions(model):
    with pytest.raises(ValueError, match="positions"):
        ContinuousBatch(model, slots=1, max_len=model.config.max_position_embeddings + 1)
