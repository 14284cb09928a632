"""A model in its own process: the HTTP side's Python and the encoder's then run on separate cores, each under its
own GIL (in one process they take turns, and every short torch call waits to get the GIL back).

Where the machine allows (Linux, two cores or more), the model processes run on the allowed cores but one and
``serve`` keeps the HTTP process on that one (``split_cores``): the event loop never takes the encoder's core, and
torch's threads (one per model core) never spin on the event loop's.

The child is started with ``spawn`` (never ``fork``: a forked child of a process whose OpenMP pool has run can
hang in its first parallel region).  The ``TextEncoder`` travels as a ``Process`` argument, so torch moves its
weights to shared memory once and both processes map the same pages.  Then they talk over a socket pair in
frames: a batch of ``Work`` goes one way, the answers the other, with every tensor's bytes sent beside the
pickle (protocol 5, out of band) rather than copied into it.  The event loop writes and reads without blocking.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import multiprocessing
import os
import pickle
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Any, Collection

import torch

import sdclip
from sdclip.errors import SdclipError

from .work import Runner, Work

_COUNT = struct.Struct("!I")
_SIZE = struct.Struct("!Q")
_IOV_MAX = 512


# --- cores: the event loop on one, the models on the others ---------------------------------------------------------


@dataclass(frozen=True)
class Cores:
    """The cores the HTTP process and the model processes run on."""

    http: tuple[int, ...]
    models: tuple[int, ...]


def _allowed_cores() -> list[int] | None:
    """The cores this process may run on (``taskset``, a cpuset), None where the system has no CPU affinity."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def split_cores() -> Cores | None:
    """The last of this process's allowed cores for the HTTP process, the others for the models; None without
    CPU affinity (not Linux) or with fewer than two cores.  On two cores shared by the HTTP process, a model and
    local clients, the model was runnable but waiting for a core about a quarter of the time (bench_serve)."""
    allowed = _allowed_cores()
    return Cores(http=tuple(allowed[-1:]), models=tuple(allowed[:-1])) if allowed and len(allowed) > 1 else None


def model_threads(cores: Cores | None, models: int) -> int:
    """torch threads per model: the model cores (else every core this process may use but one, left to the HTTP
    side) shared among the models, so that their OpenMP threads do not outnumber the cores and spin."""
    if cores is not None:
        available = len(cores.models)
    else:
        allowed = _allowed_cores()
        available = max(1, (len(allowed) if allowed else os.cpu_count() or 1) - 1)
    return max(1, available // max(1, models))


def _start_on(process: multiprocessing.process.BaseProcess, cores: Collection[int] | None) -> None:
    """Start ``process`` from this thread put on ``cores`` for the while: the child inherits them, so it starts
    Python, imports torch (whose OpenMP runtime counts the cores it may use then) and unpickles the encoder on the
    model's cores, not on the HTTP process's."""
    if not cores:
        return process.start()
    own = os.sched_getaffinity(0)  # this thread's
    os.sched_setaffinity(0, cores)
    try:
        process.start()
    finally:
        os.sched_setaffinity(0, own)


def pin_process(cores: Collection[int]) -> None:
    """Every thread of this process onto ``cores`` (a thread started later inherits its starter's)."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cores)
        except OSError:  # it ended meanwhile
            pass


# --- frames: a pickle and the tensors' bytes beside it ---------------------------------------------------------


def _tensor(data: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return raw.view(getattr(torch, dtype)).reshape(shape)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy()
            return _tensor, (pickle.PickleBuffer(raw), str(t.dtype).removeprefix("torch."), tuple(t.shape))
        return NotImplemented


def frame(obj: Any) -> list[memoryview]:
    """``obj`` as the parts of one frame: a header (the parts' count and sizes), the pickle, the tensors' bytes."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(obj)
    parts = [stream.getbuffer(), *(b.raw() for b in buffers)]
    head = _COUNT.pack(len(parts)) + b"".join(_SIZE.pack(p.nbytes) for p in parts)
    return [memoryview(head), *parts]


def unframe(parts: list[bytearray]) -> Any:
    return pickle.loads(parts[0], buffers=parts[1:])


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (count,) = _COUNT.unpack(await reader.readexactly(_COUNT.size))
    sizes = struct.unpack(f"!{count}Q", await reader.readexactly(_SIZE.size * count))
    return unframe([bytearray(await reader.readexactly(n)) for n in sizes])


def _recv_exactly(sock: socket.socket, n: int) -> bytearray:
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return data


def _recv_frame(sock: socket.socket) -> Any:
    (count,) = _COUNT.unpack(_recv_exactly(sock, _COUNT.size))
    sizes = struct.unpack(f"!{count}Q", _recv_exactly(sock, _SIZE.size * count))
    return unframe([_recv_exactly(sock, n) for n in sizes])


def _send_frame(sock: socket.socket, obj: Any) -> None:
    """One ``sendmsg`` per frame, or as few as it takes (a call writes at most ``_IOV_MAX`` parts)."""
    parts = [memoryview(p).cast("B") for p in frame(obj)]
    while parts:
        sent = sock.sendmsg(parts[:_IOV_MAX])
        while parts and sent >= parts[0].nbytes:
            sent -= parts.pop(0).nbytes
        if sent:
            parts[0] = parts[0][sent:]


# --- the child ---------------------------------------------------------------------------------------------------


def _sendable(answer: Any) -> Any:
    """An exception that may not survive pickling (a library's own with odd arguments) as a plain RuntimeError."""
    if isinstance(answer, BaseException) and not isinstance(answer, SdclipError):
        try:
            pickle.loads(pickle.dumps(answer))
        except Exception:
            return RuntimeError(f"{type(answer).__name__}: {answer}")
    return answer


def _child(sock: socket.socket, te: sdclip.TextEncoder, embeddings: list, threads: int) -> None:
    """The model process (on the model cores from its start, ``_start_on``, as every thread it starts): answer
    batches until the socket closes.  SIGINT and SIGTERM are the parent's to act on (a terminal's Ctrl-C reaches
    the whole process group): it drains, then closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    runner = Runner(te, embeddings)
    try:
        runner.warm()
    except Exception as e:
        _send_frame(sock, ("failed", f"{type(e).__name__}: {e}"))
        return
    _send_frame(sock, ("ready", None))
    while True:
        try:
            number, works = _recv_frame(sock)
        except EOFError:
            return
        answers = [_sendable(a) for a in runner.run(works)]
        _send_frame(sock, (number, answers, (runner.cache.hits, runner.cache.misses)))


# --- the parent's end ----------------------------------------------------------------------------------------------


class ModelProcessExited(SdclipError):
    """The model's process ended while requests waited for it (it is started again)."""


def _open_files_for(te: sdclip.TextEncoder) -> None:
    """Each shared tensor holds a file descriptor in both processes: raise the soft limit (to the hard one) when a
    big model would not fit under it."""
    try:
        import resource
    except ImportError:  # not a Unix
        return
    needed = 64 + 2 * sum(len(tower.state_dict()) for tower in te.towers)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ProcessBackend:
    """Runs batches in a child process; ``run`` is awaited on the event loop.  The child answers batches in the
    order they were sent, so a second batch can wait in the socket while the first is encoded.  The child runs
    ``threads`` torch threads, on ``cores`` when given."""

    in_flight = 2  # one batch being encoded, the next one waiting

    def __init__(self, name: str, embeddings: list, threads: int, cores: tuple[int, ...] | None = None):
        self.name, self.embeddings, self.threads, self.cores = name, embeddings, threads, cores
        self.hits = self.misses = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._numbers = itertools.count()
        self._listener: asyncio.Task | None = None
        self._te: sdclip.TextEncoder | None = None
        self._closing = False
        self.failed: str | None = None  # set when a crashed child could not be started again

    async def start(self, te: sdclip.TextEncoder) -> None:
        """Start the child and wait until it has warmed up (raises ``SdclipError`` if it could not)."""
        self._te = te
        _open_files_for(te)
        ours, theirs = socket.socketpair()
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=_child,
            args=(theirs, te, self.embeddings, self.threads),
            name=f"sdclip-model-{self.name}",
            daemon=True,
        )
        # pickles the encoder: its weights move to shared memory
        await asyncio.to_thread(_start_on, self._process, self.cores)
        theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        try:
            state, detail = await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise SdclipError(f"the model process exited while starting (exit code {self._exitcode()})") from None
        if state != "ready":
            raise SdclipError(detail)
        self._listener = asyncio.ensure_future(self._listen(reader))

    async def run(self, works: list[Work]) -> list[Any]:
        if self._writer is None:
            raise ModelProcessExited(f"model {self.name!r}: its process is not running; retry")
        number = next(self._numbers)
        future = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        self._writer.writelines(frame((number, works)))
        return await future

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                number, answers, (self.hits, self.misses) = await read_frame(reader)
                future = self._waiting.pop(number)
                if not future.done():
                    future.set_result(answers)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await asyncio.to_thread(self._join)
        waiting, self._waiting, self._writer = self._waiting, {}, None
        for future in waiting.values():
            if not future.done():
                future.set_exception(
                    ModelProcessExited(f"model {self.name!r}: its process exited (exit code {code}); retry")
                )
        if not self._closing and self._te is not None:  # it crashed (killed, out of memory): start it again
            try:
                await self.start(self._te)
            except Exception as e:
                self.failed = f"its process exited (exit code {code}) and could not be started again: {e}"

    def _join(self) -> int | None:
        if self._process is not None:
            self._process.join(30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        return self._exitcode()

    def _exitcode(self) -> int | None:
        return None if self._process is None else self._process.exitcode

    async def close(self) -> None:
        """End the child once it has answered what it was sent."""
        self._closing = True
        writer = self._writer
        if writer is not None:
            writer.write_eof()  # the child reads the end of the stream after the last batch, and exits
        if self._listener is not None:
            await self._listener
        else:
            await asyncio.to_thread(self._join)
        if writer is not None:
            writer.close()
