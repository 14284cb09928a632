"""Exact reuse: never compute the same hidden state twice.

Attention in the text tower is causal, so position i depends only on tokens 0..i.  That makes
three savings exact rather than approximate:

* identical rows (the same negative prompt for every image, several images per prompt) are
  encoded once;
* rows that start with the same tokens (a shared "masterpiece, best quality, ..." prefix) compute
  that prefix once; computed prefixes are kept in a bounded cache across calls;
* a request for pooled outputs only (similarity, zero-shot, SDXL's pooled vector) stops at the
  last EOS of the batch instead of running all 77 positions, rows grouped by length.

The results agree with the plain path to float32 rounding: a matrix product's rounding depends
on how many rows it multiplies, so even the plain path differs at ~1e-7 relative between batch
sizes (see tests/test_reuse.py).
"""

from __future__ import annotations

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
        """Fraction of token positions not computed."""
        return 1 - self.positions_computed / self.positions if self.positions else 0.0


@dataclass
class PrefixCache:
    """Computed prefixes across calls, least recently used dropped first, bounded in bytes."""

    max_bytes: int = 256 * 2**20
    entries: OrderedDict = field(default_factory=OrderedDict)
    nbytes: int = 0

    def lookup(self, tower: TextTransformer, row: tuple[int, ...], max_length: int) -> Prefix | None:
        """The longest cached prefix of ``row`` for ``tower`` no longer than ``max_length``."""
        best = None
        for key, prefix in self.entries.items():
            n = len(key[1])
            if key[0] == id(tower) and n <= max_length and row[:n] == key[1]:
                if best is None or n > best[1].length:
                    best = (key, prefix)
        if best is None:
            return None
        self.entries.move_to_end(best[0])
        return best[1]

    def store(self, tower: TextTransformer, prefix: Prefix) -> None:
        key = (id(tower), tuple(prefix.ids.tolist()))
        if key in self.entries or prefix.nbytes > self.max_bytes:
            return
        self.entries[key] = prefix
        self.nbytes += prefix.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
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


class ReusingRunner:
    """Runs a tower over [N, L] ids with every exact saving above; holds the prefix cache."""

    def __init__(self, min_prefix: int = 8, min_saving: int = 154, cache_bytes: int = 256 * 2**20,
                 batch_size: int = 32):
        """``min_prefix``: the shortest prefix worth sharing; ``min_saving``: the positions a shared prefix
        must save (rows after the first x its length) to pay for its own pass and a separate batch."""
        self.min_prefix = min_prefix
        self.min_saving = min_saving
        self.batch_size = batch_size
        self.cache = PrefixCache(cache_bytes)
        self.stats = ReuseStats()

    def __call__(self, tower: TextTransformer, ids: torch.Tensor, *, layer: int = -1, final_norm: bool = True,
                 hidden: bool = True, pooled: bool = True, pooling: str | None = None) -> TextOutput:
        pooling = pooling or tower.config.pooling
        unique, inverse = torch.unique(ids, dim=0, return_inverse=True)  # sorted: shared prefixes are adjacent
        self.stats.rows += len(ids)
        self.stats.unique_rows += len(unique)
        self.stats.positions += ids.numel()
        if hidden:
            out = self._with_prefixes(tower, unique, layer, final_norm, pooled, pooling)
        else:
            out = self._pooled_only(tower, unique, pooling)
        pick = (lambda t: None if t is None else t[inverse])
        return TextOutput(pick(out.hidden), pick(out.pooled), pick(out.pooled_projected))

    def _run(self, tower: TextTransformer, ids: torch.Tensor, prefix: Prefix | None, **kw: object) -> list[TextOutput]:
        self.stats.positions_computed += ids[:, 0 if prefix is None else prefix.length:].numel()
        return [tower(ids[s:s + self.batch_size], prefix=prefix, **kw)  # type: ignore[arg-type]
                for s in range(0, len(ids), self.batch_size)]

    def _with_prefixes(self, tower: TextTransformer, rows: torch.Tensor, layer: int, final_norm: bool,
                       pooled: bool, pooling: str) -> TextOutput:
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
                    self.stats.prefix_cache_hits += 1
                else:
                    self.stats.prefix_cache_misses += 1
                    prefix = tower.compute_prefix(rows[members[0], :shared])
                    self.stats.positions_computed += shared
                    self.cache.store(tower, prefix)
            elif len(members) == 1:
                prefix = self.cache.lookup(tower, first, len(first) - 1)
                if prefix is not None and prefix.length >= self.min_prefix:
                    self.stats.prefix_cache_hits += 1
                else:
                    prefix = None
            if prefix is None:
                plain += members
            else:
                after.setdefault(tuple(prefix.ids.tolist()), (prefix, []))[1].extend(members)
        kw = dict(layer=layer, final_norm=final_norm, pooled=pooled, pooling=pooling)
        parts = [(plain, self._run(tower, rows[plain], None, **kw))] if plain else []
        parts += [(members, self._run(tower, rows[members], prefix, **kw)) for prefix, members in after.values()]
        return _scatter(len(rows), parts, hidden=True)

    def _pooled_only(self, tower: TextTransformer, rows: torch.Tensor, pooling: str) -> TextOutput:
        eos = rows.argmax(-1) if pooling == "argmax" else (rows == tower.config.eos_id).int().argmax(-1)
        order = torch.argsort(eos).tolist()
        parts: list[tuple[list[int], list[TextOutput]]] = []
        for s in range(0, len(order), self.batch_size):  # rows of similar length together
            members = order[s:s + self.batch_size]
            length = int(eos[members].max()) + 1
            parts.append((members, self._run(tower, rows[members, :length], None, layer=-1, final_norm=False,
                                             pooled=True, pooling=pooling)))
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
    return TextOutput(gather("hidden") if hidden else None, gather("pooled"),  # type: ignore[arg-type]
                      gather("pooled_projected"))
