"""The gpt-oss tokenizer, ``o200k_harmony``, built offline from the shipped vocabulary.

``get_tokenizer()`` returns a ``tiktoken.Encoding`` equal to the one tiktoken
builds for ``o200k_harmony``: the o200k_base BPE ranks and pre-tokenizer
pattern, plus the harmony special tokens. The ranks are read from
``gptoss_jax/data/o200k_base.tiktoken.gz`` and checked against the published
sha256 of the uncompressed file, so nothing is downloaded and
``TIKTOKEN_CACHE_DIR`` plays no part.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
from pathlib import Path

import tiktoken

ENCODING_NAME = "o200k_harmony"

VOCABULARY_FILE = Path(__file__).parent / "data" / "o200k_base.tiktoken.gz"
# sha256 of the *uncompressed* o200k_base.tiktoken, as published by tiktoken.
VOCABULARY_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

N_VOCAB = 201088  # 199998 BPE ranks + special and reserved ids up to 201087

O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
ENDOFPROMPT = 200018

_NAMED_SPECIAL_TOKENS = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}


def special_tokens() -> dict[str, int]:
    """The special-token table of tiktoken's ``o200k_harmony`` (1091 strings).

    Every id from 199998 to 201087 has a string. Ids without a name of their
    own are ``<|reserved_ID|>``; id 200018 is both ``<|endofprompt|>`` (from
    o200k_base) and ``<|reserved_200018|>``.
    """
    table = {"<|endofprompt|>": ENDOFPROMPT}
    for token_id in range(STARTOFTEXT, N_VOCAB):
        table[f"<|reserved_{token_id}|>"] = token_id
    for name, token_id in _NAMED_SPECIAL_TOKENS.items():
        del table[f"<|reserved_{token_id}|>"]
        table[name] = token_id
    return table


def read_vocabulary(path: Path = VOCABULARY_FILE) -> bytes:
    """The uncompressed ``o200k_base.tiktoken`` bytes, after checking their sha256."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise RuntimeError(
            f"cannot read the tokenizer vocabulary {path}: {error}. "
            "Reinstall gptoss-jax to restore the file."
        ) from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCABULARY_SHA256:
        raise RuntimeError(
            f"the tokenizer vocabulary {path} is corrupted: its uncompressed sha256 is "
            f"{digest}, expected {VOCABULARY_SHA256}. Reinstall gptoss-jax to restore the file."
        )
    return data


def parse_mergeable_ranks(vocabulary: bytes) -> dict[bytes, int]:
    """Parse tiktoken's format: one ``base64(token) rank`` pair per line."""
    ranks = {}
    for line in vocabulary.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The ``o200k_harmony`` tokenizer, built once per process without network access.

    Its ``n_vocab`` is 201088. (tiktoken's ``explicit_n_vocab`` check cannot be
    used: id 200018 has two names, so the table has one string more than ids.)
    """
    return tiktoken.Encoding(
        ENCODING_NAME,
        pat_str=O200K_PATTERN,
        mergeable_ranks=parse_mergeable_ranks(read_vocabulary()),
        special_tokens=special_tokens(),
    )
