"""Loading SD1's text encoder from a 2 GB single file: peak memory and `sdclip encode` wall time.

Builds (once) a synthetic SD1-layout fp16 .safetensors of ~2 GB: a random CLIP-L text encoder at
`cond_stage_model.transformer.text_model.*` plus U-Net- and VAE-sized filler, as
v1-5-pruned-emaonly-fp16 holds them.  Each measurement runs in a fresh process.

    python bench/bench_load.py [--file bench/out/sd1-synthetic-2gb.safetensors] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_results

MEASURE = r"""
import json, sys, time
def status(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
import torch, sdclip
base = status('VmRSS')
t0 = time.perf_counter()
te = sdclip.load(sys.argv[1], dtype=sys.argv[2])
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in te.towers[0].parameters())
print(json.dumps({"seconds": seconds, "base": base, "peak": status('VmHWM'), "after": status('VmRSS'),
                  "weights": weights}))
"""


# `sdclip encode` from start to output, phase by phase, in one fresh process (the CLI's own steps)
PHASES = r"""
import time; t0 = time.perf_counter()
import sys, json
marks = []
def mark(name): marks.append((name, time.perf_counter()))
import torch; mark("import torch")
import sdclip, sdclip.encoder, sdclip.cli; mark("import sdclip (encoder, cli)")
te = sdclip.load(sys.argv[1], backend=sys.argv[3]); mark("sdclip.load: read the text encoder from the file")
out = te.encode(["a photo of a cat"])
mark("encode one prompt" + (" (engine session built from the cached export)" if sys.argv[3] != "torch" else ""))
sdclip.cli._write_tensors(sys.argv[2], {"hidden": out.hidden, "pooled": out.pooled}, {}); mark("write the .safetensors")
prev, rows = t0, []
for name, t in marks:
    rows.append((name, t - prev)); prev = t
print(json.dumps({"rows": rows, "total": prev - t0}))
"""


def build(path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    ).half()
    tensors = {f"cond_stage_model.transformer.{k}": v for k, v in te.state_dict().items()}
    unet_params = 859_520_964  # SD1 U-Net
    for i in range(unet_params // (1280 * 1280)):
        tensors[f"model.diffusion_model.filler.{i}.weight"] = torch.empty(1280, 1280, dtype=torch.float16)
    for i in range(83_653_863 // (512 * 512)):  # VAE
        tensors[f"first_stage_model.filler.{i}.weight"] = torch.empty(512, 512, dtype=torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=str(Path(__file__).parent / "out" / "sd1-synthetic-2gb.safetensors"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    ap.add_argument("--quick", action="store_true", help="one repetition")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    path = Path(args.file)
    if not path.exists():
        print(f"building {path} ...", file=sys.stderr)
        build(path)
    size = path.stat().st_size
    rows = []
    for dtype in ("float32", "float16"):
        runs = [
            json.loads(
                subprocess.run(
                    [sys.executable, "-c", MEASURE, str(path), dtype], check=True, capture_output=True, text=True
                ).stdout
            )
            for _ in range(args.repeats)
        ]
        peak = median([r["peak"] - r["base"] for r in runs])
        weights = runs[0]["weights"]
        rows.append(
            {
                "measure": f"load text encoder as {dtype}",
                "file": f"{size / 2**30:.2f} GiB",
                "seconds": f"{median([r['seconds'] for r in runs]):.2f}",
                "peak RSS over baseline": f"{peak / 2**20:.0f} MiB",
                "text-encoder weight bytes": f"{weights / 2**20:.0f} MiB",
                "peak / weights": f"{peak / weights:.2f}x",
            }
        )
    walls = []
    out = Path(args.out) / "bench-load-encode.safetensors"
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run(
            ["sdclip", "encode", "a photo of a cat", "--model", str(path), "--out", str(out)],
            check=True,
            capture_output=True,
        )
        walls.append(time.perf_counter() - t0)
    rows.append(
        {
            "measure": "`sdclip encode` one prompt, process start to output (warm page cache)",
            "file": f"{size / 2**30:.2f} GiB",
            "seconds": f"{median(walls):.2f}",
        }
    )
    for backend in ("torch", "onnxruntime"):
        if backend != "torch" and importlib.util.find_spec(backend) is None:
            continue
        t0 = time.perf_counter()  # the interpreter's own start-up: what the phases do not see
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python_start = time.perf_counter() - t0
        runs = [
            json.loads(
                subprocess.run(
                    [sys.executable, "-c", PHASES, str(path), str(out), backend],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.splitlines()[-1]
            )
            for _ in range(args.repeats + (backend != "torch"))
        ][(backend != "torch") :]  # first: the export
        phases = [("python start-up", python_start)] + [
            (name, median([r["rows"][i][1] for r in runs])) for i, (name, _) in enumerate(runs[0]["rows"])
        ]
        for name, seconds in phases:
            rows.append(
                {
                    "measure": f"phase, backend={backend}: {name}",
                    "file": f"{size / 2**30:.2f} GiB",
                    "seconds": f"{seconds:.2f}",
                }
            )
        rows.append(
            {
                "measure": f"phases total, backend={backend}",
                "file": f"{size / 2**30:.2f} GiB",
                "seconds": f"{sum(s for _, s in phases):.2f}",
            }
        )
    print(
        write_results(
            "load",
            rows,
            ["measure", "file", "seconds", "peak RSS over baseline", "text-encoder weight bytes", "peak / weights"],
            args.out,
        )
    )


if __name__ == "__main__":
    main()
