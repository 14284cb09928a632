"""The model side of the server: what one batch of requests asks of a ``TextEncoder``, and the ``Runner`` that does it.

A ``Work`` is plain data (it crosses to the model's process); the ``Runner`` holds the encoder, its conditioning
cache and the conditioners of the option sets seen, and is only ever used by one thread at a time, so the engine's
caches need no sharing.  It encodes a batch's works that share their options together:

* conditioning (each request's dialect and options have their ``Conditioner``): every conditioning request of
  the batch, whatever its dialect, in one ``sdclip.encode_many``: the rows of all of them share each encoder's
  fixed-shape passes (identical rows computed once), and each request is assembled on its own.  The answer is
  the request's own ``encode_prompts`` result.
* raw hidden states and pooled embeddings: one ``TextEncoder.encode`` for every distinct prompt of the batch,
  each request answered with its own rows.

A work that fails (bad input) fails alone: its place in the answer holds the exception.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

import sdclip
from sdclip.cache import ConditioningCache

from .inspect import compare_layers

_CONDITIONERS = 32  # conditioners kept per model (one per distinct option set)


@dataclass
class Work:
    """One request's work (checked against the limits already).  ``kind``: "conditioning", "hidden", "embeddings"
    or "compare".  Raw works with equal ``key`` share a ``TextEncoder.encode``; conditioning works all run
    together."""

    kind: str
    key: Hashable
    prompts: list[str]
    payload: dict[str, Any] = field(default_factory=dict)


class Runner:
    """One model's encoder, conditioning cache and conditioners; ``run`` answers a batch of works."""

    def __init__(self, te: sdclip.TextEncoder, embeddings: list | None = None):
        self.te = te
        self.embeddings = embeddings or []
        self.cache = ConditioningCache()
        self._conditioners: OrderedDict[Hashable, sdclip.Conditioner] = OrderedDict()

    def warm(self) -> None:
        """One encoding of each kind, so the first request does not pay for lazy initialisation."""
        self.te.encode(["a warm-up prompt"])
        # through the cache, whose key holds the weights' fingerprint (~0.25 s on sdclip-mini, computed once)
        sdclip.encode_prompts(self.te, ["a (warm:1.1) up"], dialect="a1111", cache=self.cache)

    def run(self, works: list[Work]) -> list[Any]:
        """Each work's answer, or the exception it failed with, in order."""
        answers: list[Any] = [None] * len(works)
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, work in enumerate(works):
            groups.setdefault((work.kind, work.key), []).append(i)
        for (kind, _), indices in groups.items():
            try:
                for i, answer in zip(indices, self._kind(kind, [works[i] for i in indices])):
                    answers[i] = answer
            except Exception as e:
                if len(indices) == 1:
                    answers[indices[0]] = e
                    continue
                for i in indices:  # one bad request must not fail the others: each alone
                    try:
                        answers[i] = self._kind(kind, [works[i]])[0]
                    except Exception as e:
                        answers[i] = e
        return answers

    def _kind(self, kind: str, works: list[Work]) -> list[Any]:
        if kind == "conditioning":
            return self._conditioning(works)
        if kind in ("hidden", "embeddings"):
            return self._raw(works)
        if kind == "compare":
            return [compare_layers(self.te, *w.prompts, w.payload["encoder"]) for w in works]
        raise ValueError(f"unknown kind of work {kind!r}")

    def conditioner(self, options: dict[str, Any]) -> sdclip.Conditioner:
        """The conditioner for one option set (kept: building one loads embeddings, maps clip skip)."""
        key = tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in options.items()))
        found = self._conditioners.get(key)
        if found is None:
            opts = dict(options)
            names = opts.pop("embedding_names", None)
            chosen = [e for e in self.embeddings if names is None or e.name in names or e.token in names]
            found = sdclip.Conditioner(self.te, embeddings=chosen or None, cache=self.cache, **opts)
            self._conditioners[key] = found
            while len(self._conditioners) > _CONDITIONERS:
                self._conditioners.popitem(last=False)
        self._conditioners.move_to_end(key)
        return found

    def _conditioning(self, works: list[Work]) -> list[Any]:
        """Every conditioning work of the batch, whatever its dialect and options, in one ``encode_many``: the rows of
        all of them share the encoders' fixed-shape passes; each request gets its own ``encode`` result."""
        requests = []
        for work in works:
            negatives = work.payload["negatives"]
            negative = negatives[0] if work.payload["one_negative"] else negatives
            requests.append((self.conditioner(work.payload["options"]), work.prompts, negative, work.payload["step"]))
        return sdclip.encode_many(requests)

    def _raw(self, works: list[Work]) -> list[Any]:
        """One ``TextEncoder.encode`` for every distinct prompt of the batch not in the cache; each request gets its
        own rows.  A row's output depends on the row alone (fixed-shape micro-batches, ``sdclip.reuse``), so these
        are the bits of the request's own call, whichever requests' rows they were computed with."""
        options = works[0].payload["options"]
        fingerprint, settings = self.te.fingerprint, tuple(sorted(options.items()))
        key = lambda text: (fingerprint, "raw", settings, text)
        rows: dict[str, tuple | None] = {}
        for work in works:
            for text in work.prompts:
                if text not in rows:
                    rows[text] = self.cache.get(key(text))
        todo = [text for text, row in rows.items() if row is None]
        if todo:
            out = self.te.encode(todo, **options)
            for i, text in enumerate(todo):  # cloned: a row must not hold its whole batch's memory in the cache
                rows[text] = tuple(
                    None if t is None else t[i].clone() for t in (out.hidden, out.pooled, out.pooled_projected)
                )
                self.cache.put(key(text), rows[text])
        answers = []
        for work in works:
            columns = zip(*(rows[text] for text in work.prompts))
            answers.append(sdclip.TextOutput(*(None if c[0] is None else torch.stack(c) for c in columns)))
        return answers
