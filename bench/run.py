"""Every benchmark in one command: one markdown report and one JSON file.

    python bench/run.py [--quick] [--out bench/out]
        [--only model engines roofline workload determinism load start tokenizer clip serve cache]

Each benchmark runs in its own process (no state shared between them) and writes `<name>.md` /
`<name>.json` under --out; this script gathers them into `report.md` and `report.json`.  Ratios
come from contenders timed interleaved in the same process: this machine is noisy, absolute
numbers move between runs, ratios much less.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402

BENCHES = {
    "model": ["bench_model.py", "--compile"],  # (a) batch 1, (b) batch 8/32 + int8 + compile, (d) pooled-only, peak
    "engines": ["bench_engines.py", "--threads", "1"],  # vs ONNX Runtime, OpenVINO, torch.compile, int8 paths
    "roofline": ["bench_roofline.py"],  # after engines: its contenders against this CPU's GEMM ceiling
    "workload": ["bench_workload.py"],  # (c) a realistic generation workload
    "determinism": ["bench_determinism.py"],  # what the same-answer guarantee costs on (a)-(d)
    "load": ["bench_load.py"],  # (e) cold start from a 2 GB SD1 file, peak memory
    "start": ["bench_start.py"],  # (e) commands without a model: process start to exit, no torch
    "tokenizer": ["bench_tokenizer.py"],  # (f) tokenizer vs CLIPTokenizerFast
    "clip": ["bench_clip.py"],  # CLIP training pairs/s and encode_image images/s
    "serve": ["bench_serve.py"],  # sdclip serve under load: exactness, latency, overload, disconnects
    "cache": ["bench_cache.py"],  # sdclip cache: local engine vs raw encode, dedup, Ray, RSS on 1M rows
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=list(BENCHES))
    ap.add_argument("--out", default=str(HERE / "out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = [f"# sdclip benchmarks\n\nMachine: {machine()}\n"]
    results = {"machine": machine()}
    for name in args.only:
        script = HERE / BENCHES[name][0]
        cmd = [sys.executable, str(script), *BENCHES[name][1:], "--out", str(out)] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            report.append(f"## {name}\n\nFAILED (exit {done.returncode})\n")
            continue
        md, js = out / f"{name}.md", out / f"{name}.json"
        report.append(f"## {name} ({seconds:.0f} s)\n\n" + (md.read_text() if md.exists() else done.stdout))
        if js.exists():
            results[name] = json.loads(js.read_text())
    (out / "report.md").write_text("\n".join(report))
    (out / "report.json").write_text(json.dumps(results, indent=2))
    print("\n".join(report))


if __name__ == "__main__":
    main()
