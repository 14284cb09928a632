"""Helpers of the server tests: a free loopback port, waiting for /readyz."""

from __future__ import annotations

import socket
import time
import urllib.request
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 60, alive: Callable[[], None] = lambda: None) -> None:
    """Poll ``base``/readyz until it answers 200; ``alive`` raises if the server has died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{base} did not become ready in {timeout} s"
        time.sleep(0.05)
