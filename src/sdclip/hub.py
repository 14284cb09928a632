"""Hugging Face repo ids (``openai/clip-vit-large-patch14``, SD pipeline repos) through the hub cache.

Only an explicit repo id ever touches the network; with ``HF_HUB_OFFLINE=1`` the cache alone
answers.  huggingface_hub is an optional dependency.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import SdclipError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# what a text encoder needs from a CLIP repo or a diffusers pipeline repo, nothing more
_PATTERNS = [
    "model_index.json", "config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
    "tokenizer*/*.json", "tokenizer*/*.txt", "text_encoder/*.json", "text_encoder_2/*.json",
]
_SAFETENSORS = ["model.safetensors", "text_encoder/model*.safetensors", "text_encoder_2/model*.safetensors"]
_PICKLES = ["pytorch_model.bin", "text_encoder/pytorch_model*.bin", "text_encoder_2/pytorch_model*.bin"]


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source)) and not Path(source).exists()


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("text_encoder*/*"))


def resolve(repo_id: str, revision: str | None = None) -> Path:
    """The local folder holding ``repo_id``'s text-encoder files, downloading them if allowed."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise SdclipError(f"{repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is not installed: "
                          f"pip install huggingface_hub, or pass a local file or folder") from None
    how = (f"on a machine that reaches the hub run `huggingface-cli download {repo_id} --include "
           f"'text_encoder*/*' 'tokenizer*/*' '*.json' 'model.safetensors' 'vocab.json' 'merges.txt'` and copy "
           f"the cache (~/.cache/huggingface/hub) here, or pass a local file or folder")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS + _SAFETENSORS))
        if not _has_weights(folder):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS + _PICKLES))
    except LocalEntryNotFoundError:
        raise SdclipError(f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached "
                          f"(HF_HUB_OFFLINE is set or there is no network): {how}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SdclipError(f"cannot fetch {repo_id} from the Hugging Face hub ({e}); {how}") from None
    return folder
