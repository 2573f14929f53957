"""Run a blocking server (``serve_forever`` / ``shutdown``) in a thread for the length of a test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Server(Protocol):
    def serve_forever(self) -> Any: ...
    def shutdown(self) -> Any: ...


@contextmanager
def serving(server: Server) -> Iterator[Server]:
    """``server`` serving in a daemon thread; shut down and joined on exit."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(5)
