"""Tiny text encoders for the conditioning tests: sdclip towers built in memory (no files), and the
transformers configs the peer tests build their models from."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig

import sdclip
from sdclip.checkpoint import Usage
from sdclip.model import TextConfig, TextTransformer

TOK = sdclip.Tokenizer()
CLIP_L, BIG_G = 49407, 0  # pad ids: CLIP-L pads with EOS, OpenCLIP H / bigG with 0
DEFAULTS = {
    "sd1": Usage(-1, True),
    "clip": Usage(-1, True),
    "sd2": Usage(-2, True),
    "sdxl": Usage(-2, False),
    "sdxl-refiner": Usage(-2, False),
    "sd3": Usage(-2, False),
}


def tower(width: int = 64, layers: int = 3, projection: int = 0, pad: int = CLIP_L, seed: int = 0) -> TextTransformer:
    """A random sdclip tower in CLIP's initialisation, LayerNorms and biases randomised too."""
    g = torch.Generator().manual_seed(seed)
    config = TextConfig(width=width, layers=layers, heads=4, mlp_width=2 * width, projection_dim=projection, pad_id=pad)
    t = TextTransformer(config).init_weights(g)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "bias" in name or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return t


def encoder(
    family: str = "sd1",
    widths: tuple[int, ...] = (64,),
    layers: int = 3,
    seed: int = 0,
    usages: list[Usage] | None = None,
) -> sdclip.TextEncoder:
    """A TextEncoder of the family's shape: SDXL = a CLIP-L-like tower (EOS padding) + a bigG-like one with a
    projection (pad 0); SD2 pads with 0."""
    pads = {"sdxl": (CLIP_L, BIG_G), "sd3": (CLIP_L, BIG_G), "sd2": (BIG_G,), "sdxl-refiner": (BIG_G,)}
    pads_for = pads.get(family, (CLIP_L,) * len(widths))
    projections = {"sdxl": (0, 1), "sd3": (1, 1), "sdxl-refiner": (1,)}.get(family, (0,) * len(widths))
    towers = [
        tower(w, layers, w * p, pad, seed + i) for i, (w, pad, p) in enumerate(zip(widths, pads_for, projections))
    ]
    return sdclip.TextEncoder(towers, usages or [DEFAULTS[family]] * len(towers), [TOK] * len(towers), family)


def hf_config(width: int = 64, layers: int = 3, projection: int = 0, act: str = "quick_gelu") -> CLIPTextConfig:
    """A transformers text config with the full CLIP vocabulary and context (eos id 49407: first-EOS pooling)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
