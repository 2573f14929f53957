"""Health checks in both directions: the agent's own ``/healthz`` and ``/readyz`` server
(:class:`HealthServer`), and :func:`wait_live`, which waits for a new sidecar's Envoy to report LIVE
before its pod's traffic is captured.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trafficmgr.core.agent.agent import Agent


def wait_live(netns: str | None, address: str, port: int, timeout: float) -> bool:
    """Poll Envoy's admin ``/ready`` at ``address:port`` inside network namespace ``netns`` (None: this
    one; sidecars: admin on ``127.0.0.1:15000`` of the pod's namespace, reachable only from there) until it
    says LIVE, so capture rules go in only once the sidecar has its listeners (else the
    pod's first connections would be refused). Returns False on timeout."""
    import ctypes
    import http.client

    result: list[bool] = [False]

    def probe() -> None:
        if netns is not None:
            fd = os.open(netns, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    return
            finally:
                os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection(address, port, timeout=1)
                conn.request("GET", "/ready")
                resp = conn.getresponse()
                if resp.status == 200 and resp.read().strip() == b"LIVE":
                    result[0] = True
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.05)

    # A thread of its own: setns(2) switches only the calling thread's namespace.
    t = threading.Thread(target=probe, name="sidecar-ready", daemon=True)
    t.start()
    t.join(timeout + 2)
    return result[0]



def admin_get(netns: str | None, address: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET ``path`` from Envoy admin at ``address:port`` inside network namespace ``netns`` (None: this
    one): (status, body). Only GET: the node operator's read access to a sidecar's admin
    (``trafficmgr proxies --admin``). Raises ``OSError`` when admin cannot be reached."""
    import ctypes
    import http.client

    result: list[Any] = [OSError(f"admin {address}:{port} did not answer within {timeout:.0f}s")]

    def fetch() -> None:
        try:
            if netns is not None:
                fd = os.open(netns, os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                        raise OSError(ctypes.get_errno(), f"cannot enter network namespace {netns}")
                finally:
                    os.close(fd)
            conn = http.client.HTTPConnection(address, port, timeout=timeout)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                result[0] = (resp.status, resp.read())
            finally:
                conn.close()
        except OSError as exc:
            result[0] = exc

    # A thread of its own: setns(2) switches only the calling thread's namespace.
    t = threading.Thread(target=fetch, name="sidecar-admin", daemon=True)
    t.start()
    t.join(timeout + 2)
    if isinstance(result[0], OSError):
        raise result[0]
    status, body = result[0]
    return status, body


class HealthServer:
    """``/healthz`` (the loop is alive) and ``/readyz`` (:meth:`Agent.ready`) on ``address:port``."""

    def __init__(self, agent: Agent, address: str, port: int) -> None:
        ready: Callable[[], tuple[bool, str]] = agent.ready
        alive = agent._thread

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/healthz"):
                    ok, reason = (alive is None or alive.is_alive()), "loop stopped"
                    reason = "ok" if ok else reason
                elif self.path.startswith("/readyz"):
                    ok, reason = ready()
                else:
                    self.send_error(404)
                    return
                body = json.dumps({"ok": ok, "reason": reason}).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((address, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="agent-health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
