"""Training data: JSONL conversations rendered through the harmony format into token rows with
loss masks, packed several to a row (each document attending only to itself) or one per row
with padding. docs/finetuning.md describes the record format.

One JSON object per line:

    {"messages": [{"role": "user", "content": "What is 23 + 19?"},
                  {"role": "assistant", "channel": "analysis", "content": "23 + 19 = 42."},
                  {"role": "assistant", "channel": "final", "content": "42"}],
     "reasoning_effort": "low", "developer": "Answer briefly.", "tools": [...], "current_date": "2025-06-28"}

The loss falls on the tokens the model generates (`chat_format.render_for_training`): every
assistant message after its `<|start|>assistant`, the last final answer's `<|return|>`
included. Earlier turns' analysis is dropped from the tokens, as the model sees a
conversation at inference, unless `keep_analysis`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gptoss_jax import chat_format
from gptoss_jax.kernels.common import NO_POSITION

ROLES = ("system", "developer", "user", "assistant", "tool")
RECORD_KEYS = ("messages", "tools", "reasoning_effort", "developer", "current_date")
MESSAGE_KEYS = ("role", "content", "channel", "recipient", "name", "content_type")
PAD_TOKEN = 0  # fed at position NO_POSITION with no loss, so its value never matters


class DataError(ValueError):
    """A training file or record that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation as training tokens: `tokens` and `loss_mask` (True where the model
    generates the token), from line `line` of its file."""

    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]
    line: int

    @property
    def length(self) -> int:
        """Tokens the model reads: all but the last, which is only predicted."""
        return len(self.tokens) - 1


class Batch(NamedTuple):
    """Rows of next-token prediction. The model reads `tokens` [batch, seq] at `positions`
    (padding: NO_POSITION); `segment_ids` (packing: 1, 2, ... per document of a row, 0 for
    padding) keep documents apart, None when each row holds one document. The loss is on
    `targets` [batch, m], predicted at `loss_positions` [batch, m] (indices into the row),
    weighted by `loss_mask` [batch, m]: logits are computed only there. m is the most loss
    tokens of any row rounded up (`loss_bucket`), so nearby batches share compiled code."""

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray | None
    loss_positions: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray


def loss_bucket(count: int, seq_len: int) -> int:
    """`count` rounded up to a multiple of max(16, seq_len / 8), at most seq_len."""
    step = max(16, seq_len // 8)
    return min(seq_len, -(-max(count, 1) // step) * step)


def batch_from_rows(tokens, positions, targets, loss_mask, segment_ids=None) -> Batch:
    """A Batch from whole rows [batch, seq] of tokens, positions, targets and loss mask: only
    the positions where the mask is set keep their targets."""
    loss_mask = np.asarray(loss_mask, np.float32)
    rows, seq_len = loss_mask.shape
    m = loss_bucket(int((loss_mask > 0).sum(axis=1).max()), seq_len)
    loss_positions = np.zeros((rows, m), np.int32)
    kept_targets = np.zeros((rows, m), np.int32)
    kept_mask = np.zeros((rows, m), np.float32)
    for r in range(rows):
        where = np.flatnonzero(loss_mask[r] > 0)
        loss_positions[r, :len(where)] = where
        kept_targets[r, :len(where)] = np.asarray(targets)[r, where]
        kept_mask[r, :len(where)] = loss_mask[r, where]
    return Batch(np.asarray(tokens, np.int32), np.asarray(positions, np.int32),
                 None if segment_ids is None else np.asarray(segment_ids, np.int32), loss_positions, kept_targets,
                 kept_mask)


# ---------------------------------------------------------------------------- records
def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    return value


def _message(raw, index: int) -> chat_format.Message | tuple[str, str]:
    """A chat_format Message, or ("instructions", text) for a system or developer message."""
    where = f"messages[{index}]"
    _check_object(raw, MESSAGE_KEYS, f"{where} must be an object with 'role' and 'content'", f"{where} has unknown keys",
                  "a message")
    role = raw.get("role")
    if role not in ROLES:
        raise ValueError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
    if "content" not in raw:
        raise ValueError(f"{where} has no 'content'")
    content = _text(raw["content"], f"{where}.content")
    header = {key: _text(raw[key], f"{where}.{key}") for key in ("channel", "recipient", "name", "content_type")
              if raw.get(key) is not None}
    if role in ("system", "developer"):
        if header:
            raise ValueError(f"{where}: a {role} message takes only 'content', got {sorted(header)}")
        return ("instructions", content)
    if header.get("content_type") is not None and not header["content_type"].startswith("<|constrain|>"):
        header["content_type"] = "<|constrain|>" + header["content_type"]  # "json" -> <|constrain|>json
    if role == "assistant":
        header.setdefault("channel", "commentary" if "recipient" in header else "final")
    elif role == "tool":
        if "name" not in header:
            raise ValueError(f"{where}: a tool message needs 'name', the tool that answered (e.g. "
                             f"\"functions.get_weather\")")
        header.setdefault("channel", "commentary")
        header.setdefault("recipient", "assistant")
    return chat_format.Message(role, content, **header)


def conversation_from_record(record) -> chat_format.Conversation:
    """A record (one parsed JSONL line) as a chat_format Conversation. System and developer
    messages, which must come before the others, and the record's "developer" text become
    the developer instructions (the harmony system message is built from the
    conversation's settings); "tools" become function tools."""
    _check_object(record, RECORD_KEYS, "a record must be a JSON object with 'messages'", "unknown keys", "a record")
    raw_messages = record.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ValueError("'messages' must be a non-empty list of messages")
    instructions = [] if record.get("developer") is None else [_text(record["developer"], "'developer'")]
    messages = []
    for index, raw in enumerate(raw_messages):
        message = _message(raw, index)
        if isinstance(message, tuple):
            if messages:
                raise ValueError(f"messages[{index}]: system and developer messages must come before the "
                                 f"user, assistant and tool messages")
            instructions.append(message[1])
        else:
            messages.append(message)
    tools = record.get("tools") or []
    if not isinstance(tools, list):
        raise ValueError(f"'tools' must be a list of {{\"name\", \"description\", \"parameters\"}} objects, "
                         f"got {type(tools).__name__}")
    settings = {}
    if record.get("reasoning_effort") is not None:
        settings["reasoning_effort"] = record["reasoning_effort"]
    if record.get("current_date") is not None:
        settings["current_date"] = _text(record["current_date"], "'current_date'")
    return chat_format.Conversation(messages, developer_instructions="\n\n".join(instructions) or None,
                                    tools=[chat_format.FunctionTool.from_dict(tool) for tool in tools], **settings)


def example_from_record(record, *, line: int = 0, keep_analysis: bool = False) -> Example:
    conversation = conversation_from_record(record)
    rendered = chat_format.render_for_training(conversation, keep_analysis=keep_analysis)
    if not any(rendered.loss_mask):
        raise ValueError("the conversation has no assistant message to train on")
    return Example(np.asarray(rendered.tokens, np.int32), np.asarray(rendered.loss_mask, bool), line)


@dataclasses.dataclass
class Dataset:
    """The usable examples of a file and the records skipped, as (line, reason)."""

    path: Path
    examples: list[Example]
    skipped: list[tuple[int, str]]

    @property
    def loss_tokens(self) -> int:
        return sum(int(e.loss_mask[1:].sum()) for e in self.examples)


def read_dataset(path, *, max_length: int | None = None, keep_analysis: bool = False,
                 skip_bad_records: bool = False) -> Dataset:
    """The examples of a JSONL file. A bad record (not JSON, not a valid conversation, no
    assistant message, longer than `max_length` tokens) raises DataError naming its line,
    or with `skip_bad_records` is left out and listed in `skipped`. Blank lines are ignored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such training file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); give JSONL, one JSON "
                        f"object per line") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; give a JSONL file") from None
    examples, skipped = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
            example = example_from_record(record, line=number, keep_analysis=keep_analysis)
            if max_length is not None and example.length > max_length:
                raise ValueError(f"the conversation is {len(example.tokens)} tokens long; rows hold {max_length + 1} "
                                 f"(raise --seq-len or shorten the conversation)")
        except ValueError as e:
            reason = " ".join(str(e).split())
            if not skip_bad_records:
                raise DataError(f"{path}:{number}: {reason} (fix the record, or pass --skip-bad-records to skip "
                                f"bad records)") from None
            skipped.append((number, reason))
            continue
        examples.append(example)
    if not examples:
        what = f"all {len(skipped)} records are bad" if skipped else "it holds no records"
        raise DataError(f"{path}: no usable conversations ({what})")
    return Dataset(path, examples, skipped)


# ---------------------------------------------------------------------------- batches
def rows(examples: list[Example], seq_len: int, packing: bool) -> list[list[Example]]:
    """Examples grouped into rows of `seq_len` tokens: consecutive examples while they fit
    (packing), or one per row."""
    if not packing:
        return [[e] for e in examples]
    out, current, used = [], [], 0
    for example in examples:
        if current and used + example.length > seq_len:
            out.append(current)
            current, used = [], 0
        current.append(example)
        used += example.length
    return out + [current] if current else out


def make_batch(batch_rows: list[list[Example]], batch_size: int, seq_len: int, packing: bool) -> Batch:
    """A Batch of `batch_size` rows (rows beyond `batch_rows` are padding)."""
    tokens = np.full((batch_size, seq_len), PAD_TOKEN, np.int32)
    positions = np.full((batch_size, seq_len), NO_POSITION, np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    loss_mask = np.zeros((batch_size, seq_len), np.float32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    for r, row in enumerate(batch_rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            n = example.length
            tokens[r, start:start + n] = example.tokens[:-1]
            positions[r, start:start + n] = np.arange(n)
            targets[r, start:start + n] = example.tokens[1:]
            loss_mask[r, start:start + n] = example.loss_mask[1:]
            segment_ids[r, start:start + n] = segment
            start += n
    return batch_from_rows(tokens, positions, targets, loss_mask, segment_ids if packing else None)


class Batches:
    """The batches of a dataset, epoch after epoch, as a sequence indexed from 0: epoch e
    shuffles the examples with (seed, e) (unless `shuffle` is off), groups them into rows
    and rows into batches, the last batch filled up with padding rows. Batch i is the same
    in every run with the same data and settings, which is what makes a resumed run equal
    an uninterrupted one."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seq_len: int, packing: bool = True, seed: int = 0,
                 shuffle: bool = True):
        longest = max(e.length for e in dataset.examples)
        if longest > seq_len:
            raise ValueError(f"{dataset.path}: a conversation of {longest + 1} tokens does not fit rows of {seq_len} "
                             f"(+1) tokens; raise the sequence length")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        self._epoch_rows: dict[int, list[list[Example]]] = {}

    def epoch_rows(self, epoch: int) -> list[list[Example]]:
        if epoch not in self._epoch_rows:
            examples = list(self.dataset.examples)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(examples))
                examples = [examples[i] for i in order]
            self._epoch_rows = {epoch: rows(examples, self.seq_len, self.packing)}  # keep one epoch
        return self._epoch_rows[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        return -(-len(self.epoch_rows(epoch)) // self.batch_size)

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of batch `index`."""
        epoch = 0
        while index >= self.batches_in_epoch(epoch):
            index -= self.batches_in_epoch(epoch)
            epoch += 1
        return epoch, index

    def __getitem__(self, index: int) -> Batch:
        epoch, i = self.locate(index)
        chosen = self.epoch_rows(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        return make_batch(chosen, self.batch_size, self.seq_len, self.packing)

    def one_epoch(self) -> list[Batch]:
        """The batches of epoch 0 (evaluation: unshuffled when `shuffle` is off)."""
        return [self[i] for i in range(self.batches_in_epoch(0))]


def _check_object(raw, keys, not_object: str, unknown_keys: str, what: str) -> None:
    """ValueError unless `raw` is a dict whose keys are among `keys`."""
    if not isinstance(raw, dict):
        raise ValueError(f"{not_object}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ValueError(f"{unknown_keys} {unknown}; {what} may have {', '.join(keys)}")
