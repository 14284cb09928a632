"""(c) A realistic generation workload, as `sdclip encode --file F --negative N --dialect a1111` sees it:
prompts sharing quality prefixes, some 2-3 chunks long, several images per prompt, one negative for all.

Contenders, same random ViT-L/14 weights, same rows of token ids (A1111's chunks):
  * sdclip: ``Conditioner(te, "a1111").encode(file_prompts, negative=N)`` from cold caches (one process run);
  * transformers CLIPTextModel (sdpa) batched over the same encodes (every image's chunks and negative, 32 rows
    a batch, no reuse);
  * a diffusers-style loop: each image's prompt and negative encoded on their own, chunk by chunk.

    python bench/bench_workload.py [--quick] [--out bench/out]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import WORDS, build
from common import median, paired, write_results

import sdclip
from sdclip.cache import default_cache
from sdclip.prompts import a1111

PREFIXES = [
    "masterpiece, best quality, ultra detailed, 8k, ",
    "photo, realistic, sharp focus, dslr, ",
    "anime style, key visual, vibrant, studio quality, ",
]
NEGATIVE = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, cropped, worst quality, jpeg artifacts"
)
IMAGES_PER_PROMPT = 4


def workload(n_prompts: int = 12, seed: int = 0) -> list[str]:
    """The file's lines: each prompt once per image; a quarter of them long (2-3 chunks)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n_prompts):
        words = rng.randint(90, 150) if i % 4 == 0 else rng.randint(8, 30)
        subject = ", ".join(" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(words // 3))
        prompts.append(rng.choice(PREFIXES) + subject + (", (glowing eyes:1.2)" if i % 3 == 0 else ""))
    return [p for p in prompts for _ in range(IMAGES_PER_PROMPT)]


def chunk_rows(tok: sdclip.Tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(a1111.chunk(text, tok).ids)


def run(quick: bool = False) -> list[dict]:
    lines = workload(8 if quick else 12)
    with tempfile.TemporaryDirectory() as folder:
        hf, te, _ = build(folder)
    hf = hf["sdpa"]
    tok = te.tokenizers[0]
    rows = torch.cat([torch.cat([chunk_rows(tok, p), chunk_rows(tok, NEGATIVE)]) for p in lines])
    per_image = [(chunk_rows(tok, p), chunk_rows(tok, NEGATIVE)) for p in lines]

    def sdclip_cold():
        default_cache.clear()
        te.reuse.cache.clear()
        return sdclip.Conditioner(te, "a1111").encode(lines, negative=NEGATIVE)

    def transformers_batched():
        return [hf(rows[s : s + 32]).last_hidden_state for s in range(0, len(rows), 32)]

    def diffusers_loop():
        return [(hf(p).last_hidden_state, hf(n).last_hidden_state) for p, n in per_image]

    with torch.inference_mode():
        out = sdclip_cold()
        reference = torch.cat(transformers_batched())  # unweighted: compare the prompts without emphasis
        plain = [i for i, line in enumerate(lines) if "(" not in line and len(chunk_rows(tok, line)) == 1]
        row_of = {}
        r = 0
        for i, line in enumerate(lines):
            row_of[i] = r
            r += len(chunk_rows(tok, line)) + 1
        diff = max((out.hidden[i, :77] - reference[row_of[i]]).abs().max().item() for i in plain)
        times = paired(
            {
                "sdclip (a1111 dialect, cold caches)": sdclip_cold,
                "transformers sdpa, batched, no reuse": transformers_batched,
                "diffusers-style loop (prompt and negative per image)": diffusers_loop,
            },
            repeats=2 if quick else 4,
        )
    base = median(times["transformers sdpa, batched, no reuse"])
    out_rows = []
    for name, ts in times.items():
        t = median(ts)
        out_rows.append(
            {
                "workload": f"(c) {len(lines) // IMAGES_PER_PROMPT} prompts x {IMAGES_PER_PROMPT} images + "
                f"negative, {len(rows)} chunk encodes",
                "implementation": name,
                "ms": f"{t * 1e3:.0f}",
                "images/s": f"{len(lines) / t:.2f}",
                "vs transformers sdpa": f"{base / t:.2f}x",
                "notes": f"max abs diff on unweighted 1-chunk prompts {diff:.1e}; {len(rows.unique(dim=0))}"
                f" distinct rows"
                if name.startswith("sdclip")
                else "",
            }
        )
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args()
    print(
        write_results(
            "workload",
            run(args.quick),
            ["workload", "implementation", "ms", "images/s", "vs transformers sdpa", "notes"],
            args.out,
        )
    )


if __name__ == "__main__":
    main()
