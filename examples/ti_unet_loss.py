"""Textual inversion with a diffusion U-Net's loss: sdclip learns the word, diffusers supplies the U-Net.

    python examples/ti_unet_loss.py stable-diffusion-v1-5/stable-diffusion-v1-5 my_cat_photos/ \\
        --token "<my-cat>" --init-word cat --out runs/my-cat --device cuda

The text encoder(s) are sdclip's, the VAE and U-Net diffusers'; all stay frozen.  Each step
``sdclip.train_embedding`` hands ``unet_loss`` a ``PromptBatch``: the conditioning of a batch of caption
templates with the word's vectors in place, exactly as the pipeline's U-Net reads it (SDXL: both encoders and
the pooled output).  The loss is the U-Net's noise-prediction error on the example images' latents at random
timesteps, the objective of the textual-inversion paper.  Every random number comes from ``batch.generator``,
so ``--resume`` continues the run exactly.  The result is written as ``<out>/<name>.safetensors``, which A1111,
ComfyUI and diffusers (``load_textual_inversion``; the script prints how) load beside the unchanged checkpoint.

Needs diffusers (``pip install diffusers``) and, for SD-sized models, a GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image

import sdclip

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def load_pixels(folder: Path, size: int) -> torch.Tensor:
    """[N, 3, size, size] in [-1, 1]: each image centre-cropped to a square and resized, as the VAE expects."""
    out = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES):
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    if not out:
        raise SystemExit(f"{folder}: no images ({', '.join(SUFFIXES)})")
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="diffusers pipeline folder or hub id (SD 1.x, 2.x or SDXL)")
    parser.add_argument("images", type=Path, help="folder of example images")
    parser.add_argument("--token", required=True)
    parser.add_argument("--init-word", required=True)
    parser.add_argument("--vectors", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="training resolution (SDXL: 1024)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # the frozen U-Net's
    te = sdclip.load(args.pipeline, device=device)  # float32: the learned vectors' gradients stay exact
    vae = AutoencoderKL.from_pretrained(args.pipeline, subfolder="vae").to(device)  # float32: SDXL's overflows in fp16
    unet = UNet2DConditionModel.from_pretrained(args.pipeline, subfolder="unet", torch_dtype=dtype).to(device)
    scheduler = DDPMScheduler.from_pretrained(args.pipeline, subfolder="scheduler")
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    with torch.no_grad():  # the latents' mean: one deterministic latent per image, encoded once
        pixels = load_pixels(args.images, args.size).to(device)
        latents = (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).to(dtype)
    del vae
    alphas = scheduler.alphas_cumprod.to(device)

    def unet_loss(batch: sdclip.PromptBatch) -> torch.Tensor:
        g, b = batch.generator, len(batch.prompts)
        x0 = latents[torch.randint(len(latents), (b,), generator=g).to(device)]
        noise = torch.randn(x0.shape, generator=g).to(device, dtype)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g).to(device)
        a = alphas[t].to(dtype).view(b, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        extra = {}
        if batch.pooled is not None:  # SDXL: pooled text embedding and size / crop conditioning
            time_ids = torch.tensor([args.size, args.size, 0, 0, args.size, args.size], device=device).repeat(b, 1)
            extra["added_cond_kwargs"] = {"text_embeds": batch.pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        pred = unet(noisy, t, encoder_hidden_states=batch.hidden.to(dtype), **extra).sample
        if scheduler.config.prediction_type == "v_prediction":  # SD 2.x 768
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    embedding = sdclip.train_embedding(
        te,
        loss_fn=unet_loss,
        token=args.token,
        init_word=args.init_word,
        vectors=args.vectors,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        out=args.out,
        resume=args.resume,
    )
    path = sdclip.save_embedding(embedding, Path(args.out) / f"{embedding.name}.safetensors")
    if len(embedding.vectors) == 2:  # SDXL: diffusers loads each encoder's part on its own
        how = (
            f"from safetensors.torch import load_file; parts = load_file({str(path)!r}); "
            f"pipe.load_textual_inversion(parts['clip_l'], token={embedding.token!r}, "
            f"text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer); the same with parts['clip_g'], "
            f"pipe.text_encoder_2, pipe.tokenizer_2"
        )
    else:
        how = f"pipe.load_textual_inversion({str(path)!r}, token={embedding.token!r})"
    print(f"wrote {path}; diffusers: {how}; A1111 / ComfyUI prompts call it {embedding.name}")


if __name__ == "__main__":
    main()
