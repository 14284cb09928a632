"""The image tower against transformers' CLIPVisionModelWithProjection, from both layouts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from clipfakes import randomize, to_openai, vision_config
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

from sdclip.checkpoint import build, find_towers, infer
from sdclip.errors import BadInput
from sdclip.model import Attention
from sdclip.tensorfile import open_tensor_file
from sdclip.vision import VisionConfig, VisionTransformer


def _hf(config, seed=0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return randomize(CLIPVisionModelWithProjection(config).eval(), seed)  # type: ignore[return-value]


def _load(path, hf_config=None, activation="quick_gelu") -> VisionTransformer:
    f = open_tensor_file(path)
    towers = find_towers(f, "image")
    assert towers
    return build(infer(towers[0], {"hidden_act": activation, **(hf_config or {})}))


def _compare(ours: VisionTransformer, hf: CLIPVisionModelWithProjection, size: int, batch: int = 3) -> float:
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=pixels)
        out = ours(pixels)
    hidden = (out.hidden - ref.last_hidden_state).abs().max().item()
    embeds = (out.embeds - ref.image_embeds).abs().max().item()
    return max(hidden, embeds)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_layout_matches_transformers(tmp_path, act):
    hf = _hf(vision_config(act=act))
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ours = _load(tmp_path / "model.safetensors", config)
    assert ours.config == VisionConfig(
        width=64, layers=2, heads=4, mlp_width=128, image_size=32, patch_size=8, activation=act, projection_dim=24
    )
    assert _compare(ours, hf, 32) <= 1e-5


def test_openai_layout_matches_transformers(tmp_path):
    hf = _hf(vision_config(image_size=48, patch=16, width=96, heads=3), seed=3)
    save_file(to_openai(hf.state_dict()), tmp_path / "visual.safetensors")
    ours = _load(tmp_path / "visual.safetensors")  # heads inferred as width // 64 = 1: pass them
    assert (ours.config.image_size, ours.config.patch_size, ours.config.projection_dim) == (48, 16, 24)
    f = open_tensor_file(tmp_path / "visual.safetensors")
    tower = find_towers(f, "image")[0]
    assert tower.style == "openclip" and tower.prefix == "visual."
    ours = build(replace(tower, config=replace(ours.config, heads=3)))
    assert _compare(ours, hf, 48) <= 1e-5


def test_modest_size_exactness(tmp_path):
    """A ViT-B/32-shaped tower at half width: 50 tokens, 6 layers."""
    hf = _hf(vision_config(width=384, layers=6, heads=6, image_size=224, patch=32, projection=256), seed=5)
    hf.save_pretrained(tmp_path)
    ours = _load(tmp_path / "model.safetensors", json.loads((tmp_path / "config.json").read_text()))
    assert _compare(ours, hf, 224, batch=2) <= 1e-5


def test_attention_is_causal_only_when_asked():
    torch.manual_seed(0)
    causal, full = Attention(32, 4), Attention(32, 4, causal=False)
    full.load_state_dict(causal.state_dict())
    x = torch.randn(1, 5, 32)
    y_causal, y_full = causal(x), full(x)
    assert torch.allclose(y_causal[:, 0], causal(x[:, :1])[:, 0], atol=1e-6)  # the first token sees only itself
    assert not torch.allclose(y_causal[:, 0], y_full[:, 0])
    x2 = x.clone()
    x2[:, -1] += 1  # changing the last token changes earlier outputs only without the mask
    assert torch.allclose(causal(x2)[:, :4], y_causal[:, :4], atol=1e-6)
    assert not torch.allclose(full(x2)[:, :4], y_full[:, :4])


def test_wrong_pixels_and_missing_blocks(tmp_path):
    model = VisionTransformer(
        VisionConfig(width=64, layers=1, heads=2, mlp_width=64, image_size=32, patch_size=16, projection_dim=8)
    ).init_weights()
    with pytest.raises(BadInput, match=r"\[batch, 3, 32, 32\]"):
        model(torch.zeros(1, 3, 64, 64))
    hf = _hf(vision_config(layers=3))
    state = {k: v for k, v in hf.state_dict().items() if ".layers.1." not in k}
    save_file(state, tmp_path / "holes.safetensors")
    with pytest.raises(BadInput, match="some are missing"):
        _load(tmp_path / "holes.safetensors")
