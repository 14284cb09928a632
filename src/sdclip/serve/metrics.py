"""Prometheus metrics in the text exposition format (no client library needed for five metric families).

Counters and histograms are updated on the event loop; one lock guards them, so a caller on another thread is
safe too.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The server's metrics.  ``gauges`` are read when scraped: name -> (help, labels, fn -> {labels: value})."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (route, status)
        self.latency: dict[str, list[float]] = {}  # route -> bucket counts + [sum, count]
        self.batches: dict[str, list[float]] = {}  # model -> bucket counts + [sum, count]
        self.gauges: list[
            tuple[str, str, str, tuple[str, ...], Callable[[], Iterable[tuple[tuple[str, ...], float]]]]
        ] = []

    @staticmethod
    def _observe(table: dict[str, list[float]], key: str, value: float, buckets: tuple) -> None:
        row = table.setdefault(key, [0.0] * (len(buckets) + 2))
        for i, bound in enumerate(buckets):
            if value <= bound:
                row[i] += 1
        row[-2] += value
        row[-1] += 1

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[route, str(status)] += 1
            self._observe(self.latency, route, seconds, LATENCY_BUCKETS)

    def batch(self, model: str, prompts: int) -> None:
        with self._lock:
            self._observe(self.batches, model, prompts, BATCH_BUCKETS)

    def gauge(
        self,
        name: str,
        kind: str,
        help: str,
        labels: tuple[str, ...],
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
    ) -> None:
        """A value read at scrape time (``kind`` gauge or counter)."""
        self.gauges.append((name, kind, help, labels, read))

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP sdclip_requests_total HTTP requests by route and status.",
                "# TYPE sdclip_requests_total counter",
            ]
            out += [
                f"sdclip_requests_total{_labels(('route', 'status'), k)} {v}" for k, v in sorted(self.requests.items())
            ]
            for name, help, label, table, buckets in (
                (
                    "sdclip_request_seconds",
                    "Request latency in seconds by route.",
                    "route",
                    self.latency,
                    LATENCY_BUCKETS,
                ),
                ("sdclip_batch_prompts", "Prompts per micro-batch by model.", "model", self.batches, BATCH_BUCKETS),
            ):
                out += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
                for key, row in sorted(table.items()):
                    for bound, n in [*zip(buckets, row), ("+Inf", row[-1])]:
                        le = f'le="{bound}"'
                        out.append(f"{name}_bucket{_labels((label,), (key,), le)} {n:g}")
                    out.append(f"{name}_sum{_labels((label,), (key,))} {row[-2]:g}")
                    out.append(f"{name}_count{_labels((label,), (key,))} {row[-1]:g}")
        for name, kind, help, labels, read in self.gauges:
            out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
            out += [f"{name}{_labels(labels, values)} {value:g}" for values, value in read()]
        return "\n".join(out) + "\n"
