"""Text-encoder speed on random ViT-L/14 weights: sdclip vs transformers CLIPTextModel (sdpa and
eager), same weights, same process, interleaved repetitions; fp32 CPU.

Workloads: (a) batch-1 latency, (b) batch 8 / 32 of unique 77-token prompts (also int8, with its
fidelity), (d) pooled-only requests (zero-shot labels), plus the machine's fp32 matmul peak and
the fraction of it each contender reaches.

    python bench/bench_model.py [--quick] [--out bench/out]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_roofline import tower_flops
from common import median, paired, random_vit_l, write_results

import sdclip

WORDS = (
    "astronaut horse mars detailed portrait landscape castle forest river mountain sunset neon city "
    "dragon knight robot ocean ship storm painting photo cinematic lighting volumetric fog golden hour "
    "masterpiece watercolor oil sketch anime studio ghibli octane render unreal engine trending artstation "
    "sharp focus bokeh macro wide angle elegant intricate ornate baroque gothic futuristic vintage"
).split()
LABELS = (
    "cat dog fox horse car plane ship bird tree house flower mountain person bicycle train bus "
    "apple banana chair table clock lamp guitar piano book cup bottle phone laptop shoe hat"
).split()


def unique_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts long enough to fill all 77 positions, each different from the first word on."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(90)) for _ in range(n)]


def matmul_peak(seconds: float = 3.0) -> float:
    """Sustained fp32 GFLOP/s of a large square matrix product on this machine."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
    return best


def cosine_fidelity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Mean and min per-token cosine, and max |Δ|, of b against reference a ([B, 77, C])."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return cos.mean().item(), cos.min().item(), (a - b).abs().max().item()


def build(folder: str):
    return random_vit_l(folder), sdclip.load(folder), sdclip.load(folder, quantize="int8")


def run(quick: bool = False, compile: bool = False) -> tuple[list[dict], dict]:
    """``compile``: also time ``sdclip.load(..., compile=True)`` (its first call per shape, which compiles, in
    the notes)."""
    repeats = 5 if quick else 15
    peak = matmul_peak(1.5 if quick else 4.0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        hf, te, te8 = build(folder)
        compiled = sdclip.load(folder, compile=True).towers[0] if compile else None
    tower, tower8 = te.towers[0], te8.towers[0]
    flops = tower_flops(1)["total"]

    for batch in (1, 8, 32):
        ids = te.tokenize(unique_prompts(batch, seed=batch))
        with torch.inference_mode():
            ref = hf["sdpa"](ids).last_hidden_state
            exact = (tower(ids).hidden - ref).abs().max().item()
            fid = cosine_fidelity(ref, tower8(ids).hidden)
            contenders = {
                "sdclip": lambda: tower(ids),
                "sdclip int8": lambda: tower8(ids),
                "transformers sdpa": lambda: hf["sdpa"](ids),
                "transformers eager": lambda: hf["eager"](ids),
            }
            if compiled is not None:
                t0 = time.perf_counter()
                compiled_diff = (compiled(ids).hidden - ref).abs().max().item()
                compile_s = time.perf_counter() - t0
                contenders["sdclip torch.compile"] = lambda: compiled(ids)
            times = paired(contenders, repeats=max(3, repeats // (2 if batch == 32 else 1)))
        base = median(times["transformers sdpa"])
        for name, ts in times.items():
            t = median(ts)
            note = f"max abs diff {exact:.1e}" if name == "sdclip" else ""
            if name == "sdclip torch.compile":
                note = f"first call (compile) {compile_s:.0f} s, max abs diff {compiled_diff:.1e}"
            if name == "sdclip int8":
                note = f"cosine mean {fid[0]:.5f} / min {fid[1]:.5f}, max abs diff {fid[2]:.3f}"
            rows.append(
                {
                    "workload": f"(a/b) batch {batch}, unique 77-token prompts",
                    "implementation": name,
                    "ms": f"{t * 1e3:.1f}",
                    "prompts/s": f"{batch / t:.2f}",
                    "vs transformers sdpa": f"{base / t:.2f}x",
                    "% of matmul peak": f"{100 * batch * flops / t / 1e9 / peak:.0f}%",
                    "notes": note,
                }
            )

    labels = [f"a photo of a {label}" for label in LABELS] * 2  # 64 zero-shot prompts
    ids = te.tokenize(labels)
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        sdclip.Tokenizer().save_hf(d)
        longest = CLIPTokenizer.from_pretrained(d)(labels, padding=True, return_tensors="pt")
    with torch.inference_mode():
        pooled = te.encode_ids(ids, hidden=False).pooled
        exact = (pooled - hf["sdpa"](ids).pooler_output).abs().max().item()
        te.reuse.cache.clear()
        times = paired(
            {
                "sdclip pooled-only": lambda: te.encode_ids(ids, hidden=False),
                "transformers sdpa, padded to 77": lambda: hf["sdpa"](ids),
                "transformers sdpa, padded to longest + mask": lambda: hf["sdpa"](**longest),
            },
            repeats=repeats,
        )
    base = median(times["transformers sdpa, padded to 77"])
    for name, ts in times.items():
        t = median(ts)
        rows.append(
            {
                "workload": "(d) pooled only: 64 zero-shot label prompts",
                "implementation": name,
                "ms": f"{t * 1e3:.1f}",
                "prompts/s": f"{64 / t:.1f}",
                "vs transformers sdpa": f"{base / t:.2f}x",
                "notes": f"max abs diff {exact:.1e}" if name.startswith("sdclip") else "",
            }
        )
    return rows, {"matmul_peak_gflops": peak, "flops_per_prompt": flops}


HEADER = ["workload", "implementation", "ms", "prompts/s", "vs transformers sdpa", "% of matmul peak", "notes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling per batch size)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args()
    rows, extra = run(args.quick, args.compile)
    print(write_results("model", rows, HEADER, args.out, extra))
    print(f"fp32 matmul peak: {extra['matmul_peak_gflops']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
