"""CLIPModel against transformers' CLIPModel, from both layouts, and its zero-shot / retrieval API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clipfakes import clip_model, to_openai
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPTokenizer
from transformers import CLIPModel as HFCLIPModel

import sdclip
from sdclip.clip import CLIPModel
from sdclip.errors import BadInput
from sdclip.model import TextConfig
from sdclip.vision import VisionConfig

PROMPTS = ["a photo of a cat", "a red circle above a blue square", "", "an astronaut riding a horse on the moon"]


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf: HFCLIPModel, ours: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    ids = ours.tokenizer(PROMPTS, length=77, pad_id=ours.text.config.pad_id)
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels).logits_per_image


def test_hf_folder_matches_transformers(tmp_path):
    hf = clip_model(seed=1)
    hf.save_pretrained(tmp_path)
    ours = CLIPModel.load(tmp_path)
    pixels = _pixels(3, 32)
    assert abs(ours.logit_scale.item() - 3.0) < 1e-6
    assert (ours.logits(pixels, PROMPTS) - _hf_logits(hf, ours, pixels)).abs().max() <= 1e-5 * 20
    with torch.no_grad():
        ids = ours.tokenizer(PROMPTS, length=77, pad_id=ours.text.config.pad_id)
        ref_text = hf.get_text_features(input_ids=ids)
        ref_image = hf.get_image_features(pixel_values=pixels)
    assert (ours.encode_text(PROMPTS, normalize=False) - ref_text).abs().max() <= 1e-5
    assert (ours.encode_image(pixels, normalize=False) - ref_image).abs().max() <= 1e-5


def test_openai_state_dict_matches_transformers(tmp_path):
    hf = clip_model(seed=2, text_width=128, vision_width=128, heads=2)  # OpenAI files imply width / 64 heads
    save_file(to_openai(hf.state_dict()), tmp_path / "clip.safetensors")
    torch.save(to_openai(hf.state_dict()), tmp_path / "clip.pt")
    pixels = _pixels(2, 32)
    for name in ("clip.safetensors", "clip.pt"):
        ours = CLIPModel.load(tmp_path / name)
        assert ours.vision.config.heads == 2 and ours.vision.config.activation == "quick_gelu"
        assert (ours.logits(pixels, PROMPTS) - _hf_logits(hf, ours, pixels)).abs().max() <= 1e-5 * 20, name


def test_saved_model_loads_in_sdclip_and_transformers(tmp_path):
    model = CLIPModel.create(
        TextConfig(width=64, layers=2, heads=2, mlp_width=128, projection_dim=32),
        VisionConfig(width=64, layers=2, heads=2, mlp_width=128, image_size=32, patch_size=8, projection_dim=32),
        seed=3,
    )
    model.save(tmp_path, dtype="float32")
    pixels = _pixels(2, 32)
    expected = model.logits(pixels, PROMPTS)
    assert (CLIPModel.load(tmp_path).logits(pixels, PROMPTS) - expected).abs().max() <= 1e-5
    hf = HFCLIPModel.from_pretrained(tmp_path).eval()
    assert (_hf_logits(hf, model, pixels) - expected).abs().max() <= 1e-4
    # the text tower alone is an SD-style conditioner: 77 x width hidden states and a pooled output
    te = sdclip.load(tmp_path)
    out = te.encode(PROMPTS)
    assert out.hidden.shape == (4, 77, 64) and te.towers[0].config.pad_id == 49407
    assert (out.pooled_projected - model.encode_text(PROMPTS, normalize=False)).abs().max() <= 1e-5
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert (
        tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids.tolist()
        == model.tokenizer(PROMPTS, length=77, pad_id=49407).tolist()
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ref = CLIPImageProcessor.from_pretrained(tmp_path)(images=image, return_tensors="pt").pixel_values
    assert (model.pixels(image) - ref).abs().max() <= 1e-5
    # half precision is the default on disk
    model.save(tmp_path / "half")
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < (
        tmp_path / "model.safetensors"
    ).stat().st_size * 0.6


def test_trimmed_ids_change_nothing():
    model = CLIPModel.create(
        TextConfig(width=64, layers=2, heads=2, mlp_width=128, projection_dim=16),
        VisionConfig(width=64, layers=1, heads=2, mlp_width=64, image_size=16, patch_size=8, projection_dim=16),
    )
    ids = model.tokenizer(PROMPTS, length=77, pad_id=49407)
    assert model.tokenize(PROMPTS).shape[1] < 77
    with torch.no_grad():
        full = model.text(ids).pooled_projected
    assert (model.encode_text(PROMPTS, normalize=False) - full).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def tiny() -> CLIPModel:
    return CLIPModel.create(
        TextConfig(width=64, layers=1, heads=2, mlp_width=128, projection_dim=16),
        VisionConfig(width=64, layers=1, heads=2, mlp_width=64, image_size=32, patch_size=16, projection_dim=16),
        seed=4,
    )


def test_zero_shot_and_prompt_ensembling(tiny, tmp_path):
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    images[2].save(tmp_path / "blue.png")
    labels = ["red square", "green square", "blue square", "cat"]
    templates = ["a photo of a {}.", "a drawing of a {}"]
    probs = tiny.zero_shot([images[0], images[1], tmp_path / "blue.png"], labels, templates)
    assert probs.shape == (3, 4) and torch.allclose(probs.sum(-1), torch.ones(3))
    classes = tiny.class_embeddings(labels, templates)
    manual = torch.stack(
        [
            torch.nn.functional.normalize(tiny.encode_text([t.format(label) for t in templates]).mean(0), dim=0)
            for label in labels
        ]
    )
    assert (classes - manual).abs().max() <= 1e-6
    logits = tiny.logit_scale.exp() * tiny.encode_image(images) @ classes.t()
    assert (probs - logits.softmax(-1)).abs().max() <= 1e-6
    with pytest.raises(BadInput, match="no '\\{\\}'"):
        tiny.zero_shot(images, labels, ["a photo"])


def test_retrieval_both_ways(tiny):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["one", "two", "three"]
    sims = tiny.similarity(images, texts)
    assert sims.shape == (5, 3) and sims.abs().max() <= 1 + 1e-6
    scores, idx = tiny.text_to_image(texts, images, k=2)
    assert (
        idx.shape == (3, 2) and torch.equal(idx[:, 0], sims.argmax(0)) and torch.equal(scores[:, 0], sims.max(0).values)
    )
    scores, idx = tiny.image_to_text(images, texts, k=10)
    assert idx.shape == (5, 3) and torch.equal(idx[:, 0], sims.argmax(1))


def test_text_only_checkpoint_is_refused(tmp_path):
    hf = clip_model()
    save_file({k: v for k, v in hf.state_dict().items() if k.startswith("text_")}, tmp_path / "text.safetensors")
    with pytest.raises(BadInput, match="no CLIP image tower"):
        CLIPModel.load(tmp_path / "text.safetensors")
