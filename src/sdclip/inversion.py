"""Textual inversion: teach a frozen text encoder a new word by learning only the word's input vectors.

A placeholder token (``<heart>``) stands for n vectors that take the place of token embeddings wherever it
appears in a prompt (``embeddings.inject``).  AdamW updates those vectors and nothing else: every weight of
the encoder stays as it was, so the result is an embedding file that any front end loads beside the
unchanged checkpoint (``save_embedding``).

Two objectives:

* the CLIP objective (``images=``, a full CLIP model): the normalised projected text embedding of caption
  templates holding the word should point where the example images' embeddings point.  Loss = 1 - mean
  cosine over templates x images, plus, given ``negatives`` (the names the word must stay apart from),
  ``contrast`` x the cross-entropy of classifying each example image among the word and those names (each
  in the same template) at the model's own logit scale.  Cosine alone only asks the word to come near the
  images; the cross-entropy asks it to come nearer than any known name, which is what zero-shot
  classification with the word then needs.
* any differentiable loss of the conditioning (``loss_fn=``): each step it receives a ``PromptBatch``, the
  [B, 77, C] conditioning of template prompts holding the word as the checkpoint's U-Net reads it
  (diffusers' layers; SDXL: both encoders and the pooled output), and returns a scalar: for example a
  diffusion U-Net's noise-prediction loss (``examples/ti_unet_loss.py``).

A run with ``out`` writes, as ``sdclip.train`` does, ``checkpoint.pt`` (vectors, optimizer, step) every
``checkpoint_every`` steps, ``metrics.jsonl`` and, at the end, ``loss.png``; ``resume`` continues exactly where
it stopped: the templates of step s (and the generator a ``loss_fn`` gets) depend only on the seed and s.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO, Union

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Usage
from .clip import CLIPModel, Images
from .conditioning import pooled_encoders, unet_encoders
from .embeddings import ANY, SDXL_ROLES, Embedding, inject
from .encoder import TextEncoder
from .errors import BadInput, SdclipError
from .model import TextTransformer
from .runconfig import InversionConfig
from .runs import Progress, Run
from .tokenizer import Tokenizer

Model = Union[CLIPModel, TextEncoder]


@dataclass
class PromptBatch:
    """What a ``loss_fn`` receives each step."""

    hidden: torch.Tensor  # [B, 77, C] the conditioning the family's U-Net reads, the word's vectors in place
    pooled: torch.Tensor | None  # [B, P] pooled conditioning (SDXL, SD3; a CLIPModel's projected); else None
    prompts: list[str]  # the B template prompts
    step: int
    generator: torch.Generator  # CPU, seeded from (seed, step): draw noise and timesteps from it to resume exactly


LossFn = Callable[[PromptBatch], torch.Tensor]


@dataclass
class _Part:
    """One text encoder the word gets vectors for."""

    role: str  # the file's key for these vectors: "*", or "clip_l" / "clip_g" for SDXL
    tower: TextTransformer
    tokenizer: Tokenizer
    usage: Usage  # the hidden state the U-Net reads
    pooled: bool  # the U-Net reads its pooled output too


def _parts(model: Model) -> list[_Part]:
    if isinstance(model, CLIPModel):
        return [_Part(ANY, model.text, model.tokenizer, Usage(-1, True), True)]
    numbers, pooled = unet_encoders(model), pooled_encoders(model)
    roles = SDXL_ROLES if len(numbers) == 2 else (ANY,)
    return [
        _Part(role, model.tower(n), model.tokenizers[n - 1], model.usages[n - 1], n in pooled)
        for role, n in zip(roles, numbers)
    ]


def initial_vectors(tower: TextTransformer, tokenizer: Tokenizer, word: str, n: int) -> torch.Tensor:
    """[n, C] start vectors: the token embeddings of ``word``, repeated in turn when it has fewer than n
    tokens, averaged in n consecutive groups when it has more."""
    ids = tokenizer.tokenize(word)
    if not ids:
        raise BadInput(f"init word {word!r} has no tokens")
    rows = tower.token_embedding.weight.detach()[ids].float()
    if len(ids) >= n:
        return torch.stack([group.mean(0) for group in rows.tensor_split(n)])
    return rows[torch.arange(n) % len(ids)].clone()


def conditioning(
    model: Model, prompts: Sequence[str], vectors: dict[str, torch.Tensor], token: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden [B, 77, C], pooled [B, P] or None)`` of ``prompts`` with ``token``'s vectors (per role) in place,
    as the family's U-Net reads them (encoders side by side on the channel axis); differentiable in the vectors."""
    hidden, pooled = [], []
    for part in _parts(model):
        ids, embeds = inject(part.tower, part.tokenizer, prompts, {token: vectors[part.role]})
        out = part.tower(
            ids, layer=part.usage.layer, final_norm=part.usage.final_norm, pooled=part.pooled, token_embeds=embeds
        )
        hidden.append(out.hidden)
        if part.pooled:
            pooled.append(out.pooled if out.pooled_projected is None else out.pooled_projected)
    return torch.cat(hidden, -1), torch.cat(pooled, -1) if pooled else None


class _ClipObjective:
    """The CLIP objective (see the module docstring); the images and the negatives' texts are encoded once."""

    def __init__(self, model: CLIPModel, images: Images, config: InversionConfig):
        self.model, self.config = model, config
        # clone: leave inference mode, so that these take part in the graph of the vectors' gradient
        self.images = model.encode_image(images).clone()
        self.negatives = None
        if config.negatives and config.contrast:
            texts = [t.format(n) for t in config.templates for n in config.negatives]
            self.negatives = model.encode_text(texts).view(len(config.templates), len(config.negatives), -1).clone()

    def __call__(
        self, vectors: dict[str, torch.Tensor], which: list[int], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        text, token = self.model.text, self.config.token
        prompts = [self.config.templates[i].format(token) for i in which]
        ids, embeds = inject(text, self.model.tokenizer, prompts, {token: vectors[ANY]}, trim=True)
        words = F.normalize(text(ids, final_norm=False, token_embeds=embeds).pooled_projected, dim=-1)
        cosine = self.images @ words.t()  # [M, B]
        loss = 1 - cosine.mean()
        metrics = {"cosine": cosine.mean().item()}
        if self.negatives is not None:
            others = torch.einsum("mp,bkp->mbk", self.images, self.negatives[which])
            logits = self.model.logit_scale.exp() * torch.cat([cosine[..., None], others], -1)
            target = torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long, device=logits.device)
            loss = loss + self.config.contrast * F.cross_entropy(logits.flatten(0, 1), target)
            metrics["accuracy"] = (logits.argmax(-1) == 0).float().mean().item()
        return loss, metrics


class _LossObjective:
    """A user's loss of the conditioning."""

    def __init__(self, model: Model, loss_fn: LossFn, config: InversionConfig):
        self.model, self.loss_fn, self.config = model, loss_fn, config

    def __call__(
        self, vectors: dict[str, torch.Tensor], which: list[int], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        prompts = [self.config.templates[i].format(self.config.token) for i in which]
        hidden, pooled = conditioning(self.model, prompts, vectors, self.config.token)
        seed = int(np.random.default_rng([self.config.seed, step, 1]).integers(2**62))
        loss = self.loss_fn(PromptBatch(hidden, pooled, prompts, step, torch.Generator().manual_seed(seed)))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise BadInput("loss_fn must return a scalar tensor computed from the conditioning it was given")
        return loss.reshape(()), {}


def _weights(model: Model) -> list[torch.nn.Parameter]:
    modules = [model] if isinstance(model, CLIPModel) else model.towers
    return [p for m in modules for p in m.parameters()]


def train_embedding(
    model: Model,
    images: Images | None = None,
    *,
    loss_fn: LossFn | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    until: int | None = None,
    log: TextIO | None = sys.stderr,
    **settings,
) -> Embedding:
    """Learn a new word (``settings``: the fields of ``InversionConfig``: token, vectors, init_word, templates,
    negatives, steps, lr, ...) and return it as an ``Embedding`` (``save_embedding`` writes it).

    ``images`` (files, PIL images or pixel values) use the CLIP objective and need a ``CLIPModel``; ``loss_fn``
    takes a ``PromptBatch`` and works with a ``CLIPModel`` or any ``TextEncoder`` (SDXL: vectors for both
    encoders).  The model is used frozen (parameters that required grad are switched off for the run).
    ``out``: the run folder (checkpoints, metrics, loss plot); ``resume`` continues the run there with its
    saved settings (pass the same images or loss); ``until`` stops after that step with a checkpoint.

        >>> clip = CLIPModel.load()
        >>> heart = train_embedding(clip, ["h1.png", "h2.png"], token="<heart>", init_word="shape",
        ...                         negatives=["a red circle", "a blue square"], steps=100)
        >>> save_embedding(heart, "heart.safetensors")
    """
    if (images is None) == (loss_fn is None):
        raise BadInput("give example images (the CLIP objective) or a loss_fn, one of the two")
    if images is not None and not isinstance(model, CLIPModel):
        raise BadInput(
            "the CLIP objective needs a full CLIP model (text and image towers, CLIPModel.load); for a "
            "text encoder alone give a loss_fn"
        )
    run = Run(out, log) if out is not None else None
    state = None
    if resume:
        if run is None:
            raise BadInput("resume needs the run folder (out)")
        state = run.resume_state()
    if state is not None:
        config = Run.config(InversionConfig, state)
    else:
        try:
            config = InversionConfig(**settings)
        except TypeError as e:
            raise BadInput(f"unknown setting: {e}") from None
    parts = _parts(model)
    vectors = {
        p.role: torch.nn.Parameter(
            initial_vectors(p.tower, p.tokenizer, config.init_word, config.vectors).to(
                p.tower.token_embedding.weight.device
            )
        )
        for p in parts
    }
    optimizer = torch.optim.AdamW(vectors.values(), lr=config.lr, weight_decay=config.weight_decay)
    objective = (
        _ClipObjective(model, images, config)
        if images is not None  # type: ignore[arg-type]
        else _LossObjective(model, loss_fn, config)
    )  # type: ignore[arg-type]
    start = 0
    if state is not None:
        saved = state.get("images")
        if (
            isinstance(objective, _ClipObjective) != (saved is not None)
            or saved is not None
            and (saved.shape != objective.images.shape or not torch.allclose(saved, objective.images.cpu(), atol=1e-3))
        ):
            raise BadInput(f"{out}: the run was started with other example images (or another objective)")
        with torch.no_grad():
            for role, v in vectors.items():
                v.copy_(state["vectors"][role])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    stop = min(until if until is not None else config.steps, config.steps)
    frozen = [p for p in _weights(model) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        _steps(config, vectors, optimizer, objective, start, stop, run, state is not None, log)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return Embedding(config.name, config.token, {role: v.detach().clone() for role, v in vectors.items()})


def _steps(
    config: InversionConfig,
    vectors: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    objective: Callable,
    start: int,
    stop: int,
    run: Run | None,
    resumed: bool,
    log: TextIO | None,
) -> None:
    """The steps ``start`` .. ``stop``, with metrics, progress and checkpoints."""
    progress = Progress(config.steps, log, "prompts") if log is not None else None
    images = getattr(objective, "images", None)
    if run is not None:
        run.start(start, resumed)
    began = time.monotonic()
    try:
        for step in range(start, stop):
            loss, extra = objective(vectors, config.draw(step), step)
            if not math.isfinite(loss.item()):
                raise SdclipError(f"the loss became {loss.item()} at step {step + 1}; try a lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            norm = torch.cat([v.detach().norm(dim=-1) for v in vectors.values()]).mean().item()
            elapsed = time.monotonic() - began
            if run is not None:
                run.record({"step": done, "loss": loss.item(), "norm": norm, **extra, "elapsed": elapsed})
            if progress is not None:
                progress.step(done, stop, loss.item(), config.batch_size, elapsed / (done - start), elapsed)
            if run is not None and (done % config.checkpoint_every == 0 or done == stop):
                run.save(
                    done,
                    config,
                    optimizer=optimizer.state_dict(),
                    vectors={k: v.detach().cpu() for k, v in vectors.items()},
                    images=None if images is None else images.cpu(),
                )
    finally:
        if run is not None:
            run.close()
    if progress is not None:
        progress.close()
    if run is not None and stop == config.steps:
        run.plot("loss.png")


def nearest_tokens(
    vectors: torch.Tensor, tower: TextTransformer, tokenizer: Tokenizer, k: int = 5
) -> list[list[tuple[str, float]]]:
    """For each vector [n, C], the ``k`` vocabulary tokens whose embeddings point most nearly its way (cosine):
    what the learned word resembles to this encoder."""
    table = F.normalize(tower.token_embedding.weight.detach().float(), dim=-1)
    found = (F.normalize(vectors.float().to(table.device), dim=-1) @ table.t()).topk(k, dim=-1)
    return [
        [(tokenizer.token_text(int(i)), float(s)) for s, i in zip(scores, ids)]
        for scores, ids in zip(found.values, found.indices)
    ]
