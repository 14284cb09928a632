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

from .app import ServeConfig, Server, create_app
from .limits import Limits
from .process import pin_process


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until SIGINT / SIGTERM; on either it stops accepting connections, lets the requests in
    flight finish (up to 30 s), finishes the models' queues and returns.

    With ``config.pin_cores`` (Linux, two cores or more) this process runs on the last allowed core and the
    models on the others.  Its own tensor work (dtype conversions, checks) is small: one torch thread; so is
    loading the models, which it does before handing them to their processes (a big checkpoint in another dtype
    converts on that one thread)."""
    import logging

    import torch
    import uvicorn

    server = Server(config)
    torch.set_num_threads(1 if config.model_process else server.threads)
    if server.cores:
        pin_process(server.cores.http)

    class Uvicorn(uvicorn.Server):
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
    settings = uvicorn.Config(
        server.app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
        proxy_headers=True,
        server_header=False,
    )
    if server.cores:  # uvicorn's Config has set up its logging
        logging.getLogger("uvicorn.error").info(
            "model processes on cores %s, the HTTP process on core %s",
            ",".join(map(str, server.cores.models)),
            ",".join(map(str, server.cores.http)),
        )
    Uvicorn(settings).run()


__all__ = ["ServeConfig", "Limits", "create_app", "serve"]
