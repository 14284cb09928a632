"""The CLIP image tower (a ViT): pixels in, one embedding per image out.

pixels [B, 3, S, S] -> a patch convolution (stride = patch, no bias) -> [B, grid², W]; a learned
class token in front; + position embedding; a LayerNorm before the blocks ("pre_layrnorm" in
transformers); the text tower's residual blocks without the causal mask; a LayerNorm on the
class token; a projection (no bias) into the space the text tower projects to.

A pure module: ``sdclip.checkpoint`` finds, infers and reads image towers as it does text towers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import BadInput
from .model import ACTIVATIONS, Block


@dataclass(frozen=True)
class VisionConfig:
    """Architecture of one image tower; ``checkpoint.infer`` reads it from tensor shapes."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    image_size: int = 224
    patch_size: int = 32
    activation: str = "quick_gelu"
    projection_dim: int = 512  # 0: no projection (transformers' CLIPVisionModel)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise BadInput(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.width % self.heads:
            raise BadInput(f"width {self.width} is not divisible by {self.heads} heads")
        if self.image_size % self.patch_size:
            raise BadInput(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


@dataclass
class VisionOutput:
    """``hidden`` [B, 1 + grid², W]: the last block's output before the final LN (transformers'
    ``last_hidden_state``); ``pooled`` [B, W]: the final-LN'd class token; ``embeds`` [B, P]: its
    projection, when the tower has one."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    embeds: torch.Tensor | None = None


class VisionTransformer(nn.Module):
    """One CLIP image tower.  Frozen like the text tower: training unfreezes it explicitly."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        w, p = config.width, config.patch_size
        self.patch_embedding = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.position_embedding = nn.Parameter(torch.empty(config.grid**2 + 1, w))
        self.pre_norm = nn.LayerNorm(w, eps=1e-5)
        self.blocks = nn.ModuleList(Block(config, causal=False) for _ in range(config.layers))  # type: ignore[arg-type]
        self.post_norm = nn.LayerNorm(w, eps=1e-5)
        self.projection = nn.Linear(w, config.projection_dim, bias=False) if config.projection_dim else None
        self.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> VisionOutput:
        """Encode [B, 3, S, S] pixel values, preprocessed as ``sdclip.images`` does."""
        s = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise BadInput(f"pixel values must be [batch, 3, {s}, {s}] for this model, got {tuple(pixels.shape)}")
        x = self.patch_embedding(pixels.to(self.class_embedding.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.position_embedding
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        pooled = self.post_norm(x[:, 0])
        return VisionOutput(x, pooled, self.projection(pooled) if self.projection is not None else None)

    def init_weights(self, generator: torch.Generator | None = None) -> VisionTransformer:
        """Random weights in CLIP's scheme (for tests and training from scratch)."""
        c = self.config
        scale = c.width**-0.5
        proj_std = scale * (2 * c.layers) ** -0.5
        with torch.no_grad():
            nn.init.normal_(self.patch_embedding.weight, std=(3 * c.patch_size**2) ** -0.5, generator=generator)
            nn.init.normal_(self.class_embedding, std=scale, generator=generator)
            nn.init.normal_(self.position_embedding, std=scale, generator=generator)
            for ln in (self.pre_norm, self.post_norm):
                ln.weight.fill_(1.0), ln.bias.zero_()
            for block in self.blocks:
                for ln in (block.ln_1, block.ln_2):
                    ln.weight.fill_(1.0), ln.bias.zero_()
                nn.init.normal_(block.attn.qkv.weight, std=scale, generator=generator)
                nn.init.normal_(block.attn.out.weight, std=proj_std, generator=generator)
                nn.init.normal_(block.mlp.fc.weight, std=(2 * c.width) ** -0.5, generator=generator)
                nn.init.normal_(block.mlp.proj.weight, std=proj_std, generator=generator)
                for lin in (block.attn.qkv, block.attn.out, block.mlp.fc, block.mlp.proj):
                    lin.bias.zero_()
            if self.projection is not None:
                nn.init.normal_(self.projection.weight, std=scale, generator=generator)
        return self
