"""Cold start of the commands that need no model: process start to exit, wall and CPU seconds.

`sdclip --help`, `tokenize`, `parse` and `tokens` (no --model) never import torch; each is timed in
fresh processes, interleaved with two yardsticks: a bare `python -c pass` and `python -c "import
torch"` (what every command cost before torch was imported lazily).  CPU seconds (user + system of
the child) are reported beside wall seconds: on a machine shared with other jobs the wall time
waits for a core, the CPU time does not.  The package's bytecode is compiled first, as `pip install`
does (with PYTHONDONTWRITEBYTECODE set, a source checkout would otherwise recompile every module on
every start).

    python bench/bench_start.py [--repeats 9] [--out bench/out]
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_results

CLI = [sys.executable, "-m", "sdclip.cli"]
COMMANDS = {
    "python -c pass (yardstick)": [sys.executable, "-c", "pass"],
    'python -c "import torch" (yardstick)': [sys.executable, "-c", "import torch"],
    "sdclip --help": [*CLI, "--help"],
    'sdclip tokenize "a photo of a cat"': [*CLI, "tokenize", "a photo of a cat"],
    "sdclip parse --dialect a1111 (one prompt)": [*CLI, "parse", "--dialect", "a1111", "a (red:1.2) fox AND a dog"],
    "sdclip tokens --dialect a1111 (one prompt)": [
        *CLI,
        "tokens",
        "--dialect",
        "a1111",
        "masterpiece, (best:1.3) BREAK a cat",
    ],
}
TARGET = 0.3


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one run of ``cmd`` in a fresh process."""
    t0 = time.perf_counter()
    before = os.times()
    subprocess.run(cmd, check=True, capture_output=True)
    after = os.times()
    return time.perf_counter() - t0, (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="3 repetitions")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    walls: dict[str, list[float]] = {name: [] for name in COMMANDS}
    cpus: dict[str, list[float]] = {name: [] for name in COMMANDS}
    import sdclip  # lazy: imports no submodule

    compileall.compile_dir(Path(sdclip.__file__).parent, quiet=1)
    for cmd in COMMANDS.values():  # warm the page cache
        timed(cmd)
    for _ in range(repeats):  # interleaved: drift hits every command alike
        for name, cmd in COMMANDS.items():
            wall, cpu = timed(cmd)
            walls[name].append(wall)
            cpus[name].append(cpu)
    rows = []
    for name in COMMANDS:
        wall, cpu = median(walls[name]), median(cpus[name])
        yardstick = "yardstick" in name
        rows.append(
            {
                "command": name,
                "wall s (median)": f"{wall:.3f}",
                "wall s (min)": f"{min(walls[name]):.3f}",
                "cpu s (median)": f"{cpu:.3f}",
                "target": "" if yardstick else f"≤ {TARGET} s wall",
                "met": "" if yardstick else ("met" if wall <= TARGET else "not met (median)"),
            }
        )
    print(
        write_results(
            "start", rows, ["command", "wall s (median)", "wall s (min)", "cpu s (median)", "target", "met"], args.out
        )
    )


if __name__ == "__main__":
    main()
