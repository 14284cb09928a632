"""Training a small CLIP from scratch on a CPU: contrastive loss, AdamW, warmup + cosine.

``train`` writes into one folder: the model as a Hugging Face ``CLIPModel`` folder
(model.safetensors, config.json, tokenizer and image-processor files; ``sdclip.load`` reads its
text tower as an SD-style conditioner), ``checkpoint.pt`` (model, optimizer and step, to resume),
``metrics.jsonl`` (one JSON object per step, and per evaluation) and ``training.png`` (loss and
zero-shot accuracy).  A resumed run continues exactly where it stopped: the data of step ``s``
depends only on the seed and ``s``, and the checkpoint holds everything else.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .clip import CLIPModel
from .data import Dataset, open_dataset
from .images import pixel_values
from .loss import clamp_logit_scale_, contrastive_loss
from .runconfig import TrainConfig
from .runs import Progress, Run
from .shapes import ZERO_SHOT_TEMPLATES, Shapes, eval_set, labels, phrase
from .vision import VisionTransformer

_WHITEN_SAMPLE = 512  # pictures whose patches set the whitening


@torch.no_grad()
def whiten_patches_(vision: VisionTransformer, pixels: torch.Tensor, eps: float = 1e-2) -> None:
    """Make the patch embedding PCA-whiten image patches: row k projects onto the k-th strongest
    direction of the patches' covariance, scaled to unit variance (rows past 3 x patch² keep
    their random values).

    Why: raw patches vary mostly in brightness and colour, and gradient descent learns the
    directions of high variance first; from CLIP's random init a small ViT learns colour at once
    and the edges that make shape very slowly.  On whitened input every direction starts equal
    (supervised shape classification on the shapes data: 50 % instead of 25 % after 200 steps).
    """
    p = vision.config.patch_size
    patches = F.unfold(pixels.double(), p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p)
    values, vectors = torch.linalg.eigh(torch.cov(patches.t()))  # ascending
    rows = (vectors / (values + eps).sqrt()).t().flip(0)[: vision.config.width]
    weight = vision.patch_embedding.weight
    weight[: len(rows)] = rows.reshape(-1, 3, p, p).to(weight.dtype)


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then a cosine down to 0 at ``steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(model: CLIPModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW as CLIP uses it: no weight decay on gains, biases, the class token and logit_scale."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.dim() < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    try:  # the fused kernel is ~6x faster on CPU, where the 49408-row token embedding dominates the step
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except RuntimeError:  # torch < 2.4 has no fused CPU AdamW
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


class _Batches:
    """Decoded, preprocessed batches by step, the next one prepared while the model trains."""

    def __init__(self, data: Dataset, model: CLIPModel, config: TrainConfig, workers: int = 2):
        self.data, self.model, self.config = data, model, config
        # the bootstrap phase's pictures: single objects captioned by their shape alone
        self.bootstrap = (
            Shapes(size=config.image_size, seed=config.seed, pair_p=0.0, shape_only=True)
            if config.bootstrap_steps
            else None
        )
        self.shuffle = not isinstance(data, Shapes)  # generated pictures are random already
        self._perms: dict[int, np.ndarray] = {}
        self.pool = ThreadPoolExecutor(workers)

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, len(self.data))
        if not self.shuffle:
            return i
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.config.seed, epoch]).permutation(len(self.data))}
        return int(self._perms[epoch][i])

    def _load(self, step: int) -> tuple[torch.Tensor, list[str]]:
        b = self.config.batch_size
        data = self.bootstrap if step < self.config.bootstrap_steps else self.data
        items = list(self.pool.map(data.__getitem__, [self._index(p) for p in range(step * b, (step + 1) * b)]))
        return pixel_values([im for im, _ in items], self.config.image_size), [c for _, c in items]

    def run(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        with ThreadPoolExecutor(1) as ahead:
            future = ahead.submit(self._load, start)
            for step in range(start, stop):
                pixels, captions = future.result()
                if step + 1 < stop:
                    future = ahead.submit(self._load, step + 1)
                yield step, pixels, self.model.tokenize(captions)


class _ZeroShot:
    """Zero-shot accuracy on single-object shapes over every colour x shape label, and how often
    the predicted label has the right colour or the right shape (which of the two is learned)."""

    def __init__(self, config: TrainConfig):
        self.labels = labels()
        self.sets = {split: eval_set(split, config.eval_images, config.image_size) for split in ("seen", "held_out")}
        self.pixels = {s: pixel_values([im for im, _, _ in items], config.image_size) for s, items in self.sets.items()}
        self.targets = {
            s: torch.tensor([self.labels.index((c, sh)) for _, c, sh in items]) for s, items in self.sets.items()
        }

    def __call__(self, model: CLIPModel) -> dict[str, float]:
        classes = model.class_embeddings([phrase(c, s) for c, s in self.labels], ZERO_SHOT_TEMPLATES)
        out = {}
        for split in self.sets:
            predicted = (model.encode_image(self.pixels[split]) @ classes.t()).argmax(-1).tolist()
            pairs = [(self.labels[p], self.labels[t]) for p, t in zip(predicted, self.targets[split].tolist())]
            out[f"zero_shot_{split}"] = sum(p == t for p, t in pairs) / len(pairs)
            out[f"zero_shot_{split}_colour"] = sum(p[0] == t[0] for p, t in pairs) / len(pairs)
            out[f"zero_shot_{split}_shape"] = sum(p[1] == t[1] for p, t in pairs) / len(pairs)
        return out


def train(
    config: TrainConfig, out: str | Path, *, resume: bool = False, until: int | None = None, log: TextIO = sys.stderr
) -> CLIPModel:
    """Train (or, with ``resume``, continue the run in ``out`` with its saved configuration).

    ``until`` stops after that step with a checkpoint, to continue later; the model folder is
    written when the run reaches ``config.steps``.
    """
    out = Path(out)
    run = Run(out, log)
    state = run.resume_state() if resume else None
    if state is not None:
        config = Run.config(TrainConfig, state)
    data = open_dataset(config.data, config.image_size, config.seed, config.partial_captions)
    model = CLIPModel.create(*config.towers(), seed=config.seed).requires_grad_(True)
    optimizer = _optimizer(model, config)
    start = 0
    if state is None and config.patch_init == "whiten":
        sample = [data[i][0] for i in range(min(_WHITEN_SAMPLE, len(data)))]
        whiten_patches_(model.vision, pixel_values(sample, config.image_size))
    # the moving average starts at the first step's weights (AveragedModel copies them at its first update)
    average = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
    )
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if average is not None:
            average.load_state_dict(state["ema"])
        start = int(state["step"])
    stop = min(until if until is not None else config.steps, config.steps)
    zero_shot = _ZeroShot(config) if config.eval_every and isinstance(data, Shapes) else None
    progress = Progress(config.steps, log)
    batches = _Batches(data, model, config)
    recent: list[float] = []
    began = time.monotonic()
    run.start(start, resumed=state is not None)
    record = run.record
    try:
        evaluated = model if average is None else average.module  # what the run saves
        if zero_shot is not None and start == 0:
            record({"step": 0, **zero_shot(evaluated)})
        tick = time.monotonic()
        for step, pixels, ids in batches.run(start, stop):  # a step's time includes waiting for its batch
            lr = lr_at(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.text.requires_grad_(step >= config.bootstrap_steps)
            loss = contrastive_loss(model(pixels, ids))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            clamp_logit_scale_(model.logit_scale)
            if average is not None:
                average.update_parameters(model)
            recent = (recent + [time.monotonic() - tick])[-20:]
            per_step = sum(recent) / len(recent)
            done = step + 1
            record(
                {
                    "step": done,
                    "loss": loss.item(),
                    "lr": lr,
                    "logit_scale": model.logit_scale.exp().item(),
                    "grad_norm": grad_norm.item(),
                    "pairs_per_s": config.batch_size / per_step,
                    "elapsed": time.monotonic() - began,
                }
            )
            progress.step(done, stop, loss.item(), config.batch_size, per_step, time.monotonic() - began)
            if zero_shot is not None and (done % config.eval_every == 0 or done == config.steps):
                record({"step": done, **zero_shot(evaluated)})
            if done % config.checkpoint_every == 0 or done == stop:
                run.save(
                    done,
                    config,
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    ema=None if average is None else average.state_dict(),
                )
            tick = time.monotonic()
    finally:
        run.close()
    batches.pool.shutdown()
    progress.close()
    if stop == config.steps:
        evaluated.save(out, dtype=config.save_dtype)
        run.plot("training.png")
    return evaluated.requires_grad_(False)
