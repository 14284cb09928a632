"""``encode`` without torch: a checkpoint file whose ONNX Runtime graph is already cached, in well under 2 s.

Importing torch alone takes longer than a one-prompt ``sdclip encode`` should.  Once the normal path
(``sdclip.load(file, backend="onnxruntime")``) has exported and run a graph for a checkpoint file, it
writes a small index beside the exports (``<cache>/fast/<hash of the file's real path>.json``): the
file's identity (real path, size, mtime_ns, SHA-256 of its safetensors header: no tensor data read),
and per encoder and option set the graph, the thread count and what tokenizing needs.  ``encode``
then runs tokenizer -> numpy ids -> ONNX Runtime, with numpy and onnxruntime only, in the passes the
normal path runs (``sdclip.reuse``: unique rows, ``micro_batch`` rows a pass, unpadded where
``EngineTower.rows_independent``) and with the same session settings: its output is bit-identical to
the normal path's.

Anything it does not cover returns ``None`` and the caller takes the normal path: no index, a
changed file (size, mtime or header), options never run through the normal path, a tower with a
projection (the normal path projects pooled outputs with torch), other thread settings, a missing
or unreadable graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .atomic import write_text
from .errors import SdclipError
from .limits import MAX_SAFETENSORS_HEADER

if TYPE_CHECKING:
    import numpy as np

    from .encoder import TextEncoder

INDEX_VERSION = 3


@dataclass
class FastEncoding:
    """What ``sdclip encode`` writes: hidden [B, 77, C] and pooled [B, C] float32, and the layer choice made."""

    hidden: np.ndarray
    pooled: np.ndarray
    family: str
    layer: int
    final_norm: bool


def file_identity(path: str | os.PathLike) -> dict | None:
    """Real path, size, mtime_ns and header digest of a safetensors file; None for anything else."""
    try:
        real = os.path.realpath(path)
        if not stat.S_ISREG(os.stat(real).st_mode):
            return None  # a FIFO would block the open
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size < 10:
                return None
            n = int.from_bytes(f.read(8), "little")
            if not 1 < n <= min(MAX_SAFETENSORS_HEADER, st.st_size - 8):
                return None
            header = f.read(n)
    except OSError:
        return None
    if header[:1] != b"{":
        return None
    digest = hashlib.sha256(header).hexdigest()
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": digest}


def thread_env() -> dict:
    """What torch's default thread count (the sessions' thread count) is a function of."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "cpus": os.cpu_count(),
        "affinity": affinity,
    }


def run_key(encoder: int, mode: str, micro_batch: int, layer: int, final_norm: bool) -> str:
    """The options one cached float32 graph and pass shape answer (``layer`` resolved: 0..layers)."""
    return f"encoder={encoder} mode={mode} micro_batch={micro_batch} L{layer}{'n' * final_norm}"


def index_path(real_path: str, root: Path) -> Path:
    return root / "fast" / f"{hashlib.sha256(real_path.encode()).hexdigest()[:32]}.json"


def _read_index(path: Path) -> dict | None:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("version") == INDEX_VERSION else None


def remember(
    te: TextEncoder, encoder: int, graph: Path, layer: int, final_norm: bool, pooling: str, rows_independent: bool
) -> None:
    """Record that ``graph`` answers ``te``'s file for these options (called by the normal path once it has
    built an ONNX Runtime session for it; ``rows_independent``: its passes are not padded, see
    ``EngineTower.rows_independent``).  Only what ``encode`` reproduces bit for bit is recorded: not int8, whose
    engine runs one row per session call."""
    import torch

    identity = te.fast_source
    i = encoder - 1
    config, usage = te.towers[i].config, te.usages[i]
    if (
        identity is None
        or te.backend != "onnxruntime"
        or te.dtype != torch.float32
        or te.device.type != "cpu"
        or te.reuse.prefixes
        or te.quantize
        or pooling != config.pooling
    ):
        return
    path = index_path(identity["path"], graph.parent.parent)
    index = _read_index(path)
    if index is None or index.get("identity") != identity:
        index = {"version": INDEX_VERSION, "identity": identity, "family": te.family, "encoders": {}, "runs": {}}
    index["encoders"][str(encoder)] = {
        "layers": config.layers,
        "layer": usage.layer,
        "final_norm": usage.final_norm,
        "context_length": config.context_length,
        "pad_id": config.pad_id,
        "projection": bool(config.projection_dim),
    }
    key = run_key(encoder, te.tokenizers[i].mode, te.reuse.micro_batch, layer, final_norm)
    index["runs"][key] = {
        "graph": str(graph),
        "threads": torch.get_num_threads(),
        "thread_env": thread_env(),
        "rows_independent": rows_independent,
    }
    try:
        write_text(path, json.dumps(index, indent=1, sort_keys=True))
    except SdclipError:
        pass  # an unwritable cache costs the fast path, nothing else


@dataclass
class Plan:
    """What the cache says about one request (file and options): enough to answer it without torch."""

    graph: Path
    threads: int
    family: str
    layer: int  # as given (default: the family's), as the output file records it
    final_norm: bool
    mode: str
    pad_id: int
    context_length: int
    rows_per_pass: int
    rows_independent: bool  # the normal path's passes are not padded (``EngineTower.rows_independent``)

    def session(self) -> Any:
        """The session the normal path builds for this graph (``sdclip.backends.ort_session``), or None."""
        if not self.graph.is_file():
            return None
        from .backends import ort_session

        try:
            return ort_session(self.graph, self.threads)
        except Exception:  # onnxruntime's own errors (a truncated or foreign graph): the normal path rebuilds or says
            return None

    def ids(self, prompts: Sequence[str]) -> np.ndarray:
        """[B, 77] int64 ids as ``TextEncoder.tokenize`` builds them."""
        import numpy as np

        from .tokenizer import CONTEXT_LENGTH, Tokenizer

        length = min(self.context_length, CONTEXT_LENGTH)
        rows = Tokenizer(mode=self.mode).rows(prompts, length=length, pad_id=self.pad_id)
        return np.array(rows, dtype=np.int64).reshape(len(rows), length)

    def run(self, session: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hidden and pooled outputs of ``ids`` in the passes the normal path runs: each unique row once, in sorted
        order, ``rows_per_pass`` rows a pass (``sdclip.reuse``); the last one padded with copies of its last row
        unless a row's bits do not depend on its batch (``EngineTower.rows_independent``)."""
        import numpy as np

        rows_per_pass = self.rows_per_pass * max(1, self.context_length // ids.shape[1])
        unique, inverse = np.unique(ids, axis=0, return_inverse=True)
        names = [o.name for o in session.get_outputs()]
        hidden, pooled = [], []
        for start in range(0, len(unique), rows_per_pass):
            part = unique[start : start + rows_per_pass]
            n = len(part)
            if n < rows_per_pass and not self.rows_independent:
                part = np.concatenate([part, np.repeat(part[-1:], rows_per_pass - n, axis=0)])
            out = dict(zip(names, session.run(None, {"ids": part})))
            hidden.append(out["hidden"][:n])
            pooled.append(out["pooled"][:n])
        inverse = inverse.reshape(-1)
        return np.concatenate(hidden)[inverse], np.concatenate(pooled)[inverse]


def plan(
    source: str | os.PathLike,
    *,
    encoder: int = 1,
    layer: int | None = None,
    final_norm: bool | None = None,
    tokenizer_mode: str = "hf",
    micro_batch: int = 8,
    cache: Path | None = None,
) -> Plan | None:
    """The cached answer to ``sdclip.load(source, backend="onnxruntime", tokenizer_mode=...,
    micro_batch=...).encode(..., encoder=..., layer=..., final_norm=...)``, or None (int8 is never cached)."""
    from .backends import cache_dir

    identity = file_identity(source)
    if identity is None:
        return None
    index = _read_index(index_path(identity["path"], cache or cache_dir()))
    if index is None or index.get("identity") != identity:
        return None
    try:
        enc = index["encoders"].get(str(encoder))
        if enc is None or enc["projection"]:
            return None
        given_layer = enc["layer"] if layer is None else layer
        n = enc["layers"] + 1
        if not -n <= given_layer < n:
            return None  # the normal path says what is wrong
        given_norm = enc["final_norm"] if final_norm is None else bool(final_norm)
        run = index["runs"].get(run_key(encoder, tokenizer_mode, micro_batch, given_layer % n, given_norm))
        if run is None or run["thread_env"] != thread_env():
            return None
        if "torch" in sys.modules and sys.modules["torch"].get_num_threads() != run["threads"]:
            return None  # a library caller who set torch's threads: the normal path would use that count
        return Plan(
            Path(run["graph"]),
            int(run["threads"]),
            str(index["family"]),
            given_layer,
            given_norm,
            tokenizer_mode,
            int(enc["pad_id"]),
            int(enc["context_length"]),
            micro_batch,
            bool(run["rows_independent"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError):  # an index from another version or edited by hand
        return None


def encode(source: str | os.PathLike, prompts: Sequence[str], **options: Any) -> FastEncoding | None:
    """``sdclip.load(source, backend="onnxruntime", ...).encode(prompts, ...)`` as numpy arrays, bit for bit,
    without torch (``options``: those of ``plan``); None when the cache cannot answer it (then take that
    normal path)."""
    found = plan(source, **options) if prompts else None
    session = None if found is None else found.session()
    if found is None or session is None:
        return None
    hidden, pooled = found.run(session, found.ids(list(prompts)))
    return FastEncoding(hidden, pooled, found.family, found.layer, found.final_norm)
