import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
import tiktoken_ext.openai_public

from gptoss_jax import tokenizer
from gptoss_jax.tokenizer import get_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

# Python prelude for subprocesses: no socket can connect and tiktoken cannot read URLs.
BLOCK_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
import tiktoken, tiktoken.load
tiktoken.get_encoding = _refuse
tiktoken.load.read_file = _refuse
"""


def offline_environment(cache_home: Path) -> dict:
    """Environment for a fresh interpreter: no tiktoken cache, and an unusable
    proxy so that Rust code (openai-harmony) cannot download either."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIKTOKEN", "DATA_GYM"))}
    dead_proxy = "http://127.0.0.1:9"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[name] = dead_proxy
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    env["XDG_CACHE_HOME"] = str(cache_home)
    env["TIKTOKEN_RS_CACHE_DIR"] = str(cache_home / "tiktoken-rs")
    return env


def run_offline(code: str, cache_home: Path, **extra_env: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", BLOCK_NETWORK + code],
        cwd=REPO_ROOT,
        env=offline_environment(cache_home) | extra_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_identical_to_tiktokens_own_o200k_harmony(tmp_path, monkeypatch, no_network):
    # Let tiktoken's own constructor find the vocabulary in its download cache.
    cache_key = hashlib.sha1(O200K_URL.encode()).hexdigest()
    (tmp_path / cache_key).write_bytes(tokenizer.read_vocabulary())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    expected = tiktoken_ext.openai_public.o200k_harmony()

    ours = get_tokenizer()
    assert ours.name == expected["name"] == "o200k_harmony"
    assert ours._pat_str == expected["pat_str"]
    assert ours._special_tokens == expected["special_tokens"]
    assert ours._mergeable_ranks == expected["mergeable_ranks"]

    reference = tiktoken.Encoding(**expected)
    sample = "Hello, world! 2025-06-28 <|start|> naïve 日本語 🦜\n\n  def f(x):\n\treturn x"
    assert ours.encode(sample, disallowed_special=()) == reference.encode(sample, disallowed_special=())
    assert ours.encode(sample, allowed_special="all") == reference.encode(sample, allowed_special="all")


def test_vocabulary_size_and_special_table():
    encoding = get_tokenizer()
    assert encoding.n_vocab == tokenizer.N_VOCAB == 201088
    assert encoding.max_token_value == 201087
    assert encoding.eot_token == 199999
    assert len(encoding.special_tokens_set) == 1091
    assert len(encoding._mergeable_ranks) == 199998
    assert encoding.decode([200018]) == "<|endofprompt|>"
    assert encoding.encode("<|reserved_200018|>", allowed_special="all") == [200018]
    assert encoding.decode([201087]) == "<|reserved_201087|>"
    assert "<|reserved_201088|>" not in encoding.special_tokens_set


@pytest.mark.parametrize(
    "text, token_id, constant",
    [
        ("<|startoftext|>", 199998, tokenizer.STARTOFTEXT),
        ("<|endoftext|>", 199999, tokenizer.ENDOFTEXT),
        ("<|return|>", 200002, tokenizer.RETURN),
        ("<|constrain|>", 200003, tokenizer.CONSTRAIN),
        ("<|channel|>", 200005, tokenizer.CHANNEL),
        ("<|start|>", 200006, tokenizer.START),
        ("<|end|>", 200007, tokenizer.END),
        ("<|message|>", 200008, tokenizer.MESSAGE),
        ("<|call|>", 200012, tokenizer.CALL),
        ("<|endofprompt|>", 200018, tokenizer.ENDOFPROMPT),
        ("<|reserved_200000|>", 200000, None),
        ("<|reserved_200004|>", 200004, None),
        ("<|reserved_200013|>", 200013, None),
    ],
)
def test_special_token_ids(text, token_id, constant):
    encoding = get_tokenizer()
    assert encoding.encode(text, allowed_special="all") == [token_id]
    assert encoding.decode([token_id]) == text
    if constant is not None:
        assert constant == token_id


@pytest.mark.parametrize(
    "text, ids",
    [
        ("system", [17360]),
        ("user", [1428]),
        ("assistant", [173781]),
        ("developer", [77944]),
        ("analysis", [35644]),
        ("final", [17196]),
        ("commentary", [12606, 815]),
        (" to=", [316, 28]),
        ("json", [4108]),
        ("functions", [44580]),
        ("python", [29010]),
    ],
)
def test_useful_text_ids(text, ids):
    assert get_tokenizer().encode(text) == ids


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "日本語のテキストと中文文本，还有한국어 문장.",
        "مرحبا بالعالم، كيف حالك؟",
        "नमस्ते दुनिया, आप कैसे हैं?",
        "Crème brûlée, façade, naïve coöperation, Ångström, Łódź",
        "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\n\tif x != 0:\r\n\t\tpass",
        "Emoji: 🦜🧬👩🏽‍💻🇫🇷 and 𝕳𝖊𝖑𝖑𝖔 plus ZWJ\u200d and combining e\u0301",
        "   leading spaces, trailing spaces   \n\n\n",
        "numbers 1234567890 3.14159 -42 1e-9",
        "",
    ],
)
def test_round_trip(text):
    encoding = get_tokenizer()
    ids = encoding.encode(text)
    assert all(0 <= i < 199998 for i in ids)
    assert encoding.decode(ids) == text


def test_special_strings_are_plain_text_unless_allowed():
    encoding = get_tokenizer()
    with pytest.raises(ValueError):
        encoding.encode("<|start|>")
    ordinary = encoding.encode_ordinary("<|start|>")
    assert tokenizer.START not in ordinary and len(ordinary) > 1
    assert encoding.decode(ordinary) == "<|start|>"


def test_special_table_has_every_id_once_except_endofprompt():
    table = tokenizer.special_tokens()
    assert len(table) == 1091
    assert sorted(set(table.values())) == list(range(199998, 201088))
    ids_with_two_names = sorted(i for i in set(table.values()) if list(table.values()).count(i) > 1)
    assert ids_with_two_names == [200018]


def test_corrupted_vocabulary_is_rejected_with_file_name(tmp_path):
    tampered = tmp_path / "o200k_base.tiktoken.gz"
    data = bytearray(tokenizer.read_vocabulary())
    data[100] ^= 1
    tampered.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(RuntimeError, match=r"o200k_base\.tiktoken\.gz.*corrupted.*446a9538"):
        tokenizer.read_vocabulary(tampered)

    not_gzip = tmp_path / "broken.gz"
    not_gzip.write_bytes(b"not a gzip file")
    with pytest.raises(RuntimeError, match="broken.gz"):
        tokenizer.read_vocabulary(not_gzip)


def test_shipped_vocabulary_hash():
    assert hashlib.sha256(tokenizer.read_vocabulary()).hexdigest() == tokenizer.VOCABULARY_SHA256
    assert tokenizer.VOCABULARY_SHA256 == "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def test_loads_in_a_fresh_process_without_network(tmp_path):
    result = run_offline(
        """
import json, os
from gptoss_jax.tokenizer import get_tokenizer
encoding = get_tokenizer()
ids = encoding.encode("Hello 世界 🦜", allowed_special="all")
print(json.dumps({"n_vocab": encoding.n_vocab, "ids": ids, "text": encoding.decode(ids),
                  "cache_dir_set": "TIKTOKEN_CACHE_DIR" in os.environ}))
""",
        tmp_path,
    )
    assert result["n_vocab"] == 201088
    assert result["text"] == "Hello 世界 🦜"
    assert result["ids"] == get_tokenizer().encode("Hello 世界 🦜")
    assert result["cache_dir_set"] is False
