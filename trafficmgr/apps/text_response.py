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
import signal
import sys
import threading
from collections.abc import Sequence

ENV_BODY = "RESPONSE_BODY"
DEFAULT_PORT = 8080


class TextResponseServer:
    """A threaded HTTP/1.1 server answering ``200 text/plain`` with :attr:`body` on every path."""

    def __init__(self, body: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.body = body
        self.host = host
        self._port = port
        self.hits = 0
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> TextResponseServer:
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

        self._server = http.server.ThreadingHTTPServer((self.host, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="text-response", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> TextResponseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--body", default=None, help=f"the response body (default ${ENV_BODY}, else empty)")


def serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); OSError when the address cannot be bound."""
    body = args.body if args.body is not None else os.environ.get(ENV_BODY, "")
    app = TextResponseServer(body, args.host, args.port).start()
    print(f"text-response on {app.url} ({len(body)} bytes)", file=sys.stderr, flush=True)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    app.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trafficmgr.apps.text_response", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except OSError as exc:
        parser.exit(1, f"text-response: error: cannot listen on {args.host}:{args.port}: {exc}\n")


def _cli_run(args: argparse.Namespace) -> int:
    from trafficmgr.core.cli import CliError

    try:
        return serve(args)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc} (use --port)") from None


def _register() -> None:
    from trafficmgr.core.cli import register_command

    register_command("text-response", "answer every request with a fixed text body (ACME HTTP-01 challenges)",
                     add_arguments, _cli_run, replace=True)


_register()

if __name__ == "__main__":
    sys.exit(main())
