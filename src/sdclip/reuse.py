"""Exact reuse: never compute the same hidden state twice, and the same answer whatever ran before.

A row's result must not depend on the rows it is batched with, on earlier calls or on other threads
(caches, a dataset job that resumes, a server that batches requests all rely on it).  A matrix
product's rounding depends on its shapes (and the thread count): the same row alone, in a batch of 5
or computed after a cached prefix differs in the last bits, and A1111's mean restoration magnifies
that ~300 times.  So every forward pass here has one fixed shape: ``micro_batch`` rows (the last
micro-batch padded with copies of its last row) of the full length.  A row's output is then a
function of the row alone, bit for bit.  (A tower whose ``rows_independent`` is true, ONNX Runtime in float32,
gives a row the same bits in any batch: its last micro-batch runs unpadded, so one prompt costs one row.)  The
savings that keep that property:

* identical rows (the same negative prompt for every image, several images per prompt) are
  encoded once;
* a request for pooled outputs only (similarity, zero-shot) stops each row at its EOS, rounded up
  to a multiple of 8 positions: the length, too, depends on the row alone.

Shared prompt prefixes (a "masterpiece, best quality, ..." start computed once, kept in a bounded
cache across calls) are an opt-in (``prefixes=True``): the positions after a prefix run in a
different shape, so their rounding depends on whether a prefix was found (within ~2e-6 relative of
the plain path on the hidden states, up to ~4e-5 after A1111's emphasis; tests/test_reuse.py).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .model import Prefix, TextOutput, TextTransformer


@dataclass
class ReuseStats:
    """What reuse saved, summed over calls: rows and token positions actually computed."""

    rows: int = 0
    unique_rows: int = 0
    positions: int = 0
    positions_computed: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0

    @property
    def saved(self) -> float:
        """Fraction of token positions not computed (negative where micro-batch padding computed more)."""
        return 1 - self.positions_computed / self.positions if self.positions else 0.0


@dataclass
class PrefixCache:
    """Computed prefixes across calls, least recently used dropped first, bounded in bytes; thread-safe."""

    max_bytes: int = 256 * 2**20
    entries: OrderedDict = field(default_factory=OrderedDict)
    nbytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __reduce__(self):  # pickled empty: the entries belong to this process's towers
        return type(self), (self.max_bytes,)

    def lookup(self, tower: TextTransformer, row: tuple[int, ...], max_length: int) -> Prefix | None:
        """The longest cached prefix of ``row`` for ``tower`` no longer than ``max_length``."""
        with self._lock:
            best = None
            for key, prefix in self.entries.items():
                n = len(key[1])
                if key[0]() is tower and n <= max_length and row[:n] == key[1]:
                    if best is None or n > best[1].length:
                        best = (key, prefix)
            if best is None:
                return None
            self.entries.move_to_end(best[0])
            return best[1]

    def store(self, tower: TextTransformer, prefix: Prefix) -> None:
        key = (weakref.ref(tower), tuple(prefix.ids.tolist()))  # a later tower at the same id is another key
        with self._lock:
            if key in self.entries or prefix.nbytes > self.max_bytes:
                return
            self.entries[key] = prefix
            self.nbytes += prefix.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.nbytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.nbytes = 0


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    differ = (a != b).nonzero()
    return int(differ[0]) if len(differ) else len(a)


def plan_prefixes(rows: torch.Tensor, min_prefix: int) -> list[tuple[int, list[int]]]:
    """Split lexicographically sorted unique rows into runs sharing at least ``min_prefix``
    leading tokens: [(shared length, row indices)]; a lone row gets length 0."""
    groups: list[tuple[int, list[int]]] = []
    start, shared = 0, None
    for i in range(1, len(rows) + 1):
        lcp = _common_prefix(rows[i - 1], rows[i]) if i < len(rows) else -1
        candidate = lcp if shared is None else min(shared, lcp)
        if candidate >= min_prefix:
            shared = candidate
            continue
        members = list(range(start, i))
        groups.append((shared if shared is not None and len(members) > 1 else 0, members))
        start, shared = i, None
    return groups


MIN_PASS_POSITIONS = 128  # a pooled-only pass of short rows takes at least this many positions


class ReusingRunner:
    """Runs a tower over [N, L] ids in fixed-shape micro-batches with the savings above; thread-safe (one
    encoder may serve many threads: the tower only reads its weights, the counters and caches take a lock)."""

    def __init__(
        self,
        micro_batch: int = 8,
        *,
        prefixes: bool = False,
        min_prefix: int = 8,
        min_saving: int = 154,
        cache_bytes: int = 256 * 2**20,
    ):
        """``micro_batch``: the rows of every forward pass (a speed knob: each value is deterministic, but two
        values round differently).  ``prefixes``: share prompt prefixes (faster on prompts with long common
        starts, not bit-stable: see the module note); ``min_prefix``: the shortest prefix worth sharing;
        ``min_saving``: the positions a shared prefix must save (rows after the first x its length) to pay for
        its own pass and a separate batch."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        self.micro_batch = micro_batch
        self.prefixes = prefixes
        self.min_prefix = min_prefix
        self.min_saving = min_saving
        self.cache = PrefixCache(cache_bytes)
        self.stats = ReuseStats()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._lock = threading.Lock()

    @property
    def signature(self) -> str:
        """What, besides the weights, a row's output depends on: part of cache keys."""
        return f"micro_batch={self.micro_batch}" + (",prefixes" if self.prefixes else "")

    def _count(self, **added: int) -> None:
        with self._lock:
            for name, n in added.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def __call__(
        self,
        tower: TextTransformer,
        ids: torch.Tensor,
        *,
        layer: int = -1,
        final_norm: bool = True,
        hidden: bool = True,
        pooled: bool = True,
        pooling: str | None = None,
    ) -> TextOutput:
        pooling = pooling or tower.config.pooling
        unique, inverse = torch.unique(ids, dim=0, return_inverse=True)  # sorted: shared prefixes are adjacent
        self._count(rows=len(ids), unique_rows=len(unique), positions=ids.numel())
        kw = dict(layer=layer, final_norm=final_norm, pooled=pooled, pooling=pooling)
        if not hidden:
            out = self._pooled_only(tower, unique, pooling)
        elif self.prefixes:
            out = self._with_prefixes(tower, unique, **kw)
        else:
            out = _scatter(len(unique), [(list(range(len(unique))), self._run(tower, unique, None, **kw))], True)
        pick = lambda t: None if t is None else t[inverse]
        return TextOutput(pick(out.hidden), pick(out.pooled), pick(out.pooled_projected))

    def _run(self, tower: TextTransformer, ids: torch.Tensor, prefix: Prefix | None, **kw: object) -> list[TextOutput]:
        """Forward passes of ``micro_batch`` rows each, the last one padded with copies of its last row, whose
        outputs are dropped (not with prefixes, whose rounding moves anyway; nor on a tower
        whose ``rows_independent`` is true: its output for a row is the same bits in any batch, so padding would
        only cost time: a single prompt would pay ``micro_batch`` rows).  Short (pooled-only) rows run
        ``micro_batch`` at a time too, or as many as make ``MIN_PASS_POSITIONS`` positions if that is more (a
        number that depends on the length alone): a small call, such as a server's few inputs of each length,
        pads to 8 short rows rather than to the positions of 8 full rows (measured on ViT-L: 2x faster on 16
        labels, ~4 % slower on 256), and ``micro_batch=1`` does not run one 16-position row per pass."""
        mb = max(self.micro_batch, MIN_PASS_POSITIONS // ids.shape[1])
        pad = not self.prefixes and not getattr(tower, "rows_independent", False)
        outs = []
        computed = 0
        for s in range(0, len(ids), mb):
            part = ids[s : s + mb]
            n = len(part)
            if n < mb and pad:
                part = torch.cat([part, part[-1:].expand(mb - n, -1)])
            computed += len(part)
            out = tower(part, prefix=prefix, **kw)  # type: ignore[arg-type]
            projected = None
            if out.pooled_projected is not None:  # one row at a time: what diffusers computes for one prompt
                projected = torch.cat([tower.projection(p[None]) for p in out.pooled[:n]])  # type: ignore[misc]
            outs.append(
                TextOutput(
                    None if out.hidden is None else out.hidden[:n],
                    None if out.pooled is None else out.pooled[:n],
                    projected,
                )
            )
        self._count(positions_computed=computed * (ids.shape[1] - (0 if prefix is None else prefix.length)))
        return outs

    def _with_prefixes(self, tower: TextTransformer, rows: torch.Tensor, **kw: object) -> TextOutput:
        """Rows sharing a prefix long enough to pay for a separate pass run after it; a lone row may use a
        cached prefix of itself; every other row runs in one plain batch."""
        plain: list[int] = []
        after: dict[tuple[int, ...], tuple[Prefix, list[int]]] = {}
        for shared, members in plan_prefixes(rows, self.min_prefix):
            first = tuple(rows[members[0]].tolist())
            prefix = None
            if len(members) > 1 and (len(members) - 1) * shared >= self.min_saving:
                prefix = self.cache.lookup(tower, first, shared)
                if prefix is not None and prefix.length == shared:
                    self._count(prefix_cache_hits=1)
                else:
                    self._count(prefix_cache_misses=1)
                    prefix = tower.compute_prefix(rows[members[0], :shared])
                    self._count(positions_computed=shared)
                    self.cache.store(tower, prefix)
            elif len(members) == 1:
                prefix = self.cache.lookup(tower, first, len(first) - 1)
                if prefix is not None and prefix.length >= self.min_prefix:
                    self._count(prefix_cache_hits=1)
                else:
                    prefix = None
            if prefix is None:
                plain += members
            else:
                after.setdefault(tuple(prefix.ids.tolist()), (prefix, []))[1].extend(members)
        parts = [(plain, self._run(tower, rows[plain], None, **kw))] if plain else []
        parts += [(members, self._run(tower, rows[members], prefix, **kw)) for prefix, members in after.values()]
        return _scatter(len(rows), parts, hidden=True)

    def _pooled_only(self, tower: TextTransformer, rows: torch.Tensor, pooling: str) -> TextOutput:
        """Each row cut after its pooling position, rounded up to 8 positions (a length that depends on the row
        alone); rows of one length run together."""
        where = rows.argmax(-1) if pooling == "argmax" else (rows == tower.config.eos_id).int().argmax(-1)
        lengths = torch.clamp((where // 8 + 1) * 8, max=rows.shape[1]).tolist()
        parts: list[tuple[list[int], list[TextOutput]]] = []
        for length in sorted(set(lengths)):
            members = [i for i, n in enumerate(lengths) if n == length]
            parts.append(
                (
                    members,
                    self._run(
                        tower, rows[members, :length], None, layer=-1, final_norm=False, pooled=True, pooling=pooling
                    ),
                )
            )
        return _scatter(len(rows), parts, hidden=False)


def _scatter(n: int, parts: list[tuple[list[int], list[TextOutput]]], hidden: bool) -> TextOutput:
    """Reassemble per-group outputs into row order."""

    def gather(field_name: str) -> torch.Tensor | None:
        first = getattr(parts[0][1][0], field_name)
        if first is None:
            return None
        out = first.new_empty((n, *first.shape[1:]))
        for members, outs in parts:
            out[members] = torch.cat([getattr(o, field_name) for o in outs])
        return out

    return TextOutput(
        gather("hidden") if hidden else None,
        gather("pooled"),  # type: ignore[arg-type]
        gather("pooled_projected"),
    )
