"""The Stable Diffusion families as one table: how a file of each family is recognised and what its U-Net reads.

A row says where a family's towers sit in a single file (key prefix and tower roles by width) or which diffusers
pipeline class holds them, the hidden state each tower feeds the U-Net by default, which encoders feed the U-Net
and which the pooled vector, and the family facts front ends act on (A1111's clip-skip numbering, zero
negatives).  Adding a family or a layout is one row here plus its fixtures in ``tests/layouts.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Usage:
    """Which hidden state a family feeds its U-Net: a Python-style layer index, final LN or not."""

    layer: int = -1
    final_norm: bool = True


@dataclass(frozen=True)
class Architecture:
    """A CLIP text tower known by its width: its role name, what it is, and what its files leave unsaid."""

    role: str  # how embeddings files and ``sdclip info`` name it
    description: str
    name: str  # its common name (``TextConfig.architecture``) ...
    layers: tuple[int, ...]  # ... when it has one of these depths
    activation: str  # OpenAI / HF towers (B, L) use quick_gelu, OpenCLIP ones (H, bigG) gelu
    pad_id: int  # ... and pad with EOS or with 0


# The one width-to-architecture table: the tower's width says which CLIP text tower it is.
ARCHITECTURES: dict[int, Architecture] = {
    512: Architecture("clip_b", "CLIP ViT-B", "CLIP ViT-B", (12,), "quick_gelu", 49407),
    768: Architecture(
        "clip_l", "CLIP ViT-L/14 (SD 1.x; SDXL's first encoder)", "CLIP ViT-L/14", (12,), "quick_gelu", 49407
    ),
    1024: Architecture("clip_h", "OpenCLIP ViT-H/14 (SD 2.x)", "OpenCLIP ViT-H/14", (24, 23), "gelu", 0),
    1280: Architecture(
        "clip_g", "OpenCLIP ViT-bigG/14 (SDXL's second encoder)", "OpenCLIP ViT-bigG/14", (32,), "gelu", 0
    ),
}


def architecture(width: int) -> Architecture:
    """The architecture of a tower of this width (an unknown width: named by it, OpenAI-style defaults)."""
    return ARCHITECTURES.get(width) or Architecture(
        f"clip_{width}",
        "a CLIP text encoder of that width",
        f"CLIP text tower (width {width})",
        (),
        "quick_gelu",
        49407,
    )


@dataclass(frozen=True)
class Family:
    """One Stable Diffusion family (or plain CLIP): how its files look and what its U-Net reads."""

    name: str
    prefix: str | None  # where a single file keeps its text towers (None: no single-file layout)
    roles: tuple[str, ...] | None  # the towers there, by width (None: any)
    layout: str | None  # what ``sdclip info`` calls such a single file
    pipeline: str | None  # a diffusers pipeline class name holding this marker is this family
    usage: Usage  # the hidden state each tower feeds the U-Net
    trimmed: Usage | None  # ... when the tower was saved without its unused last block (None: as ``usage``)
    unet: tuple[int, ...]  # encoders whose hidden states the U-Net reads, joined on the channel axis
    pooled: tuple[int, ...]  # encoders whose projected pooled output the U-Net reads
    clip_skip_base: int  # the default layer in "1 = last layer" numbering (A1111, ComfyUI)
    a1111_clip_skip: bool  # A1111 applies its clip-skip setting to this family (it ignores it for SD2 and SDXL)
    a1111_zero_negative: bool  # A1111 encodes an empty negative prompt as zeros
    force_zeros_for_empty_prompt: bool  # diffusers' pipeline encodes a missing negative prompt as zeros


_LAST = Usage(-1, True)
_PENULTIMATE_RAW = Usage(-2, False)
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd1",
            "cond_stage_model.",
            ("clip_l",),
            "SD1 single file",
            None,
            _LAST,
            None,
            (1,),
            (),
            1,
            True,
            False,
            False,
        ),
        # SD2 reads the 23rd of OpenCLIP-H's 24 blocks: the penultimate of a full tower, the last of diffusers'
        # 23-layer one and of a kohya file once its placeholder 24th block is left out
        Family(
            "sd2",
            "cond_stage_model.",
            ("clip_h",),
            "SD2 single file",
            None,
            Usage(-2, True),
            _LAST,
            (1,),
            (),
            2,
            False,
            False,
            False,
        ),
        Family(
            "sdxl",
            "conditioner.embedders.",
            ("clip_l", "clip_g"),
            "SDXL single file",
            "XL",
            _PENULTIMATE_RAW,
            None,
            (1, 2),
            (2,),
            2,
            False,
            True,
            True,
        ),
        Family(
            "sdxl-refiner",
            "conditioner.embedders.",
            ("clip_g",),
            "SDXL refiner single file",
            "XL",
            _PENULTIMATE_RAW,
            None,
            (1,),
            (1,),
            2,
            False,
            True,
            False,
        ),
        Family(
            "sd3",
            "text_encoders.",
            None,
            "SD3-style text_encoders.* file",
            "StableDiffusion3",
            _PENULTIMATE_RAW,
            None,
            (1, 2),
            (1, 2),
            2,
            False,
            False,
            False,
        ),
        Family("clip", None, None, None, None, _LAST, None, (1,), (), 1, True, False, False),
    )
}
CLIP = FAMILIES["clip"]  # what a file that fits no Stable Diffusion family is


def family(name: str) -> Family:
    """The table row of a family name (``TextEncoder.family``)."""
    return FAMILIES[name]


def of_file(prefixes: Sequence[str], roles: Sequence[str]) -> Family:
    """The family of a single file, from where its towers sit (key prefixes) and their roles."""
    for f in FAMILIES.values():
        if (
            f.prefix is not None
            and all(p.startswith(f.prefix) for p in prefixes)
            and (f.roles is None or tuple(roles) == f.roles)
        ):
            return f
    return CLIP


def of_pipeline(pipeline: str, roles: Sequence[str]) -> Family:
    """The family of a diffusers folder: its pipeline class (the tower count tells families of one class
    apart), else its towers' roles."""
    marked = [f for f in FAMILIES.values() if f.pipeline is not None and f.pipeline in pipeline]
    if marked:
        return next((f for f in marked if f.roles is not None and len(f.roles) == len(roles)), marked[-1])
    return next((f for f in FAMILIES.values() if f.pipeline is None and f.roles == tuple(roles)), CLIP)
