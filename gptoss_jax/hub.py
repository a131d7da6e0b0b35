"""Turns a `--checkpoint` argument into a local directory: a directory as given, or a Hugging
Face repo id ("openai/gpt-oss-20b") taken from the local Hugging Face cache, or downloaded
with `huggingface_hub` when online. Only the files the loader reads are fetched."""

from __future__ import annotations

import re
from pathlib import Path

from gptoss_jax.config import PRESETS

# The HF layout (config, index, shards); the original/ and metal/ copies are not needed.
HF_LAYOUT_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json",
                   "generation_config.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class CheckpointNotFound(ValueError):
    pass


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.fullmatch(name)) and not name.startswith((".", "/", "~"))


def resolve_checkpoint(name: str, *, log=print) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(name):
        raise CheckpointNotFound(f"checkpoint directory not found: {name} (give a local directory, a Hugging Face "
                                 f"repo id such as openai/gpt-oss-20b, or a preset for random weights: "
                                 f"{', '.join(PRESETS)})")
    return Path(_from_hub(name, log))


def _from_hub(repo_id: str, log) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise CheckpointNotFound(f"'{repo_id}' is not a local directory, and huggingface_hub is not installed "
                                 "to download it (pip install huggingface_hub)") from None
    try:  # the local HF cache first: works offline and never touches the network
        return snapshot_download(repo_id, allow_patterns=HF_LAYOUT_FILES, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if _offline():
        raise CheckpointNotFound(f"'{repo_id}' is neither a local directory nor in the local Hugging Face cache, "
                                 "and HF_HUB_OFFLINE is set; download it elsewhere and pass its directory")
    log(f"note: downloading {repo_id} from the Hugging Face Hub (HF layout only)")
    try:
        return snapshot_download(repo_id, allow_patterns=HF_LAYOUT_FILES)
    except RepositoryNotFoundError:
        raise CheckpointNotFound(f"no Hugging Face repo '{repo_id}' (or it is private: log in with "
                                 "`huggingface-cli login`), and no local directory of that name") from None
    except GatedRepoError:
        raise CheckpointNotFound(f"Hugging Face repo '{repo_id}' is gated: accept its terms on the Hub "
                                 "and log in with `huggingface-cli login`") from None
    except LocalEntryNotFoundError:
        raise CheckpointNotFound(f"cannot download '{repo_id}': the Hugging Face Hub is unreachable "
                                 "(offline, or HF_HUB_OFFLINE=1) and the repo is not in the local cache; "
                                 "download it elsewhere and pass its directory") from None
    except Exception as e:  # network stack errors differ between huggingface_hub versions
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointNotFound(f"cannot download '{repo_id}' from the Hugging Face Hub: {reason}") from None


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)
