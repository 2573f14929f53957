"""http-text-response: answer every GET (and HEAD) with one fixed text body, as the original's sample did.

Used for the ACME HTTP-01 challenge (README "HTTPS"): set ``RESPONSE_BODY`` to the key authorization
certbot shows and route ``/.well-known/acme-challenge/<token>`` to it through the ingress gateway.

Run ``trafficmgr text-response --port 8080`` (body from ``--body`` or ``$RESPONSE_BODY``), or in Python::

    with TextResponseServer("hello", "127.0.0.1", 0) as app:
        ...  # app.url; app.body = "other" changes the answer; app.hits counts requests
"""

from __future__ import annotations

import argparse
import http.server
import os
import sys
import threading

from trafficmgr.apps.base import AppCommand, ThreadedHTTPApp, serve_until_signal
from trafficmgr.core import argtypes

ENV_BODY = "RESPONSE_BODY"
DEFAULT_PORT = 8080


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

            def _answer(self, with_body: bool) -> None:
                with app._lock:
                    app.hits += 1
                    data = app.body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if with_body:
                    self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                self._answer(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(False)

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
