"""Contrastive-CLIP speed on this CPU: training pairs/s and encode_image images/s for a few
model sizes (random weights, a fixed shapes batch; steady state after two warm-up steps).

    python bench/bench_clip.py [--threads 1] [--batch 128] [--steps 4] [--configs tiny base] [--out DIR] [--quick]

"tiny" is sdclip-mini's shape.  ``cpu/wall`` below 0.9 x threads means other processes share the
cores: the figures are then lower bounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from sdclip.clip import CLIPModel
from sdclip.images import pixel_values
from sdclip.loss import clamp_logit_scale_, contrastive_loss
from sdclip.shapes import Shapes
from sdclip.train import TrainConfig, _optimizer

CONFIGS = {
    "tiny": dict(
        text_width=128, text_layers=2, vision_width=128, vision_layers=3, image_size=48, patch_size=8, embed_dim=128
    ),
    "small": dict(
        text_width=128, text_layers=2, vision_width=192, vision_layers=3, image_size=48, patch_size=8, embed_dim=128
    ),
    "small64": dict(
        text_width=128, text_layers=2, vision_width=128, vision_layers=4, image_size=64, patch_size=8, embed_dim=128
    ),
    "base": dict(text_width=256, text_layers=4, vision_width=256, vision_layers=4, image_size=64, patch_size=8),
}


def measure(name: str, batch: int, steps: int) -> dict:
    config = TrainConfig(batch_size=batch, **CONFIGS[name])
    model = CLIPModel.create(*config.towers()).requires_grad_(True)
    optimizer = _optimizer(model, config)
    items = [Shapes(size=config.image_size)[i] for i in range(batch)]
    t0 = time.perf_counter()
    pixels = pixel_values([im for im, _ in items], config.image_size)
    ids = model.tokenize([caption for _, caption in items])
    prep = time.perf_counter() - t0

    def step() -> None:
        loss = contrastive_loss(model(pixels, ids))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        clamp_logit_scale_(model.logit_scale)

    step(), step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
    model.requires_grad_(False)
    model.encode_image(pixels[:16])
    t0 = time.perf_counter()
    model.encode_image(pixels)
    encode = batch / (time.perf_counter() - t0)
    size = sum(p.numel() for p in model.parameters()) * 2 / 1e6
    return {
        "config": name,
        "train pairs/s": round(batch / wall, 1),
        "s/step": round(wall, 2),
        "cpu/wall": round(cpu / wall, 2),
        "encode_image images/s": round(encode, 1),
        "batch prep ms": round(prep * 1000),
        "fp16 MB": round(size, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--quick", action="store_true", help="the shipped shape only, two timed steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs, steps = (["tiny"], 2) if args.quick else (args.configs, args.steps)
    rows = [measure(name, args.batch, steps) for name in configs]
    print(write_results("clip", rows, list(rows[0]), args.out, {"batch": args.batch, "threads": args.threads}))


if __name__ == "__main__":
    main()
