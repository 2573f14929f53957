"""A bookinfo-like demo application (after Istio's bookinfo), one module, one role per process.

``trafficmgr bookinfo ROLE [--port 9080] [--version v1]`` (standard library only):

- ``productpage``: ``GET /productpage`` calls ``details`` (``/details/0``) and ``reviews``
  (``/reviews/0``) and shows both (HTML); ``GET /`` links to it.
- ``details``: ``GET /details/<id>`` -> JSON book details.
- ``ratings``: ``GET /ratings/<id>`` -> JSON ``{"id", "ratings": {"Reviewer1": 5, ...}, "podname"}``.
- ``reviews``: ``GET /reviews/<id>`` -> JSON with the serving pod's name in ``podname``; ``--version v2``
  and ``v3`` also call ``ratings`` and include its answer under ``ratings`` (v1 does not).
- ``client``: serves nothing; the pod to send traffic from (its sidecar's explicit proxy port).

Services are called by name (``http://reviews:9080``). While ``HTTP_PROXY`` accepts connections (the
pod's sidecar, in local mode) requests go through it, so Envoy routes them by their ``Host``;
otherwise the name is resolved with ``<NAME>_SERVICE_HOST`` as Kubernetes sets it, else by DNS. Incoming
tracing headers (B3, W3C ``traceparent``/``tracestate``, ``x-request-id``) are copied to outgoing requests, as tracing requires.
"""

from __future__ import annotations

import argparse
import html
import http.client
import http.server
import json
import os
import socket
import sys
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

from trafficmgr.apps.base import AppCommand, ThreadedHTTPApp
from trafficmgr.core import argtypes
from trafficmgr.core.signals import stop_on_signals

ROLES = ("productpage", "details", "ratings", "reviews", "client")
DEFAULT_PORT = 9080
#: Headers applications must propagate for spans to join one trace (as with Istio).
TRACE_HEADERS = ("x-request-id", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled",
                 "x-b3-flags", "b3", "x-ot-span-context", "traceparent", "tracestate")
TIMEOUT_S = 10.0


def pod_name() -> str:
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()


def _proxy() -> tuple[str, int] | None:
    text = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy") or ""
    if not text:
        return None
    parts = urllib.parse.urlsplit(text if "://" in text else "http://" + text)
    return (parts.hostname, parts.port or 80) if parts.hostname else None


def _resolve(host: str) -> str:
    """Service name -> ``<NAME>_SERVICE_HOST`` (the first label of ``name.namespace...``), else ``host``."""
    name = host.split(".")[0].upper().replace("-", "_")
    return os.environ.get(f"{name}_SERVICE_HOST") or host


def fetch(url: str, incoming: Mapping[str, str] | None = None, timeout: float = TIMEOUT_S) -> tuple[int, bytes]:
    """GET ``url`` (``http://service:port/path``) through the pod's proxy when it is up, else directly.

    Returns (status, body); a connection failure is (502, reason) so pages can show it."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    headers = {k: v for k, v in (incoming or {}).items() if k.lower() in TRACE_HEADERS}
    path = parts.path or "/"
    proxy = _proxy()
    conn = None
    try:
        if proxy is not None:
            try:
                sock = socket.create_connection(proxy, timeout=timeout)
            except ConnectionRefusedError:
                sock = None  # no sidecar (not Envoy-enabled): call directly
            if sock is not None:
                conn = http.client.HTTPConnection(proxy[0], proxy[1], timeout=timeout)
                conn.sock = sock
                target = url
        if conn is None:
            conn = http.client.HTTPConnection(_resolve(host), port, timeout=timeout)
            headers["Host"] = parts.netloc
            target = path + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return 502, f"{host}:{port} unreachable: {exc}".encode()
    finally:
        if conn is not None:
            conn.close()


def _json_or_error(status: int, body: bytes) -> Any:
    if status == 200:
        try:
            return json.loads(body)
        except ValueError:
            pass
    return {"error": f"HTTP {status}: {body.decode(errors='replace').strip()[:200]}"}


def _book_id(path: str, prefix: str) -> str | None:
    rest = path[len(prefix):] if path.startswith(prefix) else None
    return rest if rest and "/" not in rest else None


class App:
    """One role's request handling: ``handle(path, headers) -> (status, content type, body)``."""

    def __init__(self, role: str, version: str = "v1") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        self.role, self.version = role, version

    def handle(self, path: str, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        path = urllib.parse.urlsplit(path).path
        if path in ("/health", "/healthz"):
            return 200, "application/json", b'{"status": "ok"}\n'
        handler = getattr(self, f"_{self.role}", None)
        result = handler(path, headers) if handler else None
        if result is None:
            return 404, "application/json", json.dumps({"error": f"{self.role}: no route for {path}"}).encode() + b"\n"
        if isinstance(result, tuple):
            return 200, result[0], result[1]
        return 200, "application/json", json.dumps(result).encode() + b"\n"

    def _details(self, path: str, headers: Mapping[str, str]) -> Any:
        book = _book_id(path, "/details/")
        if book is None:
            return None
        return {"id": book, "author": "William Shakespeare", "year": 1595, "type": "paperback", "pages": 200,
                "publisher": "PublisherA", "language": "English", "ISBN-10": "1234567890",
                "ISBN-13": "123-1234567890", "podname": pod_name()}

    def _ratings(self, path: str, headers: Mapping[str, str]) -> Any:
        book = _book_id(path, "/ratings/")
        if book is None:
            return None
        return {"id": book, "ratings": {"Reviewer1": 5, "Reviewer2": 4}, "podname": pod_name()}

    def _reviews(self, path: str, headers: Mapping[str, str]) -> Any:
        book = _book_id(path, "/reviews/")
        if book is None:
            return None
        out: dict[str, Any] = {
            "id": book, "podname": pod_name(), "clustername": "null", "version": self.version,
            "reviews": [
                {"reviewer": "Reviewer1", "text": "An extremely entertaining play by Shakespeare."},
                {"reviewer": "Reviewer2", "text": "Absolutely fun and entertaining."},
            ],
        }
        if self.version in ("v2", "v3"):
            out["ratings"] = _json_or_error(*fetch(f"http://ratings:9080/ratings/{book}", headers))
        return out

    def _productpage(self, path: str, headers: Mapping[str, str]) -> Any:
        if path == "/":
            return "text/html", b'<html><body><a href="/productpage">The Comedy of Errors</a></body></html>\n'
        if path != "/productpage":
            return None
        results: dict[str, Any] = {}

        def get(name: str) -> None:
            results[name] = _json_or_error(*fetch(f"http://{name}:9080/{name}/0", headers))

        threads = [threading.Thread(target=get, args=(n,)) for n in ("details", "reviews")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        page = ("<html><head><title>Simple Bookstore App</title></head><body>\n"
                "<h1>The Comedy of Errors</h1>\n"
                f"<p>productpage: {html.escape(pod_name())}</p>\n"
                f"<h2>Book Details</h2><pre>{html.escape(json.dumps(results['details'], indent=1))}</pre>\n"
                f"<h2>Book Reviews</h2><pre>{html.escape(json.dumps(results['reviews'], indent=1))}</pre>\n"
                "</body></html>\n")
        return "text/html; charset=utf-8", page.encode()


class BookinfoServer(ThreadedHTTPApp):
    """One bookinfo service (:class:`App`) over HTTP/1.1."""

    thread_name = "bookinfo"

    def __init__(self, app: App, host: str = "0.0.0.0", port: int = 0) -> None:
        super().__init__(host, port)
        self.app = app

    def make_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        app = self.app

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else every response stalls ~40 ms (delayed ACK)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                status, ctype, body = app.handle(self.path, {k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                sys.stdout.write(f"{app.role} {self.address_string()} {format % args}\n")

        return Handler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=ROLES, help="which service this process is")
    parser.add_argument("--version", dest="app_version", default=os.environ.get("SERVICE_VERSION", "v1"),
                        choices=("v1", "v2", "v3"), help="reviews: v1 (no ratings), v2 or v3 (call ratings); default v1")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=argtypes.port, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")


def serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); the client role only waits. OSError when the address
    cannot be bound."""
    stop = stop_on_signals(stop)
    if args.role == "client":
        stop.wait()
        return 0
    server = BookinfoServer(App(args.role, args.app_version), args.host, args.port).start()
    print(f"bookinfo {args.role} {args.app_version} listening on {args.host}:{server.port}", flush=True)
    stop.wait()
    server.stop()
    return 0


COMMAND = AppCommand("bookinfo", "run one service of the bookinfo demo app (productpage, details, ratings, reviews, client)",
                     add_arguments, serve)
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
