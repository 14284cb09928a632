"""Shared pieces of the benchmarks: paired timing, machine description, result tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {date.today().isoformat()}"
    )


def paired(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved (A B C A B C ...), so that drift in a
    noisy machine hits every contender alike.  Returns seconds per call; ``cpu``, when given, collects
    the process's CPU seconds per call too (all threads: on a loaded machine the time a call waited
    for a core is not in it)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_results(
    name: str, rows: list[dict], header: list[str], out_dir: str | Path, extra: dict | None = None
) -> str:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``; return the markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(h, "")) for h in header) + " |")
    table = "\n".join(lines)
    md = f"Machine: {machine()}\n\n{table}\n"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    return md


def vit_l_config():
    """The CLIP ViT-L/14 text tower's ``CLIPTextConfig`` (SD1's text encoder): the shape every model benchmark
    runs and the FLOP counts of ``bench_roofline`` come from."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        eos_token_id=49407,
    )


def random_vit_l(folder: str, **load: object) -> dict[str, torch.nn.Module]:
    """A CLIP ViT-L/14 text tower with random weights (seed 0), saved to ``folder`` as a transformers folder
    and loaded back as transformers' ``CLIPTextModel`` with sdpa and eager attention (``load``: more
    ``from_pretrained`` arguments, e.g. ``torch_dtype``): the weights every model benchmark compares on."""
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    CLIPTextModel(vit_l_config()).save_pretrained(folder)
    return {
        impl: CLIPTextModel.from_pretrained(folder, attn_implementation=impl, **load).eval()
        for impl in ("sdpa", "eager")
    }
