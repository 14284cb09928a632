"""The settings of sdclip's training runs: contrastive CLIP (``TrainConfig``, ``sdclip.train``) and
textual inversion (``InversionConfig``, ``sdclip.inversion``), and the embedding file formats a run
writes.  Plain data without torch: the command line builds its options from them without importing
torch, so that commands which need no model start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BadInput

if TYPE_CHECKING:
    from .model import TextConfig
    from .vision import VisionConfig

FORMATS = ("a1111", "safetensors", "diffusers")  # embedding files: A1111 .pt, emb_params safetensors, learned_embeds

# caption templates in the spirit of the textual-inversion paper's: the word as an object in varied photos
TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a picture of a {}",
    "a drawing of a {}",
    "a good photo of a {}",
    "a photo of one {}",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run (saved in the checkpoint; a resumed run uses it)."""

    data: str = "shapes"  # "shapes", a folder of image + .txt pairs, or a .tar of them
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    partial_captions: float = 0.0  # shapes data: share of captions naming only the shape or only the colour
    bootstrap_steps: int = 0  # shapes data: first steps with a frozen text tower and shape-only captions
    ema: float = 0.0  # decay of an exponential moving average of the weights, evaluated and saved (0: off)
    image_size: int = 64
    patch_size: int = 8
    patch_init: str = "whiten"  # "whiten": patch embedding PCA-whitens the data's patches; "clip": random
    vision_width: int = 256
    vision_layers: int = 4
    text_width: int = 256
    text_layers: int = 4
    embed_dim: int = 256
    activation: str = "quick_gelu"
    eval_every: int = 100  # zero-shot accuracy on the shapes' seen and held-out pairs (0: never)
    eval_images: int = 240  # per split
    checkpoint_every: int = 100
    save_dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "image_size",
            "patch_size",
            "vision_width",
            "vision_layers",
            "text_width",
            "text_layers",
            "embed_dim",
        ):
            if getattr(self, name) < 1:
                raise BadInput(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 1 or self.eval_every < 0 or self.eval_images < 1:
            raise BadInput("checkpoint_every and eval_images must be at least 1, eval_every at least 0")
        if self.batch_size < 2:
            raise BadInput("a contrastive batch needs at least 2 pairs")
        if self.lr <= 0 or self.warmup < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise BadInput("lr and grad_clip must be positive, warmup and weight_decay non-negative")
        if self.bootstrap_steps and (self.data != "shapes" or not 0 < self.bootstrap_steps < self.steps):
            raise BadInput(
                "bootstrap_steps needs the shapes data (captions that name shapes) and fewer steps than the run's"
            )
        if not 0 <= self.ema < 1:
            raise BadInput(f"ema is a decay per step, 0 (off) to below 1, got {self.ema}")
        if self.patch_init not in ("whiten", "clip"):
            raise BadInput(f"patch_init must be 'whiten' or 'clip', got {self.patch_init!r}")

    def towers(self) -> tuple[TextConfig, VisionConfig]:
        """The architecture: heads of 64 channels (at least one), MLPs 4x wide, CLIP's vocabulary
        and context of 77 so the text tower is an SD-style conditioner."""
        from .model import TextConfig
        from .vision import VisionConfig

        text = TextConfig(
            width=self.text_width,
            layers=self.text_layers,
            heads=max(self.text_width // 64, 1),
            mlp_width=4 * self.text_width,
            activation=self.activation,
            projection_dim=self.embed_dim,
        )
        vision = VisionConfig(
            width=self.vision_width,
            layers=self.vision_layers,
            heads=max(self.vision_width // 64, 1),
            mlp_width=4 * self.vision_width,
            image_size=self.image_size,
            patch_size=self.patch_size,
            activation=self.activation,
            projection_dim=self.embed_dim,
        )
        return text, vision


@dataclass(frozen=True)
class InversionConfig:
    """Everything that determines a run (saved in its checkpoint; a resumed run uses it)."""

    token: str = "<concept>"  # the new word as prompts write it (A1111 / ComfyUI call it by file name: the token
    # without <>, so it may hold no / or \ and may not be . or ..: the file stays inside the run folder)
    vectors: int = 1  # prompt positions the word takes
    init_word: str = "*"  # the vectors start as this word's token embeddings, repeated or averaged to fit
    templates: tuple[str, ...] = TEMPLATES  # "{}" = the word
    negatives: tuple[str, ...] = ()  # CLIP objective: names the word must beat on its images
    contrast: float = 1.0  # CLIP objective: weight of that cross-entropy (0: cosine only)
    steps: int = 200
    lr: float = 5e-3
    batch_size: int = 8  # templates per step
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if (
            not self.token
            or self.token != self.token.strip()
            or any(c.isspace() for c in self.token)
            or "{" in self.token
        ):
            raise BadInput(f"the token must be one word without spaces or braces, e.g. <my-thing>; got {self.token!r}")
        if any(c in self.name for c in "/\\\0") or self.name in (".", ".."):
            # the embedding file is named after the token: it must stay inside the run folder
            raise BadInput(
                f"the token {self.token!r} cannot name a file (its name is the token without <>): no / "
                f"or \\, and not . or .."
            )
        if not 1 <= self.vectors <= 64:
            raise BadInput(f"vectors must be 1 to 64 (they share the prompt's 75 positions), got {self.vectors}")
        if not self.init_word.strip():
            raise BadInput("the init word is empty; give a word that describes the concept roughly")
        if not self.templates:
            raise BadInput("no caption templates")
        for t in self.templates:
            if "{}" not in t or self.token in t:
                raise BadInput(f"template {t!r}: needs one '{{}}' where the word goes (and not the word itself)")
        for n in self.negatives:
            if not n.strip() or self.token in n:
                raise BadInput(f"negative {n!r}: a known name, not empty and without the new word")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise BadInput(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.contrast >= 0):
            raise BadInput("lr must be positive, weight_decay and contrast non-negative")

    @property
    def name(self) -> str:
        """The embedding's file name (how A1111 and ComfyUI call it): the token without angle brackets."""
        return self.token.strip("<>") or self.token

    def draw(self, step: int) -> list[int]:
        """The templates (indices) of ``step``'s ``batch_size`` prompts: drawn from the seed and the step alone."""
        import numpy as np

        return np.random.default_rng([self.seed, step]).integers(len(self.templates), size=self.batch_size).tolist()
