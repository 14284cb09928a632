"""One batcher per served model, on the event loop: requests wait in a bounded queue and go to the model in
micro-batches.

The batcher takes the first waiting request, then keeps collecting until ``max_batch`` prompts or ``max_wait_ms``
have passed, and hands the batch to the model's backend (``work.Runner`` in a process of its own, or on one thread
of this one).  A model process has the next batch waiting while it encodes one, so it never idles for the event
loop; the requests that arrive meanwhile form the batch after.  A request whose client has gone
away is dropped before it is sent.  Batching runs on the event loop itself: no thread of the HTTP process
competes with it for the GIL.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sdclip

from .process import ProcessBackend
from .work import Runner, Work


class QueueFull(Exception):
    """The model's queue holds ``limit`` requests: the client should retry later (HTTP 503)."""

    def __init__(self, limit: int):
        super().__init__(f"queue full ({limit} requests waiting)")
        self.limit = limit


class ThreadBackend:
    """Runs batches on one thread of this process: for an encoder that cannot leave it, and for tests that
    patch the model's side."""

    in_flight = 1  # its thread is this process's: a second batch would only wait, smaller

    def __init__(self, name: str, embeddings: list):
        self.embeddings = embeddings
        self.failed: str | None = None
        self.runner: Runner | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sdclip-model-{name}")

    @property
    def hits(self) -> int:
        return 0 if self.runner is None else self.runner.cache.hits

    @property
    def misses(self) -> int:
        return 0 if self.runner is None else self.runner.cache.misses

    async def start(self, te: sdclip.TextEncoder) -> None:
        self.runner = Runner(te, self.embeddings)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.warm)

    async def run(self, works: list[Work]) -> list[Any]:
        assert self.runner is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.run, works)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown)


class ModelWorker:
    """The queue and batcher of one model, whose batches ``backend`` runs.  ``submit`` from the event loop; answers
    come back as futures.

    ``start`` (on the event loop) loads the ``TextEncoder`` on a thread (the server answers ``/healthz``
    meanwhile) and starts the backend; ``ready`` is set once the model is loaded and warmed up."""

    def __init__(
        self,
        name: str,
        load: Callable[[], sdclip.TextEncoder],
        backend: ProcessBackend | ThreadBackend,
        *,
        max_batch: int = 256,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        on_batch: Callable[[str, int], None] | None = None,
    ):
        self.name = name
        self._load = load
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000
        self.queue_size = queue_size
        self.embeddings = backend.embeddings
        self.on_batch = on_batch
        self.te: sdclip.TextEncoder | None = None
        self.backend = backend
        self.ready = threading.Event()
        self._failed: str | None = None
        self._jobs: deque[tuple[Work, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def failed(self) -> str | None:
        return self._failed or self.backend.failed

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._jobs)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.ensure_future(self._main())

    async def stop(self) -> None:
        """Answer the requests already queued, then end the backend."""
        self._stopping = True
        if self._arrived is not None:
            self._arrived.set()
        if self._task is not None:
            await self._task
        await self.backend.close()

    def submit(self, work: Work) -> asyncio.Future:
        """Queue ``work``; raises ``QueueFull`` when ``queue_size`` requests are already waiting."""
        if len(self._jobs) >= self.queue_size:
            raise QueueFull(self.queue_size)
        assert self._arrived is not None
        future = asyncio.get_running_loop().create_future()
        self._jobs.append((work, future))
        self._arrived.set()
        return future

    async def _main(self) -> None:
        try:
            self.te = await asyncio.to_thread(self._load)
            await self.backend.start(self.te)
        except Exception as e:
            self._failed = f"{type(e).__name__}: {e}"
            return
        finally:
            self.ready.set()
        slots = asyncio.Semaphore(self.backend.in_flight)
        sent: set[asyncio.Task] = set()
        while True:
            await slots.acquire()
            batch = await self._collect()
            if not batch:
                break
            task = asyncio.ensure_future(self._send(batch, slots))
            sent.add(task)
            task.add_done_callback(sent.discard)
        await asyncio.gather(*sent)

    async def _wait_for_jobs(self, timeout: float | None) -> bool:
        """Whether a request is waiting (after up to ``timeout`` seconds; ``None``: until one comes or ``stop``)."""
        assert self._arrived is not None
        while not self._jobs and not self._stopping:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                break
        return bool(self._jobs)

    async def _collect(self) -> list[tuple[Work, asyncio.Future]]:
        """The next batch; empty once stopping with nothing left to answer."""
        loop = asyncio.get_running_loop()
        batch: list[tuple[Work, asyncio.Future]] = []
        while not batch:
            if not await self._wait_for_jobs(None):
                return batch
            count, deadline = 0, loop.time() + self.max_wait
            while count < self.max_batch:
                if not self._jobs:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._stopping or not await self._wait_for_jobs(remaining):
                        break
                work, future = self._jobs.popleft()
                if future.done():  # cancelled: the client disconnected, nobody waits for this encoding
                    continue
                batch.append((work, future))
                count += len(work.prompts)
        return batch

    async def _send(self, batch: list[tuple[Work, asyncio.Future]], slots: asyncio.Semaphore) -> None:
        try:
            if self.on_batch is not None:
                self.on_batch(self.name, sum(len(work.prompts) for work, _ in batch))
            try:
                answers = await self.backend.run([work for work, _ in batch])
            except Exception as e:  # the backend itself failed (its process exited): every request of the batch
                answers = [e] * len(batch)
            for (_, future), answer in zip(batch, answers):
                if future.done():
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
        finally:
            slots.release()
