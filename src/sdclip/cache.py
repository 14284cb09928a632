"""A conditioning cache across calls: generation front ends re-encode the same prompts all the time
(the same negative for every image, a prompt tweaked one word at a time, the same quality tags).

Entries are keyed by (model fingerprint, dialect, options, prompt), so one cache can serve several
models; it is bounded in bytes and drops the least recently used entry first.  One cache may be shared by
any number of threads (every method holds its lock).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(_nbytes(v) for v in vars(value).values())
    return 0


@dataclass
class ConditioningCache:
    """LRU of per-prompt conditioning, at most ``max_bytes`` of tensors; ``hits`` / ``misses`` count lookups."""

    max_bytes: int = 512 * 2**20
    hits: int = 0
    misses: int = 0
    nbytes: int = 0
    entries: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self.entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return value[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self.entries:
                self.nbytes -= self.entries.pop(key)[1]
            self.entries[key] = (value, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_, old) = self.entries.popitem(last=False)
                self.nbytes -= old

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.nbytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self.entries)


# the cache Conditioners share unless given their own (``Conditioner(..., cache=None)`` turns it off)
default_cache = ConditioningCache()
