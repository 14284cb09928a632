"""CLIP's contrastive loss: in a batch of N (image, caption) pairs, each image must pick out its
own caption among the N, and each caption its own image.

logits = exp(logit_scale) * normalize(images) @ normalize(texts).T; the loss is the mean of the
cross-entropy over rows (image -> text) and over columns (text -> image), the diagonal being
the right answers.  ``logit_scale`` is a learned temperature, started at log(1 / 0.07) and kept
at or below log(100) as CLIP does, so that the logits cannot grow without bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


def logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """[N_images, N_texts] scaled cosine similarities (embeddings need not be normalized)."""
    return logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies of an N x N logit matrix."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target)) / 2


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The loss of N matching (image, text) embedding pairs; pair i is row i of both."""
    return contrastive_loss(logits(image_embeds, text_embeds, logit_scale))


@torch.no_grad()
def clamp_logit_scale_(logit_scale: torch.Tensor) -> None:
    """Keep exp(logit_scale) within [1, 100], in place (after each optimizer step, as CLIP does)."""
    logit_scale.clamp_(0, MAX_LOGIT_SCALE)
