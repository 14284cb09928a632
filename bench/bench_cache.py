"""`sdclip cache` throughput and memory, on the bundled sdclip-mini.

* local engine vs raw encode: the same unique captions, the same batches of 64, timed interleaved; raw =
  ``encode_prompts`` per batch (no I/O), the job = ``cachejob.run`` on a file of those captions into a fresh
  folder (reading, hashing, shards, commits, index, manifest included; the model already in memory);
* the dedup gain apart: the same job on a file where every caption appears 4 times (rows/s);
* Ray vs local: whole jobs with ``--engine ray`` (2 actors, on this machine's cores) and the local engine on
  16,384 unique captions in shards of 1,024 (Ray spreads shards over actors), when a local Ray starts;
* memory: peak RSS of whole ``sdclip cache`` processes on 100k and 1M rows (2,000 distinct captions:
  the streaming passes), and the dedup table's bytes per unique caption (1M unique captions planned).

  python bench/bench_cache.py [--quick] [--out bench/out]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, paired, write_results

import sdclip
from sdclip import cachejob

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "grey", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "oval"]
PLACES = ["on a table", "in the sky", "under water", "on grass", "in a box", "beside a tree", "at night", ""]


def captions(n: int, seed: int = 0) -> list[str]:
    """n distinct captions of the shapes world (a counter keeps them distinct)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(['a', 'one', 'the'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)} "
        f"{rng.choice(PLACES)} number {i}".replace("  ", " ")
        for i in range(n)
    ]


def _job(te, path: Path, folder: Path, engine: str = "local", shard_rows: int = 4096) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    options = cachejob.CacheOptions(dtype="float16", batch_size=64, shard_rows=shard_rows)
    return cachejob.run(
        [str(path)], folder, options, engine=engine, workers=2, progress=None, te=te if engine == "local" else None
    )


def ray_phase(te, n: int, work: Path, out: list[dict], base: float) -> dict:
    """Ray (2 actors) vs local on n unique captions in shards of 1,024 (Ray spreads shards over actors).  Each
    timed Ray job includes what every job pays: planning, starting the actor pool, loading the model in each
    actor; starting Ray itself (once per cluster, or once per job without --address) is reported apart."""
    path = work / "ray.txt"
    path.write_text("\n".join(captions(n, seed=3)) + "\n")
    try:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - t0
        try:
            times = paired(
                {
                    "ray": lambda: _job(None, path, work / "r", engine="ray", shard_rows=1024),
                    "local": lambda: _job(te, path, work / "l", shard_rows=1024),
                },
                2,
            )
        finally:
            ray.shutdown()
    except Exception as e:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()  # what a failed start left running
        return {"ray_vs_local": f"not measured: {type(e).__name__}: {str(e)[:160]}"}
    for name, label in (("local", "local engine, shards of 1,024"), ("ray", "ray engine (2 actors), shards of 1,024")):
        out.append(
            {
                "contender": label,
                "rows": n,
                "seconds (median)": round(median(times[name]), 3),
                "rows/s": round(n / median(times[name]), 1),
                "vs raw": round(n / median(times[name]) / base, 3),
            }
        )
    return {"ray_vs_local": round(median(times["local"]) / median(times["ray"]), 3), "ray_init_s": round(ray_init, 2)}


def throughput(n: int, repeats: int, work: Path, ray_rows: int) -> tuple[list[dict], dict]:
    te = sdclip.load()
    unique = captions(n)
    single = work / "unique.txt"
    single.write_text("\n".join(unique) + "\n")
    repeated = work / "repeated.txt"
    repeated.write_text("\n".join(c for c in unique for _ in range(4)) + "\n")

    def raw() -> None:
        for start in range(0, n, 64):
            te.reuse.cache.clear()
            sdclip.encode_prompts(te, unique[start : start + 64], cache=None)

    times = paired(
        {
            "raw encode_prompts": raw,
            "local engine": lambda: _job(te, single, work / "a"),
            "local engine, each caption x4": lambda: _job(te, repeated, work / "b"),
        },
        repeats,
    )
    rows_of = {"raw encode_prompts": n, "local engine": n, "local engine, each caption x4": 4 * n}
    out = []
    base = n / median(times["raw encode_prompts"])
    for name, ts in times.items():
        rate = rows_of[name] / median(ts)
        out.append(
            {
                "contender": name,
                "rows": rows_of[name],
                "seconds (median)": round(median(ts), 3),
                "rows/s": round(rate, 1),
                "vs raw": round(rate / base, 3),
            }
        )
    extra = {"local_vs_raw": round(out[1]["vs raw"], 3), "dedup_gain": round(out[2]["rows/s"] / out[1]["rows/s"], 3)}
    extra.update(ray_phase(te, ray_rows, work, out, base))
    return out, extra


def peak_rss(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode})")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def memory(sizes: list[int], work: Path) -> list[dict]:
    distinct = captions(2000, seed=1)
    out = []
    for n in sizes:
        path = work / f"rows{n}.txt"
        with open(path, "w") as f:
            f.writelines(distinct[i % len(distinct)] + "\n" for i in range(n))
        rss, seconds = peak_rss([sys.executable, "-m", "sdclip.cli", "cache", str(path), "--out", str(work / f"m{n}")])
        out.append(
            {
                "rows": n,
                "distinct": len(distinct),
                "peak RSS MiB": round(rss, 1),
                "seconds": round(seconds, 1),
                "rows/s": round(n / seconds, 1),
            }
        )
        shutil.rmtree(work / f"m{n}", ignore_errors=True)
    return out


def dedup_table_bytes(n: int) -> float:
    """Bytes per unique caption that the plan's dedup table holds (n unique captions, nothing encoded)."""
    import tracemalloc

    plan = cachejob.Plan(shard_rows=4096)
    rows = (cachejob.Row(str(i), c) for i, c in enumerate(captions(n, seed=2)))
    tracemalloc.start()
    for _ in plan.shards(rows, strict=False):
        pass
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return size / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows, extra = throughput(
            256 if args.quick else 1024, 1 if args.quick else 2, work, 4096 if args.quick else 16384
        )
        mem = memory([10_000, 100_000] if args.quick else [100_000, 1_000_000], work)
        extra["dedup_table_bytes_per_unique"] = round(dedup_table_bytes(100_000 if args.quick else 1_000_000), 1)
    extra["memory"] = mem
    md = write_results("cache", rows, ["contender", "rows", "seconds (median)", "rows/s", "vs raw"], args.out, extra)
    lines = ["| rows | distinct | peak RSS MiB | seconds | rows/s |", "|---|---|---|---|---|"]
    lines += [f"| {m['rows']} | {m['distinct']} | {m['peak RSS MiB']} | {m['seconds']} | {m['rows/s']} |" for m in mem]
    summary = (
        f"\nlocal engine / raw encode: {extra['local_vs_raw']}x; dedup gain (each caption x4): "
        f"{extra['dedup_gain']}x; ray / local: {extra['ray_vs_local']} (starting Ray: {extra.get('ray_init_s')} s, "
        f"apart); dedup table: "
        f"{extra['dedup_table_bytes_per_unique']} bytes per unique caption\n\n" + "\n".join(lines) + "\n"
    )
    (Path(args.out) / "cache.md").write_text(md + summary)
    print(md + summary)


if __name__ == "__main__":
    main()
