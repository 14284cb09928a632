"""What the same-answer-whatever-ran-before guarantee costs: sdclip's default reuse (fixed-shape micro-batches of 8
rows, identical rows once, pooled-only rows cut at their own EOS; bit-identical whatever the companions, history
or threads) against ``micro_batch=1`` (also bit-stable) and the earlier behaviour (shared prefixes, batches of
any size: fastest, but a prompt's bits depend on what ran before), on the same random ViT-L/14 text tower:

  (a) one unique 77-token prompt through ``TextEncoder.encode_ids``; (b) 8 and 32 unique prompts;
  (c) bench_workload's generation workload through ``Conditioner(te, "a1111")`` from cold caches;
  (d) 64 zero-shot label prompts, pooled only.

    python bench/bench_determinism.py [--quick] [--out bench/out]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import LABELS, unique_prompts
from bench_workload import NEGATIVE, workload
from common import median, paired, write_results

import sdclip
from sdclip.checkpoint import Usage
from sdclip.model import TextConfig, TextTransformer
from sdclip.reuse import ReusingRunner

MODES = {
    "default: micro_batch 8": lambda: ReusingRunner(8),
    "micro_batch 1": lambda: ReusingRunner(1),
    "before: shared prefixes, any batch": lambda: ReusingRunner(32, prefixes=True),
}
BASE = "before: shared prefixes, any batch"


def run(quick: bool = False) -> list[dict]:
    tower = TextTransformer(TextConfig()).init_weights(torch.Generator().manual_seed(0))
    encoders = {
        name: sdclip.TextEncoder([tower], [Usage(-1, True)], [sdclip.Tokenizer()], "sd1", reuse=make())
        for name, make in MODES.items()
    }
    tok = sdclip.Tokenizer()
    lines = workload(8 if quick else 12)
    labels = tok([f"a photo of a {label}" for label in LABELS] * 2)

    def cold(te):
        te.reuse.cache.clear()
        return sdclip.Conditioner(te, "a1111", cache=None).encode(lines, negative=NEGATIVE)

    workloads = {
        "(a) 1 unique prompt": lambda te, ids=tok(unique_prompts(1, seed=1)): te.encode_ids(ids),
        "(b) 8 unique prompts": lambda te, ids=tok(unique_prompts(8, seed=8)): te.encode_ids(ids),
        **(
            {}
            if quick
            else {"(b) 32 unique prompts": lambda te, ids=tok(unique_prompts(32, seed=32)): te.encode_ids(ids)}
        ),
        "(c) generation workload, a1111, cold": cold,
        "(d) 64 label prompts, pooled only": lambda te: te.encode_ids(labels, hidden=False),
    }
    rows = []
    with torch.inference_mode():
        for workload_name, fn in workloads.items():
            times = paired({name: (lambda te=te: fn(te)) for name, te in encoders.items()}, repeats=2 if quick else 5)
            base = median(times[BASE])
            for name in encoders:
                t = median(times[name])
                rows.append(
                    {"workload": workload_name, "reuse": name, "ms": f"{t * 1e3:.0f}", "vs before": f"{base / t:.2f}x"}
                )
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args()
    print(write_results("determinism", run(args.quick), ["workload", "reuse", "ms", "vs before"], args.out))


if __name__ == "__main__":
    main()
