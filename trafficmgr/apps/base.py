"""What the small HTTP apps share (the Zipkin collector, text-response, test backends, the demo apps):
a threaded HTTP/1.1 server on a daemon thread, and the command-line plumbing to run one until SIGTERM."""

from __future__ import annotations

import argparse
import http.server
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from trafficmgr.core.signals import stop_on_signals


class ThreadedHTTPApp:
    """A ``ThreadingHTTPServer`` on ``host:port`` (0 = any free port) served by a daemon thread.

    Subclasses implement :meth:`make_handler`, returning a request-handler class (usually closing over
    ``self``). Handlers should set ``disable_nagle_algorithm = True``: without it every response through
    Envoy stalls ~40 ms.
    """

    thread_name = "http-app"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def make_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        raise NotImplementedError

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def start(self) -> Any:
        """Bind and serve in the background; returns self. Raises OSError when the address is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128
            address_family = family

        self._server = Server((self.host, self._port), self.make_handler())
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=self.thread_name, daemon=True)
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

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_until_signal(app: ThreadedHTTPApp, banner: str, stop: threading.Event | None = None) -> int:
    """Start ``app``, print ``banner`` on stderr, serve until SIGTERM/SIGINT (or ``stop``), then stop it."""
    app.start()
    print(banner.format(url=app.url), file=sys.stderr, flush=True)
    stop = stop_on_signals(stop)
    stop.wait()
    app.stop()
    return 0


class AppCommand:
    """How an app runs from the command line: ``trafficmgr <name>`` (registered by
    :mod:`trafficmgr.cli.apps`) and ``python -m <its module>`` (:meth:`main`). ``serve(args)`` runs it and
    raises OSError when its address is taken."""

    def __init__(
        self,
        name: str,
        help: str,  # noqa: A002 - mirrors argparse
        add_arguments: Callable[[argparse.ArgumentParser], None],
        serve: Callable[[argparse.Namespace], int],
    ) -> None:
        self.name, self.help, self.add_arguments, self.serve = name, help, add_arguments, serve

    def main(self, argv: Sequence[str] | None = None) -> int:
        """``python -m``: parse ``argv``, serve; a busy address is one clear error line (exit status 1)."""
        parser = argparse.ArgumentParser(prog=f"trafficmgr {self.name}", description=self.help)
        self.add_arguments(parser)
        args = parser.parse_args(argv)
        try:
            return self.serve(args)
        except OSError as exc:
            parser.exit(1, f"{self.name}: error: cannot listen on {args.host}:{args.port}: {exc}\n")
