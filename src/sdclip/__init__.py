"""sdclip: the CLIP text encoder Stable Diffusion uses, exact and fast.

    >>> import sdclip
    >>> te = sdclip.load("v1-5-pruned-emaonly.safetensors")   # any layout, only the text encoder is read
    >>> out = te.encode(["a photo of a cat"])                  # SD1: last layer + final LN
    >>> out.hidden.shape, out.pooled.shape
    (torch.Size([1, 77, 768]), torch.Size([1, 768]))

The public names are imported on first use (PEP 562): ``import sdclip`` and the tokenizer never
import torch, so that ``sdclip tokenize`` answers in a fraction of a second.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
    from .cachefile import open_cache
    from .checkpoint import CheckpointInfo, Usage
    from .clip import CLIPModel
    from .conditioning import Conditioner, Conditioning, Encoded, encode_many, encode_prompts, layer_for
    from .embeddings import Embedding, load_embeddings, read_embedding, save_embedding
    from .encoder import TextEncoder, load
    from .errors import BadInput, SdclipError
    from .inversion import PromptBatch, train_embedding
    from .model import TextConfig, TextOutput, TextTransformer
    from .tokenizer import Token, Tokenizer

__version__ = "0.1.0"
# public name -> the module that defines it
_HOMES = {
    "CheckpointInfo": "checkpoint",
    "Usage": "checkpoint",
    "CLIPModel": "clip",
    "Conditioner": "conditioning",
    "Conditioning": "conditioning",
    "Encoded": "conditioning",
    "encode_prompts": "conditioning",
    "encode_many": "conditioning",
    "layer_for": "conditioning",
    "Embedding": "embeddings",
    "load_embeddings": "embeddings",
    "read_embedding": "embeddings",
    "save_embedding": "embeddings",
    "TextEncoder": "encoder",
    "load": "encoder",
    "BadInput": "errors",
    "SdclipError": "errors",
    "PromptBatch": "inversion",
    "train_embedding": "inversion",
    "TextConfig": "model",
    "TextOutput": "model",
    "TextTransformer": "model",
    "Token": "tokenizer",
    "Tokenizer": "tokenizer",
    "open_cache": "cachefile",
}
__all__ = [
    "load",
    "TextEncoder",
    "Tokenizer",
    "Token",
    "TextConfig",
    "TextTransformer",
    "TextOutput",
    "CheckpointInfo",
    "Usage",
    "SdclipError",
    "BadInput",
    "__version__",
    "encode_prompts",
    "encode_many",
    "Conditioner",
    "Conditioning",
    "Encoded",
    "layer_for",
    "Embedding",
    "read_embedding",
    "load_embeddings",
    "save_embedding",
    "train_embedding",
    "PromptBatch",
    "CLIPModel",
    "open_cache",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here; submodules
    (``sdclip.accel``, ``sdclip.cache``, ...) are imported on first use as well."""
    if name in _HOMES:
        value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'sdclip' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'sdclip' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
