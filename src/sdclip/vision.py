"""The CLIP image tower (a ViT): pixels in, one embedding per image out.

pixels [B, 3, S, S] -> a patch convolution (stride = patch, no bias) -> [B, grid², W]; a learned
class token in front; + position embedding; a LayerNorm before the blocks ("pre_layrnorm" in
transformers); the text tower's residual blocks without the causal mask; a LayerNorm on the
class token; a projection (no bias) into the space the text tower projects to.

Both layouts that carry an image tower are read here: Hugging Face ``vision_model.*`` +
``visual_projection.weight`` and OpenAI / open_clip ``visual.*``.  ``VISION_NAMES`` maps their
names to sdclip's, as ``checkpoint.NAMES`` does for the text tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import BLOCK_INDEX, BLOCK_NAMES, block_shapes, foreign_names, read_checked, read_projection
from .errors import BadInput
from .model import ACTIVATIONS, Block
from .tensorfile import TensorFile


@dataclass(frozen=True)
class VisionConfig:
    """Architecture of one image tower; ``infer_vision_config`` reads it from tensor shapes."""

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
        self.position_embedding = nn.Parameter(torch.empty(config.grid ** 2 + 1, w))
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

    def init_weights(self, generator: torch.Generator | None = None) -> "VisionTransformer":
        """Random weights in CLIP's scheme (for tests and training from scratch)."""
        c = self.config
        scale = c.width ** -0.5
        proj_std = scale * (2 * c.layers) ** -0.5
        with torch.no_grad():
            nn.init.normal_(self.patch_embedding.weight, std=(3 * c.patch_size ** 2) ** -0.5, generator=generator)
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


# --- reading an image tower from a checkpoint ------------------------------------------------

# sdclip name -> name in each layout, relative to the tower's prefix (``vision_model.`` /
# ``visual.``); a tuple is concatenated on dim 0.  The projection sits apart (see ``_projection``).
VISION_NAMES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "hf": {
        "patch_embedding.weight": "embeddings.patch_embedding.weight",
        "class_embedding": "embeddings.class_embedding",
        "position_embedding": "embeddings.position_embedding.weight",
        "pre_norm.{p}": "pre_layrnorm.{p}",  # sic
        **BLOCK_NAMES["hf"],
        "post_norm.{p}": "post_layernorm.{p}",
    },
    "openclip": {
        "patch_embedding.weight": "conv1.weight",
        "class_embedding": "class_embedding",
        "position_embedding": "positional_embedding",
        "pre_norm.{p}": "ln_pre.{p}",
        **BLOCK_NAMES["openclip"],
        "post_norm.{p}": "ln_post.{p}",
    },
}


@dataclass
class VisionTower:
    """Where an image tower sits in a file: its naming style and key prefix."""

    style: str  # "hf" or "openclip"
    prefix: str
    file: TensorFile

    def key(self, name: str) -> str:
        """The file's key for one sdclip parameter name (a single tensor)."""
        return self.prefix + foreign_names(self.style, name, VISION_NAMES)[0]

    def projection(self) -> tuple[str, bool] | None:
        """The projection's key and whether it is a Linear weight [out, in] (HF) rather than
        OpenAI's [width, out] used as x @ P."""
        if self.style == "hf":
            base = self.prefix[: -len("vision_model.")] if self.prefix.endswith("vision_model.") else self.prefix
            key = base + "visual_projection.weight"
            return (key, True) if key in self.file.keys() else None
        key = self.prefix + "proj"
        return (key, False) if key in self.file.keys() else None


def find_vision_tower(file: TensorFile) -> VisionTower | None:
    """The image tower in ``file``, if it holds one (a CLIP model does; an SD checkpoint does not)."""
    keys = set(file.keys())
    for key in file.keys():
        if key.endswith("embeddings.patch_embedding.weight"):
            return VisionTower("hf", key[: -len("embeddings.patch_embedding.weight")], file)
        if key.endswith("conv1.weight"):
            prefix = key[: -len("conv1.weight")]
            if prefix + "class_embedding" in keys and prefix + "transformer.resblocks.0.attn.in_proj_weight" in keys:
                return VisionTower("openclip", prefix, file)
    return None


def infer_vision_config(tower: VisionTower, hf_config: dict | None = None,
                        activation: str = "quick_gelu") -> VisionConfig:
    """The architecture from tensor shapes; ``hf_config`` (a transformers ``vision_config``)
    supplies heads and activation where present, else width / 64 heads and ``activation`` (the
    text tower's: both towers of a CLIP model use the same)."""
    f, p = tower.file, tower.prefix
    for name in ("patch_embedding.weight", "position_embedding", "blocks.0.mlp.fc.weight"):
        if tower.key(name) not in f.keys():
            raise BadInput(f"{f.path}: missing tensor {tower.key(name)}")
    conv = f.shape(tower.key("patch_embedding.weight"))
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise BadInput(f"{f.path}: {tower.key('patch_embedding.weight')} has shape {list(conv)}, "
                       f"expected [width, 3, patch, patch]")
    width, patch = conv[0], conv[2]
    tokens = f.shape(tower.key("position_embedding"))[0] - 1
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens or grid == 0:
        raise BadInput(f"{f.path}: {tower.key('position_embedding')} has {tokens + 1} rows; expected 1 + a square "
                       f"number of patches")
    blocks = {int(m.group(1)) for k in f.keys() if k.startswith(p) and (m := BLOCK_INDEX[tower.style].match(k[len(p):]))}
    if not blocks or blocks != set(range(len(blocks))):
        raise BadInput(f"{f.path}: the image tower at '{p}' has blocks {sorted(blocks)}; some are missing")
    projection = 0
    found = tower.projection()
    if found is not None:
        shape = f.shape(found[0])
        if len(shape) != 2:
            raise BadInput(f"{f.path}: tensor {found[0]} has shape {list(shape)}, expected a 2-d projection")
        projection = shape[0] if found[1] else shape[1]
    hf_config = hf_config or {}
    return VisionConfig(width=width, layers=len(blocks), heads=hf_config.get("num_attention_heads") or max(width // 64, 1),
                        mlp_width=f.shape(tower.key("blocks.0.mlp.fc.weight"))[0], image_size=grid * patch,
                        patch_size=patch, activation=hf_config.get("hidden_act") or activation,
                        projection_dim=projection)


def _vision_shapes(c: VisionConfig) -> dict[str, tuple[int, ...]]:
    w = c.width
    return {"patch_embedding.weight": (w, 3, c.patch_size, c.patch_size), "class_embedding": (w,),
            "position_embedding": (c.grid ** 2 + 1, w), "pre_norm.weight": (w,), "pre_norm.bias": (w,),
            "post_norm.weight": (w,), "post_norm.bias": (w,), **block_shapes(c.layers, w, c.mlp_width)}


def read_vision_tower(tower: VisionTower, config: VisionConfig, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> VisionTransformer:
    """Build the tower's ``VisionTransformer``, checking every name, shape and value."""
    f, p, what = tower.file, tower.prefix, f"a {config.layers}-layer width-{config.width} image encoder"
    state: dict[str, torch.Tensor] = {}
    for name, shape in _vision_shapes(config).items():
        state[name] = read_checked(f, [p + n for n in foreign_names(tower.style, name, VISION_NAMES)], shape,
                                    dtype, what)
    found = tower.projection()
    if config.projection_dim and found is not None:
        state["projection.weight"] = read_projection(f, found, config.width, config.projection_dim, dtype)
    with torch.device("meta"):
        model = VisionTransformer(config)
    model.load_state_dict(state, assign=True)
    return model.to(device)
