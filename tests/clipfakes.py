"""Small random-weight transformers CLIP models, and their weights renamed to the OpenAI layout.

The OpenAI renaming is written here from the published key names, independently of
``sdclip.checkpoint.NAMES``, so the tests check that table.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorm gains around 1), so that no mapping error hides behind
    transformers' zero biases and unit gains."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(3.0)
            elif "norm" in name and name.endswith("weight") or "layrnorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(
                    torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5
                    if p.dim() == 2
                    else torch.randn(p.shape, generator=g) * (p[0].numel()) ** -0.5
                )
    return module


def vision_config(
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    patch: int = 8,
    projection: int = 24,
    act: str = "quick_gelu",
) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=projection,
        hidden_act=act,
    )


def clip_model(
    seed: int = 0,
    act: str = "quick_gelu",
    text_width: int = 48,
    vision_width: int = 64,
    projection: int = 24,
    image_size: int = 32,
    patch: int = 8,
    heads: int = 4,
) -> CLIPModel:
    """A tiny random transformers CLIPModel with the full CLIP vocabulary and context."""
    text = CLIPTextConfig(
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        projection_dim=projection,
        hidden_act=act,
    )
    config = CLIPConfig(
        text_config=text.to_dict(),
        projection_dim=projection,
        vision_config=vision_config(vision_width, 2, heads, image_size, patch, projection, act).to_dict(),
    )
    torch.manual_seed(seed)
    return randomize(CLIPModel(config).eval(), seed)  # type: ignore[return-value]


def _openai_tower(state: dict[str, torch.Tensor], hf: str, out: str) -> dict[str, torch.Tensor]:
    """transformers encoder layers under ``hf`` -> OpenAI resblocks under ``out``."""
    result = {}
    layers = {int(k[len(hf) :].split(".")[2]) for k in state if k.startswith(hf + "encoder.layers.")}
    for i in layers:
        a, b = f"{hf}encoder.layers.{i}.", f"{out}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            result[b + f"attn.in_proj_{p}"] = torch.cat([state[a + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            result[b + f"attn.out_proj.{p}"] = state[a + f"self_attn.out_proj.{p}"]
            result[b + f"ln_1.{p}"] = state[a + f"layer_norm1.{p}"]
            result[b + f"ln_2.{p}"] = state[a + f"layer_norm2.{p}"]
            result[b + f"mlp.c_fc.{p}"] = state[a + f"mlp.fc1.{p}"]
            result[b + f"mlp.c_proj.{p}"] = state[a + f"mlp.fc2.{p}"]
    return result


def to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict in the OpenAI / open_clip layout."""
    s = {k: v.detach().clone() for k, v in state.items()}
    out = {"logit_scale": s["logit_scale"]} if "logit_scale" in s else {}
    if "text_model.embeddings.token_embedding.weight" in s:
        out.update(_openai_tower(s, "text_model.", ""))
        out["token_embedding.weight"] = s["text_model.embeddings.token_embedding.weight"]
        out["positional_embedding"] = s["text_model.embeddings.position_embedding.weight"]
        out["ln_final.weight"] = s["text_model.final_layer_norm.weight"]
        out["ln_final.bias"] = s["text_model.final_layer_norm.bias"]
        out["text_projection"] = s["text_projection.weight"].t().contiguous()
    v = "vision_model."
    out.update(_openai_tower(s, v, "visual."))
    out["visual.conv1.weight"] = s[v + "embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = s[v + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = s[v + "embeddings.position_embedding.weight"]
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = s[v + f"pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = s[v + f"post_layernorm.{p}"]
    if "visual_projection.weight" in s:
        out["visual.proj"] = s["visual_projection.weight"].t().contiguous()
    return out
