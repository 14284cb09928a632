"""Contrastive CLIP: the text tower, the image tower and the temperature that relates them.

Both towers project into one space; a caption and an image match when their normalized
embeddings point the same way.  ``CLIPModel`` encodes either side, scores them against each
other, classifies images zero-shot from label names, retrieves in both directions, and reads
and writes full CLIP checkpoints (the Hugging Face ``CLIPModel`` layout, and OpenAI / open_clip
state dicts with ``visual.*``).
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import bundled
from .atomic import write_safetensors, write_text
from .checkpoint import KINDS, CheckpointInfo, build, find_towers, foreign_names, infer
from .embeddings import EmbeddingSource, inject, token_table
from .encoder import _dtype, _read_json
from .encoder import load as load_text
from .errors import BadInput
from .images import MEAN, STD, ImageLike, pixel_values
from .loss import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, logits
from .model import TextConfig, TextTransformer
from .tensorfile import open_tensor_file
from .tokenizer import Tokenizer
from .vision import VisionConfig, VisionTransformer

Texts = Union[str, Sequence[str], torch.Tensor]
Images = Union[ImageLike, Sequence[ImageLike], torch.Tensor]
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def check_templates(templates: Sequence[str]) -> None:
    """A template holds exactly one ``{}`` (where the label or word goes) and no other format field."""
    for t in templates:
        try:
            fields = [name for _, name, spec, _ in string.Formatter().parse(t) if name is not None]
        except ValueError as e:
            raise BadInput(f"template {t!r}: {e} (write a literal brace as {{{{ or }}}})") from None
        if not fields:
            raise BadInput(f"template {t!r} has no '{{}}' for the label")
        if fields != [""]:
            raise BadInput(
                f"template {t!r} must hold exactly one '{{}}' for the label, and no other {{...}} field "
                f"(it has {len(fields)}: {', '.join('{' + f + '}' for f in fields)})"
            )


class CLIPModel(nn.Module):
    """A text tower and an image tower with equal projection widths, and ``logit_scale``.

    Frozen for inference like the towers; a trainer unfreezes it with ``requires_grad_(True)``.
    """

    def __init__(
        self,
        text: TextTransformer,
        vision: VisionTransformer,
        logit_scale: float = INIT_LOGIT_SCALE,
        tokenizer: Tokenizer | None = None,
        info: CheckpointInfo | None = None,
    ):
        super().__init__()
        t, v = text.config.projection_dim, vision.config.projection_dim
        if not t or t != v:
            raise BadInput(
                f"the text and image towers must project to the same width; got text {t or 'none'}, image {v or 'none'}"
            )
        self.text = text
        self.vision = vision
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=False)
        self.tokenizer = tokenizer or Tokenizer()
        self.info = info

    # --- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, text_config: TextConfig, vision_config: VisionConfig, seed: int = 0) -> CLIPModel:
        """A randomly initialised model (CLIP's scheme), reproducible from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        return cls(TextTransformer(text_config).init_weights(g), VisionTransformer(vision_config).init_weights(g))

    @classmethod
    def load(
        cls,
        source: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        tokenizer_mode: str = "hf",
    ) -> CLIPModel:
        """A full CLIP checkpoint: a Hugging Face CLIPModel folder, hub id or safetensors file, or an
        OpenAI / open_clip state dict (no source, or ``"sdclip-mini"``: the model bundled with
        sdclip).  The text tower is read by ``sdclip.load``."""
        source = bundled.resolve(source)
        te = load_text(source, dtype=dtype, device=device, tokenizer_mode=tokenizer_mode)
        if len(te.towers) != 1:
            raise BadInput(f"{source}: holds {len(te.towers)} text encoders; a CLIP model has one")
        assert te.info is not None
        path = Path(te.info.files[0])
        vision_config = None
        if Path(source).is_dir() or not Path(source).exists():  # a folder or hub id: config.json beside the weights
            config_file = path.parent / "config.json"
            config = _read_json(config_file) if config_file.is_file() else {}
            vision_config = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else None
        with open_tensor_file(path) as f:
            found = find_towers(f, "image")
            if not found:
                raise BadInput(
                    f"{source}: no CLIP image tower (looked for '*vision_model.*' and OpenAI 'visual.*' "
                    f"tensors); for a text encoder alone use sdclip.load"
                )
            # both towers of a CLIP model use one activation: the text tower's, unless the config says
            hints = {
                "hidden_act": te.towers[0].config.activation,
                **{k: v for k, v in (vision_config or {}).items() if v},
            }
            tower = infer(found[0], hints)
            vision = build(tower, _dtype(dtype), device)
            base = (
                tower.prefix.removesuffix(KINDS["image"].hf_prefix)
                if tower.style == "hf"
                else tower.prefix.removesuffix("visual.")
            )
            scale = float(f.get(base + "logit_scale")) if base + "logit_scale" in f.keys() else MAX_LOGIT_SCALE
        return cls(te.towers[0], vision, scale, te.tokenizers[0], te.info).to(device)

    def save(self, folder: str | Path, dtype: str | torch.dtype = "float16") -> Path:
        """Write a Hugging Face ``CLIPModel`` folder (model.safetensors, config.json, tokenizer and
        image-processor files) that both ``CLIPModel.load`` / ``sdclip.load`` and transformers read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch_dtype = _dtype(dtype)
        state = {}
        for kind, tower in (("text", self.text), ("image", self.vision)):
            prefix, projection = KINDS[kind].hf_prefix, KINDS[kind].hf_projection
            for name, t in tower.state_dict().items():
                if name == "projection.weight":
                    state[projection] = t
                    continue
                parts = foreign_names(kind, "hf", name)
                for part, chunk in zip(parts, t.chunk(len(parts))):
                    state[prefix + part] = chunk
        state["logit_scale"] = self.logit_scale.detach()
        write_safetensors(
            folder / "model.safetensors",
            {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in state.items()},
            {"format": "pt"},
        )
        write_text(folder / "config.json", json.dumps(self.hf_config(torch_dtype), indent=2) + "\n")
        self.tokenizer.save_hf(folder)
        eos = "<|endoftext|>"
        pad = self.tokenizer.decoder[self.text.config.pad_id]
        write_text(
            folder / "special_tokens_map.json",
            json.dumps({"bos_token": "<|startoftext|>", "eos_token": eos, "unk_token": eos, "pad_token": pad}, indent=2)
            + "\n",
        )
        write_text(
            folder / "tokenizer_config.json",
            json.dumps(
                {
                    "tokenizer_class": "CLIPTokenizer",
                    "model_max_length": self.text.config.context_length,
                    "bos_token": "<|startoftext|>",
                    "eos_token": eos,
                    "unk_token": eos,
                    "pad_token": pad,
                },
                indent=2,
            )
            + "\n",
        )
        size = self.vision.config.image_size
        write_text(
            folder / "preprocessor_config.json",
            json.dumps(
                {
                    "image_processor_type": "CLIPImageProcessor",
                    "do_resize": True,
                    "size": {"shortest_edge": size},
                    "resample": 3,
                    "do_center_crop": True,
                    "crop_size": {"height": size, "width": size},
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                    "do_normalize": True,
                    "image_mean": list(MEAN),
                    "image_std": list(STD),
                    "do_convert_rgb": True,
                },
                indent=2,
            )
            + "\n",
        )
        return folder

    def hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        """transformers' ``CLIPConfig`` for this model, as a dict."""
        t, v = self.text.config, self.vision.config
        common = {"layer_norm_eps": 1e-5, "projection_dim": t.projection_dim}
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": t.projection_dim,
            "logit_scale_init_value": INIT_LOGIT_SCALE,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "text_config": {
                "model_type": "clip_text_model",
                "hidden_size": t.width,
                "num_hidden_layers": t.layers,
                "num_attention_heads": t.heads,
                "intermediate_size": t.mlp_width,
                "vocab_size": t.vocab_size,
                "max_position_embeddings": t.context_length,
                "hidden_act": t.activation,
                "bos_token_id": 49406,
                "eos_token_id": t.eos_id,
                "pad_token_id": t.pad_id,
                **common,
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.width,
                "num_hidden_layers": v.layers,
                "num_attention_heads": v.heads,
                "intermediate_size": v.mlp_width,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": 3,
                "hidden_act": v.activation,
                **common,
            },
            "sdclip": {"text": asdict(t), "vision": asdict(v)},
        }

    # --- inputs ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, texts: Texts) -> torch.Tensor:
        """[B, L] ids, cut after the last first-EOS of the batch: with causal attention the pooled
        output never sees later positions, so this changes nothing but the cost."""
        if isinstance(texts, torch.Tensor):
            ids = texts if texts.dim() == 2 else texts.unsqueeze(0)
        else:
            if isinstance(texts, str):
                texts = [texts]
            if not texts:
                raise BadInput("no texts given")
            ids = self.tokenizer(texts, length=self.text.config.context_length, pad_id=self.text.config.pad_id)
        has_eos = ids == self.text.config.eos_id
        if bool(has_eos.any(-1).all()):
            ids = ids[:, : int(has_eos.int().argmax(-1).max()) + 1]
        return ids.to(self.device)

    def pixels(self, images: Images) -> torch.Tensor:
        """[B, 3, S, S] pixel values from images, paths or a pixel tensor (passed through)."""
        batch = _as_batch(images)
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        return pixel_values(batch, self.vision.config.image_size).to(self.device)

    # --- encoding and scoring ----------------------------------------------------------------
    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[N_images, N_texts] logits from pixel values and token ids (what training calls)."""
        image = self.vision(pixels).embeds
        text = self.text(ids, final_norm=False).pooled_projected
        return logits(image, text, self.logit_scale)

    @torch.inference_mode()
    def encode_text(
        self, texts: Texts, *, normalize: bool = True, batch_size: int = 256, embeddings: EmbeddingSource | None = None
    ) -> torch.Tensor:
        """[B, P] text embeddings: projected pooled outputs, unit length unless ``normalize=False``.
        ``embeddings``: textual-inversion words (a file, folder, ``Embedding``...) the texts use by token."""
        if embeddings is None:
            ids, embeds = self.tokenize(texts), None
        else:
            if isinstance(texts, torch.Tensor):
                raise BadInput("embeddings need texts, not token ids")
            table = token_table(embeddings, self.text.config.width)
            ids, embeds = inject(
                self.text, self.tokenizer, [texts] if isinstance(texts, str) else texts, table, trim=True
            )
        out = torch.cat(
            [
                self.text(
                    ids[s : s + batch_size],
                    final_norm=False,
                    token_embeds=None if embeds is None else embeds[s : s + batch_size],
                ).pooled_projected
                for s in range(0, len(ids), batch_size)
            ]
        )
        return F.normalize(out, dim=-1) if normalize else out

    @torch.inference_mode()
    def encode_image(self, images: Images, *, normalize: bool = True, batch_size: int = 64) -> torch.Tensor:
        """[B, P] image embeddings from images, paths or pixel values; unit length unless
        ``normalize=False``.  Images are decoded and preprocessed ``batch_size`` at a time."""
        batch = _as_batch(images)
        if not len(batch):
            raise BadInput("no images given")
        out = torch.cat(
            [self.vision(self.pixels(batch[s : s + batch_size])).embeds for s in range(0, len(batch), batch_size)]
        )
        return F.normalize(out, dim=-1) if normalize else out

    def similarity(self, images: Images, texts: Texts) -> torch.Tensor:
        """[N_images, N_texts] cosine similarities."""
        return self.encode_image(images) @ self.encode_text(texts).t()

    def logits(self, images: Images, texts: Texts) -> torch.Tensor:
        """[N_images, N_texts] similarities times exp(logit_scale): transformers' ``logits_per_image``."""
        with torch.inference_mode():
            return self.logit_scale.exp() * self.similarity(images, texts)

    def class_embeddings(
        self,
        labels: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        embeddings: EmbeddingSource | None = None,
    ) -> torch.Tensor:
        """[L, P] one unit vector per label: the mean of its normalized template embeddings,
        normalized again (CLIP's prompt ensembling).  ``embeddings``: see ``encode_text``."""
        if not labels or not templates:
            raise BadInput("zero-shot classification needs at least one label and one template")
        check_templates(templates)
        prompts = [t.format(label) for label in labels for t in templates]
        per_label = self.encode_text(prompts, embeddings=embeddings).view(len(labels), len(templates), -1)
        return F.normalize(per_label.mean(1), dim=-1)

    def zero_shot(
        self,
        images: Images,
        labels: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        embeddings: EmbeddingSource | None = None,
    ) -> torch.Tensor:
        """[N_images, L] probabilities over ``labels``, each written into every template (labels may use
        learned words: ``embeddings``, see ``encode_text``)."""
        classes = self.class_embeddings(labels, templates, embeddings)
        with torch.inference_mode():
            return (self.logit_scale.exp() * self.encode_image(images) @ classes.t()).softmax(-1)

    def text_to_image(self, texts: Texts, images: Images, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """For each text, the ``k`` best images: (cosine scores, image indices), each [N_texts, k]."""
        sims = self.similarity(images, texts).t()
        found = sims.topk(k=min(k, sims.shape[1]), dim=-1)
        return found.values, found.indices

    def image_to_text(self, images: Images, texts: Texts, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """For each image, the ``k`` best texts: (cosine scores, text indices), each [N_images, k]."""
        sims = self.similarity(images, texts)
        found = sims.topk(k=min(k, sims.shape[1]), dim=-1)
        return found.values, found.indices


def _as_batch(images: Images) -> torch.Tensor | Sequence[ImageLike]:
    """A pixel tensor [B, 3, S, S] or a sequence of images / paths, from one or many."""
    if isinstance(images, torch.Tensor):
        return images if images.dim() == 4 else images.unsqueeze(0)
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    return list(images)
