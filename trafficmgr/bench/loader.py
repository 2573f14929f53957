"""Loading the test API server over HTTPS as a cluster's clients would: one ``POST`` per object.

A cluster of S Services x P Pods is created through the REST API: every object is its own request, on
keep-alive TLS connections (``connections`` per client process) with up to ``window`` requests in flight
per connection (HTTP/1.1 pipelining: the server answers them in order, one at a time), in ``processes``
client processes so the clients' own CPU is not what the figures measure. The server does for each what
it does for any create (authentication, routing, admission, field managers, the store, the controllers);
there is no bulk path.

Run as ``python -m trafficmgr.bench.loader`` it is one client process: it reads one JSON spec on stdin
(``url``, ``token``, ``ca``, ``kind``, ``indices``, ``services``, ``pods``, ``connections``, ``window``;
the token arrives on stdin, never in argv, which other local users can read) and writes one JSON line:
``{"times": [...]}`` (wall-clock completion time of each of its creates) or ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

POLICY_LABELS = [
    {"traffic.lb.policy": "RING_HASH", "traffic.hash.cookie.name": "session", "traffic.hash.cookie.ttl": "60000"},
    {"traffic.retries.5xx": "2", "traffic.request.timeout": "3000", "traffic.request.max": "100"},
    {"traffic.fault.delay.time": "10", "traffic.fault.delay.percentage": "1"},
    {"traffic.rate.limit": "1024", "traffic.request.rate": "500"},
    {"traffic.tracing.enabled": "true", "traffic.tracing.sampling": "10"},
]


def service_body(i: int) -> dict[str, Any]:
    """Service ``svc-<i>`` selecting ``app=svc-<i>``, port 9080 named http; policy labels on every other one."""
    labels = {"traffic.port.9080": "http"}
    if i % 2 == 0:
        labels.update(POLICY_LABELS[(i // 2) % len(POLICY_LABELS)])
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": "default", "labels": labels},
            "spec": {"selector": {"app": f"svc-{i}"}, "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]}}


def pod_body(n: int, pods: int) -> dict[str, Any]:
    """Ready pod number ``n`` (``svc-<n // pods>-<n % pods>``) with a unique IP from 10.64.0.0/10."""
    i, j = divmod(n, pods)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"svc-{i}-{j}", "namespace": "default", "labels": {"app": f"svc-{i}"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
            "status": {"podIP": f"10.{64 + n // 65536}.{(n // 256) % 256}.{n % 256}",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


_PATHS = {"services": "/api/v1/namespaces/default/services", "pods": "/api/v1/namespaces/default/pods"}


class HttpError(RuntimeError):
    """A create the server refused: the status line and the start of its answer."""


class _Connection:
    """One keep-alive HTTPS connection sending pipelined POSTs and reading their answers in order."""

    def __init__(self, url: str, ctx: ssl.SSLContext, token: str) -> None:
        u = urlsplit(url)
        host, port = u.hostname or "127.0.0.1", u.port or 443
        raw = socket.create_connection((host, port), timeout=120)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.reader = self.sock.makefile("rb", buffering=1 << 16)
        self.head = (f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nUser-Agent: trafficmgr-bench\r\n").encode()

    def send(self, path: str, body: bytes) -> None:
        self.sock.sendall(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (path.encode(), self.head,
                                                                                  len(body), body))

    def receive(self) -> int:
        status = self.reader.readline()
        if not status:
            raise HttpError("the server closed the connection")
        code = int(status.split(b" ", 2)[1])
        length = 0
        while True:
            line = self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = self.reader.read(length) if length else b""
        if code != 201:
            raise HttpError(f"{status.decode(errors='replace').strip()}: {data[:300].decode(errors='replace')}")
        return code

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


def _context(ca: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca) if ca else ssl.create_default_context()


def post_all(url: str, token: str, ca: str | None, path: str, bodies: Sequence[bytes], connections: int,
             window: int) -> list[float]:
    """POST every body (round-robin over ``connections``, ``window`` in flight on each); returns the
    completion times (``time.time()``); raises :class:`HttpError` on the first refused create."""
    ctx = _context(ca)
    times: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(share: Sequence[bytes]) -> None:
        conn = None
        try:
            conn = _Connection(url, ctx, token)
            done: list[float] = []
            sent = received = 0
            while received < len(share):
                while sent < len(share) and sent - received < window:
                    conn.send(path, share[sent])
                    sent += 1
                conn.receive()
                received += 1
                done.append(time.time())
            with lock:
                times.extend(done)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(e)
        finally:
            if conn is not None:
                conn.close()

    n = max(1, min(connections, len(bodies)))
    threads = [threading.Thread(target=worker, args=(bodies[k::n],), daemon=True) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return times


class Loader:
    """Creates objects through ``url`` with ``token`` (server CA ``ca``) from ``processes`` client
    processes of ``connections`` connections each."""

    def __init__(self, url: str, token: str, ca: str | None, connections: int = 2, processes: int = 2,
                 window: int = 16) -> None:
        self.url, self.token, self.ca = url, token, ca
        self.connections, self.processes, self.window = connections, max(1, processes), max(1, window)

    def create(self, kind: str, count: int, services: int, pods: int) -> list[float]:
        """Create objects 0..count-1 of ``kind`` (``services`` or ``pods``); returns sorted completion times."""
        if kind not in _PATHS:
            raise ValueError(f"kind must be one of {sorted(_PATHS)}, not {kind!r}")
        procs = []
        for k in range(self.processes):
            spec = {"url": self.url, "token": self.token, "ca": self.ca, "kind": kind,
                    "start": k, "step": self.processes, "count": count, "services": services, "pods": pods,
                    "connections": self.connections, "window": self.window}
            proc = subprocess.Popen([sys.executable, "-m", "trafficmgr.bench.loader"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            procs.append(proc)
        times: list[float] = []
        errors = []
        for proc in procs:
            assert proc.stdout is not None
            out = json.loads(proc.stdout.read() or '{"error": "the client process died"}')
            proc.wait()
            if "error" in out:
                errors.append(out["error"])
            else:
                times.extend(out["times"])
        if errors:
            raise HttpError(f"creating {kind}: {errors[0]}")
        return sorted(times)


def _client_main() -> int:
    spec = json.loads(sys.stdin.read())
    make = service_body if spec["kind"] == "services" else (lambda n: pod_body(n, spec["pods"]))
    bodies = [json.dumps(make(n), separators=(",", ":")).encode()
              for n in range(spec["start"], spec["count"], spec["step"])]
    try:
        times = post_all(spec["url"], spec["token"], spec["ca"], _PATHS[spec["kind"]], bodies,
                         spec["connections"], spec["window"])
    except (OSError, HttpError) as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps({"times": times}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_client_main())
