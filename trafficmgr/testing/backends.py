"""Programmable HTTP test backends on loopback.

Each backend answers ``{"backend": name, "path": ..., "method": ..., "headers": {...}}`` by default;
tests change its behaviour on the fly (fixed status, a sequence of statuses, delay, large bodies) and
read ``hits``. Any 127.0.0.0/8 address binds without setup, so many backends can share a port number.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from trafficmgr.apps.base import ThreadedHTTPApp


class HttpBackend(ThreadedHTTPApp):
    """A threaded HTTP/1.1 server. ``start()`` / ``stop()``, or use as a context manager."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.name = name
        self.thread_name = f"backend-{name}"
        self._lock = threading.Lock()
        self.hits = 0
        self.requests: deque[dict[str, Any]] = deque(maxlen=1000)
        self.status = 200
        self.statuses: deque[int] = deque()
        self.delay = 0.0
        self.body_size: int | None = None
        self.headers: dict[str, str] = {}

    # -- behaviour -------------------------------------------------------------------------------

    def set(
        self,
        status: int | None = None,
        statuses: Iterable[int] | None = None,
        delay: float | None = None,
        body_size: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpBackend:
        """Change behaviour: ``statuses`` are used once each, in order, before falling back to ``status``;
        ``delay`` seconds before answering; ``body_size`` answers exactly that many bytes instead of JSON;
        ``headers`` are added to every response."""
        with self._lock:
            if status is not None:
                self.status = status
            if statuses is not None:
                self.statuses = deque(statuses)
            if delay is not None:
                self.delay = delay
            if body_size is not None:
                self.body_size = body_size
            if headers is not None:
                self.headers = dict(headers)
        return self

    def reset(self) -> HttpBackend:
        """Default behaviour (200, no delay, JSON body) and zero counters."""
        with self._lock:
            self.status, self.statuses, self.delay, self.body_size, self.headers = 200, deque(), 0.0, None, {}
            self.hits = 0
            self.requests.clear()
        return self

    def _next(self, record: dict[str, Any]) -> tuple[int, float, int | None, dict[str, str]]:
        with self._lock:
            self.hits += 1
            self.requests.append(record)
            status = self.statuses.popleft() if self.statuses else self.status
            return status, self.delay, self.body_size, dict(self.headers)

    # -- lifecycle -------------------------------------------------------------------------------

    def make_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: Envoy reuses upstream connections
            disable_nagle_algorithm = True  # else ~40 ms stalls per request (delayed ACK + Nagle)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request_body = self.rfile.read(length) if length else b""
                record = {
                    "backend": backend.name,
                    "method": self.command,
                    "path": self.path,
                    "peer": self.client_address[0],
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body_bytes": len(request_body),
                }
                status, delay, body_size, extra = backend._next(record)
                if delay:
                    time.sleep(delay)
                if body_size is not None:
                    body = b"x" * body_size
                    ctype = "application/octet-stream"
                else:
                    body = json.dumps(record).encode()
                    ctype = "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", backend.name)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __repr__(self) -> str:
        return f"HttpBackend({self.name!r}, {self.host}:{self._port}, hits={self.hits})"
