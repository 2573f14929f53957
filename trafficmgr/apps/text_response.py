"""http-text-response: answer every request with one fixed text body, as the original's sample did.

``GET``, ``POST``, ``PUT``, ``DELETE``, ``PATCH``, ``OPTIONS`` and ``HEAD`` (headers only) on any path get
``200 text/plain`` with the body; a request body (``Content-Length`` or chunked) is read and discarded, so
the connection stays usable for the next request. Other methods get the standard library's 501.

Used for the ACME HTTP-01 challenge (README "HTTPS"): set ``RESPONSE_BODY`` to the key authorization
certbot shows and route ``/.well-known/acme-challenge/<token>`` to it through the ingress gateway.

Run ``trafficmgr text-response --port 8080`` (body from ``--body`` or ``$RESPONSE_BODY``), or in Python::

    with TextResponseServer("hello", "127.0.0.1", 0) as app:
        ...  # app.url; app.body = "other" changes the answer; app.hits counts requests
"""

from __future__ import annotations

import argparse
import http.server
import io
import os
import re
import sys
import threading

from trafficmgr.apps.base import AppCommand, ThreadedHTTPApp, serve_until_signal
from trafficmgr.core import argtypes

ENV_BODY = "RESPONSE_BODY"
DEFAULT_PORT = 8080
#: The methods answered with the body (HEAD: headers only); ``OPTIONS`` answers list them in ``Allow``.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
_CHUNK = 64 * 1024
_HEX, _DIGITS = re.compile(rb"[0-9A-Fa-f]{1,16}"), re.compile(r"[0-9]{1,19}")


class BadFraming(ValueError):
    """The request body's framing cannot be read (answered with 400, then the connection is closed)."""


def discard_body(handler: http.server.BaseHTTPRequestHandler) -> int:
    """Read the request body (``Content-Length``, or ``Transfer-Encoding: chunked`` with its trailers) and
    drop it; returns its size. Raises BadFraming for a malformed length, chunk or transfer coding."""
    rfile = handler.rfile
    coding = (handler.headers.get("Transfer-Encoding") or "").strip().lower()
    if coding:
        if coding.rsplit(",", 1)[-1].strip() != "chunked":  # RFC 9112 6.3: chunked must come last
            raise BadFraming(f"unsupported Transfer-Encoding {coding!r}")
        total = 0
        while True:
            line = rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise BadFraming("truncated or overlong chunk size line")
            digits = line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(digits):
                raise BadFraming(f"bad chunk size {line[:40]!r}")
            size = int(digits, 16)
            if size == 0:
                while True:  # trailer fields up to the empty line
                    line = rfile.readline(8192)
                    if not line.endswith(b"\n"):
                        raise BadFraming("truncated trailers")
                    if not line.strip():
                        return total
            _skip(rfile, size)
            total += size
            if rfile.readline(8).strip():
                raise BadFraming("chunk data longer than its size")
    text = handler.headers.get("Content-Length")
    if text is None:
        return 0
    if not _DIGITS.fullmatch(text.strip()):
        raise BadFraming(f"bad Content-Length {text[:40]!r}")
    length = int(text)
    _skip(rfile, length)
    return length


def _skip(rfile: io.BufferedIOBase, size: int) -> None:
    while size > 0:
        data = rfile.read(min(size, _CHUNK))
        if not data:
            raise BadFraming("the body ended early")
        size -= len(data)


class TextResponseServer(ThreadedHTTPApp):
    """A threaded HTTP/1.1 server answering ``200 text/plain`` with :attr:`body` on every path."""

    thread_name = "text-response"

    def __init__(self, body: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        super().__init__(host, port)
        self.body = body
        self.hits = 0
        self._lock = threading.Lock()

    def make_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _answer(self) -> None:
                try:
                    discard_body(self)
                except BadFraming as exc:
                    self.close_connection = True
                    self.send_error(400, str(exc))
                    return
                with app._lock:
                    app.hits += 1
                    data = app.body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                if self.command == "OPTIONS":
                    self.send_header("Allow", ", ".join(METHODS))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return Handler


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=argtypes.port, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--body", default=None, help=f"the response body (default ${ENV_BODY}, else empty)")


def serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); OSError when the address cannot be bound."""
    body = args.body if args.body is not None else os.environ.get(ENV_BODY, "")
    return serve_until_signal(TextResponseServer(body, args.host, args.port), f"text-response on {{url}} ({len(body)} bytes)", stop)


COMMAND = AppCommand("text-response", "answer every request with a fixed text body (ACME HTTP-01 challenges)",
                     add_arguments, serve)
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
