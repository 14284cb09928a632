"""sdclip: the CLIP text encoder Stable Diffusion uses, exact and fast.

    >>> import sdclip
    >>> te = sdclip.load("v1-5-pruned-emaonly.safetensors")   # any layout, only the text encoder is read
    >>> out = te.encode(["a photo of a cat"])                  # SD1: last layer + final LN
    >>> out.hidden.shape, out.pooled.shape
    (torch.Size([1, 77, 768]), torch.Size([1, 768]))
"""

from .cachefile import open_cache
from .checkpoint import CheckpointInfo, Usage
from .clip import CLIPModel
from .conditioning import Conditioner, Conditioning, Encoded, encode_prompts, layer_for
from .embeddings import Embedding, load_embeddings, read_embedding, save_embedding
from .encoder import TextEncoder, load
from .errors import BadInput, SdclipError
from .inversion import PromptBatch, train_embedding
from .model import TextConfig, TextOutput, TextTransformer
from .tokenizer import Token, Tokenizer

__version__ = "0.1.0"
__all__ = ["load", "TextEncoder", "Tokenizer", "Token", "TextConfig", "TextTransformer", "TextOutput",
           "CheckpointInfo", "Usage", "SdclipError", "BadInput", "__version__", "encode_prompts", "Conditioner",
           "Conditioning", "Encoded", "layer_for", "Embedding", "read_embedding", "load_embeddings", "save_embedding",
           "train_embedding", "PromptBatch", "CLIPModel", "open_cache"]
