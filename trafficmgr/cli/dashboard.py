"""``trafficmgr dashboard``: open the control plane's dashboard page in a browser.

Without a token the page is the admin endpoint's own ``/dashboard/``: the command checks that it answers,
prints the URL and opens it (``webbrowser``; ``--no-browser`` only prints). When the admin endpoint needs
a bearer token (``serve --admin-token-file``; give ``--token-file``), a browser cannot add the header, so
the command runs a small local proxy in the foreground that adds it (see :class:`DashboardProxy` for why
that proxy is safe) and opens the proxy's URL; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import hmac
import http.client
import http.server
import json
import os
import secrets
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from typing import Any

from trafficmgr.cli import (
    ENV_SERVER,
    ENV_TOKEN_FILE,
    CliError,
    _read_token,
    _unreachable,
    normalize_server,
    register_command,
)
from trafficmgr.cli.replicas import Unreachable, http_get
from trafficmgr.core.admin import DEFAULT_URL
from trafficmgr.core.argtypes import listen_port, positive_seconds
from trafficmgr.dashboard import DATA_PATH, PAGE_PATH

#: Response headers passed from the admin endpoint to the browser (everything else is dropped; the proxy
#: sets its own Cache-Control, Referrer-Policy and X-Content-Type-Options).
PASS_HEADERS = ("Content-Type", "Content-Security-Policy", "Trafficmgr-Replica", "WWW-Authenticate")


def fetch(url: str, token: str | None, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` (with ``Authorization: Bearer <token>`` when given): ``(status, headers, body)``.
    HTTP error statuses are returned, not raised; an unreachable endpoint raises :class:`CliError`."""
    try:
        return http_get(url, {"Authorization": f"Bearer {token}"} if token else {}, timeout)
    except Unreachable as exc:
        raise CliError(_unreachable(_base(url), exc.reason).replace("use --server", "use --admin")) from None


def _base(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:200]
    return str(data.get("error")) if isinstance(data, dict) and "error" in data else str(data)[:200]


def check(admin: str, token: str | None, timeout: float) -> None:
    """Raise :class:`CliError` unless ``admin`` serves the page and its data route (with ``token`` when
    given: the admin endpoint asks the token for both once it has one)."""
    for path in (PAGE_PATH, DATA_PATH):
        status, _, body = fetch(admin + path, token, timeout)
        if status == 401:
            raise CliError(f"{admin}{path} needs a bearer token: " +
                           (f"the token in --token-file was refused ({_error_text(body)})" if token else
                            f"give --token-file FILE (the file of serve --admin-token-file; default ${ENV_TOKEN_FILE})"))
        if status == 404:
            raise CliError(f"{admin} has no dashboard ({path} answers 404: {_error_text(body)}); is it the admin "
                           "endpoint of a 'trafficmgr serve' with the dashboard? (use --admin)")
        if status != 200:
            raise CliError(f"{admin}{path} answered HTTP {status}: {_error_text(body)}")


class DashboardProxy(http.server.ThreadingHTTPServer):
    """A loopback-only proxy that adds the admin token to the dashboard's requests (the page's files and
    its data route; the admin endpoint asks the token for both).

    Why it is safe to run:
    - it listens on 127.0.0.1 only, on an ephemeral port by default (``--port``), and only while the
      command runs in the foreground;
    - every path must start with ``/<secret>/``, a random 128-bit value new at each start and printed in
      the URL only (compared in constant time; 404 otherwise), so another local user or process that
      finds the port cannot use the token, and a web page cannot guess the URL;
    - it answers only ``GET`` of the page's files (``/dashboard/...``) and the data route
      (``/debug/dashboard/data``), never another admin path (no ``/debug/config-dump`` through it);
    - it refuses a ``Host`` header other than ``127.0.0.1:<port>`` / ``localhost:<port>`` (DNS rebinding);
    - its answers carry ``Referrer-Policy: no-referrer`` (the secret never leaves in a Referer, e.g. when
      a trace link is followed) and ``Cache-Control: no-store``.
    The token itself never reaches the browser.
    """

    daemon_threads = True

    def __init__(self, admin: str, token: str | None, port: int = 0, timeout: float = 10.0) -> None:
        self.admin, self.token, self.fetch_timeout = admin, token, timeout
        self.secret = secrets.token_urlsafe(16)
        super().__init__(("127.0.0.1", port), _ProxyHandler)

    @property
    def url(self) -> str:
        """The page's URL (with the secret)."""
        return f"http://127.0.0.1:{self.server_address[1]}/{self.secret}{PAGE_PATH}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: DashboardProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _refuse(self) -> None:
        self._send(405, b"only GET\n", extra={"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse  # noqa: N815 - http.server's names

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        port = srv.server_address[1]
        if self.headers.get("Host", "") not in (f"127.0.0.1:{port}", f"localhost:{port}"):
            self._send(403, b"wrong Host (this proxy answers http://127.0.0.1:<port>/ only)\n")
            return
        split = urllib.parse.urlsplit(self.path)
        prefix, _, rest = split.path.lstrip("/").partition("/")
        if not hmac.compare_digest(prefix.encode(), srv.secret.encode()):
            self._send(404, b"not found\n")
            return
        path = "/" + rest
        if path in ("/", PAGE_PATH.rstrip("/")):
            self._send(302, b"", extra={"Location": f"/{srv.secret}{PAGE_PATH}"})
            return
        # No dot segments or escapes: the path reaches the admin endpoint as it is, and must stay one of these.
        if not (path.startswith(PAGE_PATH) or path == DATA_PATH) or any(c in path for c in ("..", "%", "\\")):
            self._send(404, b"not found (this proxy serves the dashboard only)\n")
            return
        target = srv.admin + path + (f"?{split.query}" if split.query else "")
        try:
            status, headers, body = fetch(target, srv.token, srv.fetch_timeout)
        except CliError as exc:
            # The page shows this text in its error banner.
            self._send(502, str(exc).encode())
            return
        keep = {h.lower() for h in PASS_HEADERS} - {"content-type"}
        passed = {k: v for k, v in headers.items() if k.lower() in keep}
        self._send(status, body, headers.get("Content-Type") or "application/octet-stream", passed)


def setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", metavar="URL", default=None,
                        help=f"admin endpoint of 'trafficmgr serve' (default: ${ENV_SERVER} or {DEFAULT_URL}; in a "
                             "cluster: kubectl -n traffic-system port-forward deploy/trafficmgr 18080)")
    parser.add_argument("--token-file", metavar="FILE", default=None,
                        help="bearer token of the admin endpoint (serve --admin-token-file): a local proxy adding it "
                             f"serves the page on 127.0.0.1 (default: ${ENV_TOKEN_FILE})")
    parser.add_argument("--port", metavar="PORT", type=listen_port, default=0,
                        help="with a token: the local proxy's port on 127.0.0.1 (default 0: any free port)")
    parser.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    parser.add_argument("--timeout", metavar="SECONDS", type=positive_seconds, default=10.0,
                        help="how long to wait for the admin endpoint (default 10)")


def run(args: argparse.Namespace) -> int:
    admin = normalize_server(args.admin or os.environ.get(ENV_SERVER) or DEFAULT_URL, "--admin")
    token = _read_token(args.token_file or os.environ.get(ENV_TOKEN_FILE) or None)
    check(admin, token, args.timeout)
    if token is None:
        url = admin + PAGE_PATH
        print(f"dashboard: {url}", flush=True)
        if not args.no_browser:
            webbrowser.open(url)
        return 0
    try:
        proxy = DashboardProxy(admin, token, args.port, args.timeout)
    except OSError as exc:
        raise CliError(f"--port {args.port}: cannot listen on 127.0.0.1: {exc.strerror or exc}") from None
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    thread = threading.Thread(target=proxy.serve_forever, name="dashboard-proxy", daemon=True)
    thread.start()
    try:
        print(f"dashboard: {proxy.url} (a local proxy adding the admin token for {admin}; Ctrl-C stops it)", flush=True)
        if not args.no_browser:
            webbrowser.open(proxy.url)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        proxy.shutdown()
        proxy.server_close()
        print("dashboard proxy stopped", file=sys.stderr)
    return 0


register_command("dashboard", "open the mesh dashboard (prints its URL; a local proxy when the admin needs a token)",
                 setup, run)

__all__ = ["DashboardProxy", "check", "fetch"]
