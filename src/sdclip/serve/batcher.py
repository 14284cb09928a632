"""One worker thread per served model: requests wait in a bounded queue and are encoded in micro-batches.

Every encoding of a model runs on its worker thread, so the engine's caches (conditioning cache, prefix
cache, tokenizer cache) are only ever touched by one thread.  The worker takes the first waiting job, then
keeps collecting until ``max_batch`` prompts or ``max_wait_ms`` have passed, and encodes jobs that share
their options together:

* conditioning (each request's dialect and options have their ``Conditioner``): every conditioning request of
  the batch, whatever its dialect, in one ``sdclip.encode_many``: the rows of all of them share each encoder's
  fixed-shape passes (identical rows computed once), and each request is assembled on its own.  The answer is
  the request's own ``encode_prompts`` result.
* raw hidden states and pooled embeddings: one ``TextEncoder.encode`` for every distinct prompt of the batch,
  each request answered with its own rows.

A job whose client has gone away is dropped before it is encoded; a job that fails (bad input) fails alone.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

import sdclip
from sdclip.cache import ConditioningCache

_CONDITIONERS = 32  # conditioners kept per model (one per distinct option set)


class QueueFull(Exception):
    """The model's queue holds ``limit`` jobs: the client should retry later (HTTP 503)."""

    def __init__(self, limit: int):
        super().__init__(f"queue full ({limit} requests waiting)")
        self.limit = limit


@dataclass
class Job:
    """One request's work.  Jobs of one kind with equal keys are encoded together.  ``prepare``, when given, runs on
    the worker thread before the job is batched and returns what it adds to ``payload`` (the request checks that
    parse prompts: they would block the event loop); an error it raises is the request's answer."""

    kind: str  # "conditioning", "hidden", "embeddings" or "call"
    key: Hashable  # raw jobs with equal keys share a call; conditioning jobs all run together (key None)
    prompts: list[str]
    payload: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[], dict[str, Any]] | None = None
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Hand the result to the waiting request (nothing if the client has gone away)."""
        if self.future is None or self.loop is None:
            return

        def settle(future: asyncio.Future = self.future) -> None:
            if future.done():  # cancelled: the client disconnected
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop has closed (shutdown)
            pass

    @property
    def abandoned(self) -> bool:
        return self.future is not None and self.future.done()


class ModelWorker:
    """The queue and worker thread of one model.  ``submit`` from the event loop, results come back as futures.

    ``load`` builds the ``TextEncoder`` on the worker thread (the server answers ``/healthz`` meanwhile);
    ``ready`` is set once it is loaded and one warm-up encoding has run.
    """

    def __init__(
        self,
        name: str,
        load: Callable[[], sdclip.TextEncoder],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        embeddings: list | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ):
        self.name = name
        self._load = load
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000
        self.queue_size = queue_size
        self.embeddings = embeddings or []
        self.on_batch = on_batch
        self.te: sdclip.TextEncoder | None = None
        self.cache = ConditioningCache()  # this model's own: only this thread touches it
        self.ready = threading.Event()
        self.failed: str | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0  # jobs submitted and not yet taken (the bounded part)
        self._lock = threading.Lock()
        self._conditioners: OrderedDict[Hashable, sdclip.Conditioner] = OrderedDict()
        self._thread = threading.Thread(target=self._main, name=f"sdclip-model-{name}", daemon=True)

    # --- event-loop side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Jobs waiting to be taken by the worker."""
        return self._pending

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; raises ``QueueFull`` when ``queue_size`` jobs are already waiting."""
        with self._lock:
            if self._pending >= self.queue_size:
                raise QueueFull(self.queue_size)
            self._pending += 1
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self._queue.put(job)
        return job.future

    # --- worker side --------------------------------------------------------------------------------------
    def _take(self, block: bool, timeout: float | None = None) -> Job | None:
        item = self._queue.get(block, timeout)
        if item is not None:
            with self._lock:
                self._pending -= 1
        return item

    def _main(self) -> None:
        try:
            self.te = self._load()
            self._warm()
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            return
        finally:
            self.ready.set()
        while True:
            first = self._take(True)
            if first is None:
                return
            batch, count, deadline, stop = [first], len(first.prompts), time.monotonic() + self.max_wait, False
            while count < self.max_batch:
                try:
                    job = self._take(True, max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
                count += len(job.prompts)
            self._run(batch)
            if stop:
                return

    def _warm(self) -> None:
        """One encoding of each kind, so the first request does not pay for lazy initialisation."""
        assert self.te is not None
        self.te.encode(["a warm-up prompt"])
        # through the cache, whose key holds the weights' fingerprint (~0.25 s on sdclip-mini, computed once)
        sdclip.encode_prompts(self.te, ["a (warm:1.1) up"], dialect="a1111", cache=self.cache)

    def _run(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.abandoned and self._prepared(j)]
        if self.on_batch is not None and live:
            self.on_batch(self.name, sum(len(j.prompts) for j in live))
        groups: OrderedDict[tuple, list[Job]] = OrderedDict()
        for job in live:
            groups.setdefault((job.kind, job.key), []).append(job)
        for (kind, _), jobs in groups.items():
            try:
                if kind == "conditioning":
                    self._conditioning(jobs)
                elif kind in ("hidden", "embeddings"):
                    self._raw(jobs)
                else:
                    for job in jobs:
                        self._call(job)
            except Exception as e:
                if len(jobs) == 1:
                    jobs[0].finish(error=e)
                else:
                    for job in jobs:
                        self._run_alone(job)

    @staticmethod
    def _prepared(job: Job) -> bool:
        """Run the job's ``prepare``; False (and the job answered with the error) when it fails."""
        if job.prepare is not None:
            try:
                job.payload.update(job.prepare())
            except Exception as e:
                job.finish(error=e)
                return False
        return True

    def _run_alone(self, job: Job) -> None:
        try:
            if job.kind == "conditioning":
                self._conditioning([job])
            elif job.kind in ("hidden", "embeddings"):
                self._raw([job])
            else:
                self._call(job)
        except Exception as e:
            job.finish(error=e)

    # --- kinds -----------------------------------------------------------------------------------------
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

    def _conditioning(self, jobs: list[Job]) -> None:
        """Every conditioning job of the batch, whatever its dialect and options, in one ``encode_many``: the rows of
        all of them share the encoders' fixed-shape passes; each request gets its own ``encode`` result."""
        requests = []
        for job in jobs:
            negatives = job.payload["negatives"]
            negative = negatives[0] if job.payload["one_negative"] else negatives
            requests.append((self.conditioner(job.payload["options"]), job.prompts, negative, job.payload["step"]))
        for job, result in zip(jobs, sdclip.encode_many(requests)):
            if isinstance(result, Exception):
                job.finish(error=result)
            else:
                job.finish(result)

    def _raw(self, jobs: list[Job]) -> None:
        """One ``TextEncoder.encode`` for every distinct prompt of the batch; each request gets its own rows.  A
        row's output depends on the row alone (fixed-shape micro-batches, ``sdclip.reuse``), so these are the
        bits of the request's own call."""
        assert self.te is not None
        rows: dict[str, int] = {}
        for job in jobs:
            for text in job.prompts:
                rows.setdefault(text, len(rows))
        out = self.te.encode(list(rows), **jobs[0].payload["options"])
        for job in jobs:
            index = torch.tensor([rows[text] for text in job.prompts])
            pick = lambda t: None if t is None else t[index]
            job.finish(sdclip.TextOutput(pick(out.hidden), pick(out.pooled), pick(out.pooled_projected)))

    def _call(self, job: Job) -> None:
        """Work that is not batched (the inspector's layer comparison): ``payload["fn"](te)``."""
        job.finish(job.payload["fn"](self.te))
