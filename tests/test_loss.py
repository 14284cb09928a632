"""The contrastive loss against explicit loops and against transformers' CLIPModel(return_loss=True)."""

from __future__ import annotations

import math

import numpy as np
import torch
from clipfakes import clip_model

from sdclip.clip import CLIPModel
from sdclip.loss import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, clamp_logit_scale_, clip_loss, contrastive_loss, logits


def _loop_loss(images: np.ndarray, texts: np.ndarray, scale: float) -> float:
    """Cross-entropy written out one row and one column at a time, in float64."""
    images = images / np.sqrt((images**2).sum(1, keepdims=True))
    texts = texts / np.sqrt((texts**2).sum(1, keepdims=True))
    n = len(images)
    sim = [
        [math.exp(scale) * sum(images[i, d] * texts[j, d] for d in range(images.shape[1])) for j in range(n)]
        for i in range(n)
    ]
    rows = cols = 0.0
    for i in range(n):
        rows += -sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n)))
        cols += -sim[i][i] + math.log(sum(math.exp(sim[j][i]) for j in range(n)))
    return (rows / n + cols / n) / 2


def test_matches_explicit_loops():
    g = torch.Generator().manual_seed(0)
    for n, d, scale in [(1, 4, 1.0), (5, 8, INIT_LOGIT_SCALE), (7, 3, MAX_LOGIT_SCALE)]:
        images, texts = (
            torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64),
        )
        ours = clip_loss(images, texts, torch.tensor(scale, dtype=torch.float64)).item()
        assert abs(ours - _loop_loss(images.numpy(), texts.numpy(), scale)) < 1e-10


def test_matches_transformers_clip_loss(tmp_path):
    hf = clip_model(seed=6)
    hf.save_pretrained(tmp_path)
    ours = CLIPModel.load(tmp_path)
    prompts = ["a red circle", "a blue square", "a green star", "a photo of a yellow cross", "a cat"]
    ids = ours.tokenizer(prompts, length=77, pad_id=49407)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, return_loss=True).loss.item()
        loss = contrastive_loss(ours(pixels, ours.tokenize(prompts))).item()
    assert abs(loss - ref) <= 1e-5


def test_logit_scale_learns_and_is_clamped():
    scale = torch.nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
    assert abs(math.exp(scale.item()) - 1 / 0.07) < 1e-4
    images, texts = torch.randn(4, 8), torch.randn(4, 8)
    clip_loss(images, texts, scale).backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    with torch.no_grad():
        scale.fill_(7.0)
    clamp_logit_scale_(scale)
    assert abs(math.exp(scale.item()) - 100) < 1e-3
    assert logits(images, texts, scale).abs().max() <= 100 + 1e-4  # cosines times at most 100
