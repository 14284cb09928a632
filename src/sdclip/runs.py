"""A training run's folder, shared by ``train-clip`` (``train.train``) and ``ti train`` (``inversion.train_embedding``).

The folder holds ``checkpoint.pt`` (the run's settings, its state and the torch thread count, written atomically,
so a kill leaves the previous one whole), ``metrics.jsonl`` (one JSON object per step or evaluation, appended and
flushed as they come) and a loss plot.  Resuming reads the checkpoint, keeps the metrics up to its step (a last
line torn by a kill is dropped: the checkpoint is intact) and continues exactly: the trainers draw step ``s``'s
data from the seed and ``s`` alone, and the thread count the run was started with is restored by the CLI.
A run killed before its first checkpoint starts over, saying so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import IO, Any, TextIO, TypeVar

import torch
from PIL import Image, ImageDraw

from .atomic import atomic_path, write_text
from .errors import BadInput

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
C = TypeVar("C")


class Run:
    """One run folder.  ``start`` (re)opens it; ``record`` appends a metrics row; ``save`` writes the checkpoint;
    ``finish`` draws the plot."""

    def __init__(self, folder: str | Path, log: TextIO | None = None):
        self.folder = Path(folder)
        self.log = log
        self.metrics_path = self.folder / METRICS
        self._metrics: IO[str] | None = None

    # --- resuming ------------------------------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any] | None:
        """The checkpoint to continue from; None (with a message) for a run that stopped before its first
        checkpoint, which then starts over.  A folder holding no run at all is bad input."""
        if not (self.folder / CHECKPOINT).is_file() and self.metrics_path.is_file():
            if self.log is not None:
                print(f"{self.folder}: the run stopped before its first checkpoint; starting it over", file=self.log)
            return None
        return load_checkpoint(self.folder)

    @staticmethod
    def config(cls: type[C], state: dict[str, Any]) -> C:
        """The run's settings as saved (lists back to tuples; fields a newer sdclip dropped are left out)."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items() if k in known})

    # --- metrics --------------------------------------------------------------------------------------------
    def start(self, step: int, resumed: bool) -> None:
        """Open the folder at ``step``: a resumed run keeps the metrics up to its checkpoint, a new one none."""
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = [r for r in read_metrics(self.metrics_path) if r["step"] <= step] if resumed else []
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        self._metrics = self.metrics_path.open("a", encoding="utf-8")

    def record(self, row: dict[str, Any]) -> None:
        """Append one metrics row (flushed: a kill loses at most the line being written)."""
        assert self._metrics is not None, "start the run first"
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    # --- checkpoint and plot ------------------------------------------------------------------------------------
    def save(self, step: int, config: Any, **state: Any) -> None:
        """Write ``checkpoint.pt`` atomically: step, settings, thread count and the trainer's state."""
        with atomic_path(self.folder / CHECKPOINT) as tmp:
            torch.save({"step": step, "config": asdict(config), "threads": torch.get_num_threads(), **state}, tmp)

    def plot(self, name: str) -> None:
        """Draw the metrics into ``name`` (a PNG in the folder)."""
        with atomic_path(self.folder / name) as tmp:
            plot(read_metrics(self.metrics_path), tmp)


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A run's ``checkpoint.pt``, read with ``weights_only`` (tensors and plain data only)."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise BadInput(f"{folder}: no checkpoint.pt to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on a damaged file
        raise BadInput(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def saved_threads(folder: str | Path) -> int | None:
    """The torch thread count a run was started with (None: no checkpoint, or one from before it was saved)."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    threads = load_checkpoint(folder).get("threads")
    return threads if isinstance(threads, int) and threads > 0 else None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``.  A last line a kill cut short is dropped; damage elsewhere is an error."""
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if k == len(lines) - 1:
                break  # torn by a kill mid-write
            raise BadInput(f"{path}:{n}: not a JSON metrics row") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise BadInput(f"{path}:{n}: a metrics row needs an integer \"step\"")
        rows.append(row)
    return rows


class Progress:
    """One status line on stderr: step, loss, pairs/s (or ``unit``/s), elapsed and ETA (a line per 10 s off a
    TTY)."""

    def __init__(self, total: int, stream: TextIO, unit: str = "pairs", counting: str = "step"):
        self.total, self.stream, self.unit, self.counting = total, stream, unit, counting
        self.tty = stream.isatty()
        self.last = 0.0

    def update(
        self, step: int, loss: float | None, rate: float, elapsed: float, eta: float, force: bool = False
    ) -> None:
        """``loss`` None: a job without one (``sdclip cache``)."""
        now = time.monotonic()
        if not (self.tty or force or now - self.last >= 10):
            return
        self.last = now
        done = int(24 * step / max(self.total, 1))
        line = (
            f"[{'#' * done}{'.' * (24 - done)}] {self.counting} {step}/{self.total}  "
            + ("" if loss is None else f"loss {loss:.4f}  ")
            + f"{rate:.1f} {self.unit}/s  elapsed {_clock(elapsed)}  ETA {_clock(eta)}"
        )
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def step(self, done: int, stop: int, loss: float, items: int, per_step: float, elapsed: float) -> None:
        """A training step's line: ``items`` per step at ``per_step`` seconds each, the ETA to step ``stop``."""
        self.update(done, loss, items / per_step, elapsed, (stop - done) * per_step, force=done == stop)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


# --- the plot ----------------------------------------------------------------------------------


def plot(rows: list[dict], path: str | Path, width: int = 900, height: int = 360) -> None:
    """Loss (left) and zero-shot accuracy (right) against steps, drawn with Pillow."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    panels = [
        ("training loss", [("loss", (170, 190, 230), losses), ("mean of 20", (30, 70, 170), _smooth(losses, 20))], None)
    ]
    accuracy = [
        ("seen", (30, 140, 60), [(r["step"], r["zero_shot_seen"]) for r in rows if "zero_shot_seen" in r]),
        ("held out", (200, 90, 20), [(r["step"], r["zero_shot_held_out"]) for r in rows if "zero_shot_held_out" in r]),
    ]
    if accuracy[0][2]:
        panels.append(("zero-shot accuracy", accuracy, (0.0, 1.0)))
    w = width // len(panels)
    last = max([r["step"] for r in rows] + [1])
    for k, (title, series, fixed) in enumerate(panels):
        _panel(draw, (k * w + 55, 30, (k + 1) * w - 20, height - 40), title, series, fixed, last)
    image.save(path, format="PNG")


def _smooth(points: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    values = [v for _, v in points]
    return [
        (s, sum(values[max(0, i - n + 1) : i + 1]) / len(values[max(0, i - n + 1) : i + 1]))
        for i, (s, _) in enumerate(points)
    ]


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: list[tuple[str, tuple[int, int, int], list[tuple[float, float]]]],
    fixed: tuple[float, float] | None,
    xs_max: int,
) -> None:
    x0, y0, x1, y1 = box
    points = [p for _, _, ps in series for p in ps]
    draw.rectangle(box, outline=(120, 120, 120))
    draw.text((x0, y0 - 20), title, fill="black")
    if not points:
        return
    lo, hi = fixed or (min(y for _, y in points), max(y for _, y in points))
    hi = hi if hi > lo else lo + 1
    for t in range(5):  # y ticks
        v = lo + (hi - lo) * t / 4
        y = y1 - (y1 - y0) * t / 4
        draw.line((x0 - 4, y, x0, y), fill=(120, 120, 120))
        draw.text((x0 - 50, y - 6), f"{v:.2f}" if fixed or abs(hi) < 100 else f"{v:.0f}", fill="black")
    draw.text((x1 - 60, y1 + 8), f"step {int(xs_max)}", fill="black")
    draw.text((x0, y1 + 8), "0", fill="black")

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * x / xs_max, y1 - (y1 - y0) * (y - lo) / (hi - lo)

    for n, (name, colour, ps) in enumerate(series):
        if len(ps) > 1:
            draw.line([at(x, y) for x, y in ps], fill=colour, width=2)
        elif ps:
            cx, cy = at(*ps[0])
            draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
        draw.text((x1 - 90, y0 + 6 + 14 * n), name + (f" {ps[-1][1]:.3f}" if ps else ""), fill=colour)
