import json

import pytest

from gptoss_jax.config import FULL, SLIDING, ConfigError, GptOssConfig, yarn_correction_range


def test_presets_have_the_real_values():
    c20, c120 = GptOssConfig.preset("gpt-oss-20b"), GptOssConfig.preset("gpt-oss-120b")
    assert (c20.num_hidden_layers, c20.num_experts, c120.num_hidden_layers, c120.num_experts) == (24, 32, 36, 128)
    for c in (c20, c120):
        assert (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (2880, 64, 64, 8)
        assert (c.vocab_size, c.sliding_window, c.experts_per_token, c.max_position_embeddings) == (201088, 128, 4, 131072)
        assert c.layer_types[:3] == (SLIDING, FULL, SLIDING)
    tiny = GptOssConfig.preset("tiny")
    assert tiny.vocab_size == 201088
    assert tiny.num_experts % 4 == 0 and tiny.num_attention_heads % 2 == 0 and tiny.num_key_value_heads % 2 == 0


def test_yarn_range_is_not_rounded():
    low, high = yarn_correction_range(GptOssConfig.preset("gpt-oss-20b"))
    assert low == pytest.approx(8.092779, abs=1e-6) and high == pytest.approx(17.398025, abs=1e-6)


def test_three_sources_agree():
    ours = GptOssConfig.preset("gpt-oss-20b")
    from_hf = GptOssConfig.from_dict(ours.to_hf_dict())
    from_original = GptOssConfig.from_dict(ours.to_original_dict())
    strip = lambda c: c.replace(name="x")
    assert strip(from_hf) == strip(ours) == strip(from_original)


def test_hf_config_v5_rope_parameters_and_missing_truncate():
    hf = GptOssConfig.preset("gpt-oss-20b").to_hf_dict()
    rope = hf.pop("rope_scaling")
    hf["rope_parameters"] = {**rope, "rope_theta": 150000.0}
    assert GptOssConfig.from_dict(hf).rope_truncate is False
    del hf["rope_parameters"]["truncate"]  # HF reads a missing flag as True
    assert GptOssConfig.from_dict(hf).rope_truncate is True


def test_from_json_reads_each_file(tmp_path):
    c = GptOssConfig.preset("tiny")
    for name, d in [("hf.json", c.to_hf_dict()), ("orig.json", c.to_original_dict()), ("ours.json", c.to_dict())]:
        (tmp_path / name).write_text(json.dumps(d))
        assert GptOssConfig.from_json(tmp_path / name).replace(name="x") == c.replace(name="x")


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("num_experts"), "num_experts"),
    (lambda d: d.pop("head_dim"), "head_dim"),
    (lambda d: d.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda d: d.update(experts_per_token=99), "experts_per_token"),
    (lambda d: d.update(hidden_size=100), "hidden_size"),
    (lambda d: d.update(layer_types=["sliding_attention"]), "layer_types"),
    (lambda d: d.update(sliding_window=0), "sliding_window"),
    (lambda d: d.update(vocab_size="big"), "vocab_size"),
])
def test_rejected_configs_name_the_field(change, field):
    d = GptOssConfig.preset("tiny").to_dict()
    change(d)
    with pytest.raises(ConfigError, match=f"'{field}'"):
        GptOssConfig.from_dict(d)


def test_hf_config_missing_field_is_named():
    d = GptOssConfig.preset("tiny").to_hf_dict()
    del d["num_local_experts"]
    with pytest.raises(ConfigError, match="'num_experts'"):
        GptOssConfig.from_dict(d)


def test_bad_json_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GptOssConfig.from_json(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        GptOssConfig.preset("gpt-oss-7b")


def test_config_file_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(ConfigError, match=f"config file {path} is not UTF-8 text"):
        GptOssConfig.from_json(path)
