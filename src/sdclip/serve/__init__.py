"""``sdclip serve``: conditioning, embeddings and tokenization over HTTP from one warm encoder per model, with
micro-batching, a bounded queue, request limits, metrics and a prompt-inspector page (``pip install
sdclip[serve]``: FastAPI and uvicorn).

    >>> from sdclip.serve import ServeConfig, create_app
    >>> app = create_app(ServeConfig(models={"mini": "sdclip-mini"}))   # an ASGI app; ``serve`` runs it
"""

from __future__ import annotations

import warnings

from .app import Limits, ServeConfig, create_app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until SIGINT / SIGTERM; on either it stops accepting connections, lets the requests in
    flight finish (up to 30 s), finishes the models' queues and returns."""
    import uvicorn

    # the prompt warnings the CLI prints (truncation and the like) would only fill the server log; the
    # tokenize endpoint returns them with the prompt that caused them
    warnings.simplefilter("ignore", UserWarning)
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                proxy_headers=True, server_header=False)


__all__ = ["ServeConfig", "Limits", "create_app", "serve"]
