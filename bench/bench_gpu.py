"""GPU speed, fp16 (or bf16): batch-1 latency and batch-512 throughput, sdclip (eager and CUDA
graph) vs transformers CLIPTextModel (sdpa, eager) on the same random ViT-L/14 weights and GPU.

Ready to run as is on a CUDA machine (about 2-4 minutes on an H100; well under 10):

    python bench/bench_gpu.py [--dtype float16] [--out bench/out]

Targets (issue 5): batch-1 <= 1 ms fp16 on an H100, >= 20k prompts/s at batch 512.
Issue 14 keeps the targets: batch-1 <= 1 ms with CUDA graphs, >= 1.1x transformers in throughput.
sdclip's optional engines (``backend="onnxruntime" | "openvino"``, sdclip.backends) run on the CPU
only (float32): on a GPU they hand every call to the torch tower, so they have no row here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import unique_prompts
from common import random_vit_l, write_results

import sdclip
from sdclip.accel import CudaGraphEncoder


def cuda_ms(fn, repeats: int, warmup: int = 10) -> float:
    """Median milliseconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as folder:
        hf = {impl: m.cuda() for impl, m in random_vit_l(folder, torch_dtype=dtype).items()}
        te = sdclip.load(folder, dtype=args.dtype, device="cuda")
    tower = te.towers[0]
    rows = []
    for batch, repeats in ((1, 200), (512, 20)):
        ids = te.tokenize(unique_prompts(batch, seed=batch)).cuda()
        graph = CudaGraphEncoder(tower, batch, pooled=True)
        with torch.inference_mode():
            diff = (tower(ids).hidden.float() - hf["sdpa"](ids).last_hidden_state.float()).abs().max().item()
            contenders = {
                "sdclip CUDA graph": lambda: graph(ids),
                "sdclip eager": lambda: tower(ids),
                "transformers sdpa": lambda: hf["sdpa"](ids),
                "transformers eager": lambda: hf["eager"](ids),
            }
            ms = {name: cuda_ms(fn, repeats) for name, fn in contenders.items()}
        for name, t in ms.items():
            rows.append(
                {
                    "workload": f"batch {batch}, {args.dtype}",
                    "implementation": name,
                    "ms": f"{t:.3f}",
                    "prompts/s": f"{batch / t * 1e3:.0f}",
                    "vs transformers sdpa": f"{ms['transformers sdpa'] / t:.2f}x",
                    "notes": f"max abs diff vs transformers {diff:.1e}" if name == "sdclip eager" else "",
                }
            )
    device = torch.cuda.get_device_name()
    print(
        write_results(
            "gpu",
            rows,
            ["workload", "implementation", "ms", "prompts/s", "vs transformers sdpa", "notes"],
            args.out,
            {"device": device},
        )
    )
    print(json.dumps({"device": device}))


if __name__ == "__main__":
    main()
