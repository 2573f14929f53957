"""Server-sent events through a real sidecar Envoy outlive Envoy's default route timeout (15 s): routes
have no timeout unless ``traffic.request.timeout`` sets one."""

from __future__ import annotations

import http.client
import http.server
import time
from collections.abc import Callable, Iterator

import pytest

from tests.protocols.serving import serving
from trafficmgr.testing.kit import SidecarMesh

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: events, labels: {traffic.port.9080: http}}
spec: {selector: {app: events}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: events-1, labels: {app: events}}
spec: {containers: [{name: app, image: events}]}
"""
EVENTS, INTERVAL = 20, 0.8  # 16 s in all


class EventStream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(EVENTS):
            time.sleep(INTERVAL)
            data = f"data: {i}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mesh(trafficmgr_envoy: Callable[..., SidecarMesh]) -> Iterator[SidecarMesh]:
    m = trafficmgr_envoy(MANIFESTS, plugins=["circuit_breaker"])
    host, port = m.take_over("events-1")
    with serving(http.server.ThreadingHTTPServer((host, port), EventStream)):
        yield m


def test_server_sent_events_outlive_envoys_default_route_timeout(mesh: SidecarMesh) -> None:
    ip, port = mesh.address("events")
    conn = http.client.HTTPConnection(ip, port, timeout=10)
    start = time.monotonic()
    conn.request("GET", "/stream", headers={"Host": f"events:{port}", "Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.status == 200
    body = response.read().decode()
    conn.close()
    assert [line for line in body.splitlines() if line] == [f"data: {i}" for i in range(EVENTS)]
    assert time.monotonic() - start > 15  # past what Envoy's default route timeout would allow
