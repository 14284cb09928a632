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
    "model_index.json",
    "config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer*/*.json",
    "tokenizer*/*.txt",
    "text_encoder/*.json",
    "text_encoder_2/*.json",
]
# weights, best first (the order of encoder.WEIGHT_FILES): a group is fetched only when those
# before it brought none, so a repo with fp32 and fp16 copies costs one download
_WEIGHTS = [
    [d + name for d in ("", "text_encoder/", "text_encoder_2/") for name in names]
    for names in (
        ("model.safetensors", "model-*-of-*.safetensors", "open_clip_model.safetensors"),
        ("model.fp16.safetensors", "model.fp16-*-of-*.safetensors"),
        ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.fp16.bin", "open_clip_pytorch_model.bin"),
    )
]


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source)) and not Path(source).exists()


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for group in _WEIGHTS for pattern in group)


def resolve(repo_id: str, revision: str | None = None) -> Path:
    """The local folder holding ``repo_id``'s text-encoder files, downloading them if allowed."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise SdclipError(
            f"{repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is not installed: "
            f"pip install huggingface_hub, or pass a local file or folder"
        ) from None
    how = (
        f"on a machine that reaches the hub run `hf download {repo_id} --include 'text_encoder/*' "
        f"'text_encoder_2/*' 'tokenizer*/*' '*.json' 'model.safetensors' 'vocab.json' 'merges.txt'` "
        f"(`huggingface-cli download` before huggingface_hub 0.34) and copy the cache "
        f"(~/.cache/huggingface/hub, or $HF_HUB_CACHE) here, or pass a local file or folder"
    )
    try:
        for group in _WEIGHTS:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS + group))
            if _has_weights(folder):
                return folder
    except LocalEntryNotFoundError:
        raise SdclipError(
            f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE is set or there is no network): {how}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SdclipError(f"cannot fetch {repo_id} from the Hugging Face hub ({e}); {how}") from None
    # offline, a cached snapshot is returned whatever it holds: e.g. only the configs another tool fetched
    raise SdclipError(
        f"{repo_id}: the cached snapshot {folder} holds no text-encoder weights (model*.safetensors "
        f"or pytorch_model*.bin at its root or in text_encoder/, text_encoder_2/); {how}"
    )
