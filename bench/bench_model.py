"""Text-encoder speed: sdclip vs transformers CLIPTextModel (sdpa and eager), same random
ViT-L/14 weights, same process, interleaved repetitions; fp32 CPU, 77 tokens.

    python bench/bench_model.py [--batches 1 8] [--repeats 15] [--out bench/out]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, paired, write_results  # noqa: E402

import sdclip  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse on mars, highly detailed, 8k, trending on artstation, "
           "masterpiece, best quality, sharp focus, dramatic lighting, volumetric fog, by greg rutkowski "
           "and alphonse mucha, intricate, elegant, cinematic, octane render, unreal engine, wide angle"] * 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args()

    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", eos_token_id=49407)
    hf = {impl: CLIPTextModel(config).eval() for impl in ("sdpa",)}
    with tempfile.TemporaryDirectory() as d:
        hf["sdpa"].save_pretrained(d)
        te = sdclip.load(d)
        hf["eager"] = CLIPTextModel.from_pretrained(d, attn_implementation="eager").eval()
        hf["sdpa"] = CLIPTextModel.from_pretrained(d, attn_implementation="sdpa").eval()
    tower = te.towers[0]
    rows = []
    for batch in args.batches:
        ids = te.tokenize(PROMPTS[:batch])
        with torch.inference_mode():
            ref = hf["sdpa"](ids).last_hidden_state
            diff = (tower(ids).hidden - ref).abs().max().item()
            times = paired({
                "sdclip": lambda: tower(ids),
                "transformers sdpa": lambda: hf["sdpa"](ids),
                "transformers eager": lambda: hf["eager"](ids),
            }, repeats=args.repeats)
        base = median(times["transformers sdpa"])
        for name, ts in times.items():
            rows.append({"workload": f"batch {batch}", "implementation": name,
                         "ms/batch": f"{median(ts) * 1e3:.1f}", "prompts/s": f"{batch / median(ts):.2f}",
                         "vs transformers sdpa": f"{base / median(ts):.3f}x",
                         "max abs diff": f"{diff:.1e}" if name == "sdclip" else ""})
    print(write_results("model", rows, ["workload", "implementation", "ms/batch", "prompts/s",
                                        "vs transformers sdpa", "max abs diff"], args.out))


if __name__ == "__main__":
    main()
