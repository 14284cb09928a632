"""``sdclip serve``: conditioning, embeddings and tokenization over HTTP from one warm encoder per model, with
micro-batching, a bounded queue, request limits, metrics and a prompt-inspector page (``pip install
sdclip[serve]``: FastAPI and uvicorn).

    >>> from sdclip.serve import ServeConfig, create_app
    >>> app = create_app(ServeConfig(models={"mini": "sdclip-mini"}))   # an ASGI app; ``serve`` runs it
"""

from __future__ import annotations

import signal
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

from .app import ServeConfig, create_app
from .limits import Limits


def serve(
    config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", threads: int | None = None
) -> None:
    """Run the server until SIGINT / SIGTERM; on either it stops accepting connections, lets the requests in
    flight finish (up to 30 s), finishes the models' queues and returns.

    ``threads``: torch's intra-op threads for the models (default: the cores less one, which the HTTP side
    needs; torch's spinning worker threads would otherwise fight the event loop for it)."""
    import os

    import torch
    import uvicorn

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn's handlers (graceful shutdown), without its re-raising the signal afterwards: a drained
            server exits 0."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    # the prompt warnings the CLI prints (truncation and the like) would only fill the server log; the
    # tokenize endpoint returns them with the prompt that caused them
    warnings.simplefilter("ignore", UserWarning)
    Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=30,
            proxy_headers=True,
            server_header=False,
        )
    ).run()


__all__ = ["ServeConfig", "Limits", "create_app", "serve"]
