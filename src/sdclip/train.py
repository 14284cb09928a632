"""Training a small CLIP from scratch on a CPU: contrastive loss, AdamW, warmup + cosine.

``train`` writes into one folder: the model as a Hugging Face ``CLIPModel`` folder
(model.safetensors, config.json, tokenizer and image-processor files; ``sdclip.load`` reads its
text tower as an SD-style conditioner), ``checkpoint.pt`` (model, optimizer and step, to resume),
``metrics.jsonl`` (one JSON object per step, and per evaluation) and ``training.png`` (loss and
zero-shot accuracy).  A resumed run continues exactly where it stopped: the data of step ``s``
depends only on the seed and ``s``, and the checkpoint holds everything else.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .atomic import atomic_path
from .clip import CLIPModel
from .data import Dataset, open_dataset
from .errors import BadInput
from .images import pixel_values
from .loss import clamp_logit_scale_, contrastive_loss
from .model import TextConfig
from .shapes import ZERO_SHOT_TEMPLATES, Shapes, eval_set, labels, phrase
from .vision import VisionConfig, VisionTransformer

_WHITEN_SAMPLE = 512  # pictures whose patches set the whitening


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
        for name in ("steps", "batch_size", "image_size", "patch_size", "vision_width", "vision_layers",
                     "text_width", "text_layers", "embed_dim"):
            if getattr(self, name) < 1:
                raise BadInput(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 1 or self.eval_every < 0 or self.eval_images < 1:
            raise BadInput("checkpoint_every and eval_images must be at least 1, eval_every at least 0")
        if self.batch_size < 2:
            raise BadInput("a contrastive batch needs at least 2 pairs")
        if self.lr <= 0 or self.warmup < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise BadInput("lr and grad_clip must be positive, warmup and weight_decay non-negative")
        if self.bootstrap_steps and (self.data != "shapes" or not 0 < self.bootstrap_steps < self.steps):
            raise BadInput("bootstrap_steps needs the shapes data (captions that name shapes) and fewer steps than "
                           "the run's")
        if not 0 <= self.ema < 1:
            raise BadInput(f"ema is a decay per step, 0 (off) to below 1, got {self.ema}")
        if self.patch_init not in ("whiten", "clip"):
            raise BadInput(f"patch_init must be 'whiten' or 'clip', got {self.patch_init!r}")

    def towers(self) -> tuple[TextConfig, VisionConfig]:
        """The architecture: heads of 64 channels (at least one), MLPs 4x wide, CLIP's vocabulary
        and context of 77 so the text tower is an SD-style conditioner."""
        text = TextConfig(width=self.text_width, layers=self.text_layers, heads=max(self.text_width // 64, 1),
                          mlp_width=4 * self.text_width, activation=self.activation, projection_dim=self.embed_dim)
        vision = VisionConfig(width=self.vision_width, layers=self.vision_layers,
                              heads=max(self.vision_width // 64, 1), mlp_width=4 * self.vision_width,
                              image_size=self.image_size, patch_size=self.patch_size, activation=self.activation,
                              projection_dim=self.embed_dim)
        return text, vision


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
        self.bootstrap = (Shapes(size=config.image_size, seed=config.seed, pair_p=0.0, shape_only=True)
                          if config.bootstrap_steps else None)
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
        self.targets = {s: torch.tensor([self.labels.index((c, sh)) for _, c, sh in items])
                        for s, items in self.sets.items()}

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


class Progress:
    """One status line on stderr: step, loss, pairs/s (or ``unit``/s), elapsed and ETA (a line per 10 s off a
    TTY)."""

    def __init__(self, total: int, stream: TextIO, unit: str = "pairs"):
        self.total, self.stream, self.unit = total, stream, unit
        self.tty = stream.isatty()
        self.last = 0.0

    def update(self, step: int, loss: float, rate: float, elapsed: float, eta: float, force: bool = False) -> None:
        now = time.monotonic()
        if not (self.tty or force or now - self.last >= 10):
            return
        self.last = now
        done = int(24 * step / self.total)
        line = (f"[{'#' * done}{'.' * (24 - done)}] step {step}/{self.total}  loss {loss:.4f}  "
                f"{rate:.1f} {self.unit}/s  elapsed {_clock(elapsed)}  ETA {_clock(eta)}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _save_checkpoint(path: Path, model: CLIPModel, optimizer: torch.optim.Optimizer, config: TrainConfig,
                     step: int, average: AveragedModel | None) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "config": asdict(config), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "ema": None if average is None else average.state_dict()}, tmp)
    os.replace(tmp, path)  # an interrupted save leaves the previous checkpoint whole


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A run's ``checkpoint.pt``, read with ``weights_only`` (tensors and plain data only)."""
    path = Path(folder) / "checkpoint.pt"
    if not path.is_file():
        raise BadInput(f"{folder}: no checkpoint.pt to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on a damaged file
        raise BadInput(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def train(config: TrainConfig, out: str | Path, *, resume: bool = False, until: int | None = None,
          log: TextIO = sys.stderr) -> CLIPModel:
    """Train (or, with ``resume``, continue the run in ``out`` with its saved configuration).

    ``until`` stops after that step with a checkpoint, to continue later; the model folder is
    written when the run reaches ``config.steps``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = None
    if resume:
        state = load_checkpoint(out)
        known = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in state["config"].items() if k in known})
    data = open_dataset(config.data, config.image_size, config.seed, config.partial_captions)
    model = CLIPModel.create(*config.towers(), seed=config.seed).requires_grad_(True)
    optimizer = _optimizer(model, config)
    start = 0
    metrics_path = out / "metrics.jsonl"
    if state is None and config.patch_init == "whiten":
        sample = [data[i][0] for i in range(min(_WHITEN_SAMPLE, len(data)))]
        whiten_patches_(model.vision, pixel_values(sample, config.image_size))
    # the moving average starts at the first step's weights (AveragedModel copies them at its first update)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema \
        else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if average is not None:
            average.load_state_dict(state["ema"])
        start = int(state["step"])
        rows = read_metrics(metrics_path)  # drop what was logged after the checkpoint
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start))
    elif metrics_path.exists():
        metrics_path.unlink()
    stop = min(until if until is not None else config.steps, config.steps)
    zero_shot = _ZeroShot(config) if config.eval_every and isinstance(data, Shapes) else None
    progress = Progress(config.steps, log)
    batches = _Batches(data, model, config)
    recent: list[float] = []
    began = time.monotonic()
    with metrics_path.open("a") as metrics:
        def record(row: dict) -> None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

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
            record({"step": done, "loss": loss.item(), "lr": lr, "logit_scale": model.logit_scale.exp().item(),
                    "grad_norm": grad_norm.item(), "pairs_per_s": config.batch_size / per_step,
                    "elapsed": time.monotonic() - began})
            progress.update(done, loss.item(), config.batch_size / per_step, time.monotonic() - began,
                            (stop - done) * per_step, force=done == stop)
            if zero_shot is not None and (done % config.eval_every == 0 or done == config.steps):
                record({"step": done, **zero_shot(evaluated)})
            if done % config.checkpoint_every == 0 or done == stop:
                _save_checkpoint(out / "checkpoint.pt", model, optimizer, config, done, average)
            tick = time.monotonic()
    batches.pool.shutdown()
    progress.close()
    if stop == config.steps:
        evaluated.save(out, dtype=config.save_dtype)
        plot(read_metrics(metrics_path), out / "training.png")
    return evaluated.requires_grad_(False)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the plot ----------------------------------------------------------------------------------

def plot(rows: list[dict], path: str | Path, width: int = 900, height: int = 360) -> None:
    """Loss (left) and zero-shot accuracy (right) against steps, drawn with Pillow."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    panels = [("training loss", [("loss", (170, 190, 230), losses),
                                 ("mean of 20", (30, 70, 170), _smooth(losses, 20))], None)]
    accuracy = [("seen", (30, 140, 60), [(r["step"], r["zero_shot_seen"]) for r in rows if "zero_shot_seen" in r]),
                ("held out", (200, 90, 20), [(r["step"], r["zero_shot_held_out"]) for r in rows
                                            if "zero_shot_held_out" in r])]
    if accuracy[0][2]:
        panels.append(("zero-shot accuracy", accuracy, (0.0, 1.0)))
    w = width // len(panels)
    last = max([r["step"] for r in rows] + [1])
    for k, (title, series, fixed) in enumerate(panels):
        _panel(draw, (k * w + 55, 30, (k + 1) * w - 20, height - 40), title, series, fixed, last)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _smooth(points: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    values = [v for _, v in points]
    return [(s, sum(values[max(0, i - n + 1):i + 1]) / len(values[max(0, i - n + 1):i + 1]))
            for i, (s, _) in enumerate(points)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: list[tuple[str, tuple[int, int, int], list[tuple[float, float]]]],
           fixed: tuple[float, float] | None, xs_max: int) -> None:
    x0, y0, x1, y1 = box
    points = [p for _, _, ps in series for p in ps]
    draw.rectangle(box, outline=(120, 120, 120))
    draw.text((x0, y0 - 20), title, fill="black")
    if not points:
        return
    lo, hi = fixed or (min(y for _, y in points), max(y for _, y in points))
    hi = hi if hi > lo else lo + 1
    for t in range(5):  # y ticks
        v = lo + (hi - lo) * t / 4
        y = y1 - (y1 - y0) * t / 4
        draw.line((x0 - 4, y, x0, y), fill=(120, 120, 120))
        draw.text((x0 - 50, y - 6), f"{v:.2f}" if fixed or abs(hi) < 100 else f"{v:.0f}", fill="black")
    draw.text((x1 - 60, y1 + 8), f"step {int(xs_max)}", fill="black")
    draw.text((x0, y1 + 8), "0", fill="black")

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * x / xs_max, y1 - (y1 - y0) * (y - lo) / (hi - lo)

    for n, (name, colour, ps) in enumerate(series):
        if len(ps) > 1:
            draw.line([at(x, y) for x, y in ps], fill=colour, width=2)
        elif ps:
            cx, cy = at(*ps[0])
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
        draw.text((x1 - 90, y0 + 6 + 14 * n), name + (f" {ps[-1][1]:.3f}" if ps else ""), fill=colour)
