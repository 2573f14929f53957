"""Long streams through a real sidecar Envoy outlive Envoy's default route timeout (15 s): routes have no
timeout unless a label sets one (``traffic.request.timeout``). Server-sent events on an ``http`` port and a
gRPC server stream on a ``grpc`` port, 16 s each, run at the same time (one 16 s wait proves both); the
gRPC client's own deadline (grpc-timeout) is still honoured."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from tests.protocols.serving import serving
from tests.protocols.test_grpc import STREAM, _mesh, manifests
from trafficmgr.testing.kit import SidecarMesh

SSE_MANIFESTS = """
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
EVENTS, INTERVAL = 20, 0.8  # 16 s in all (the gRPC server's stream: 20 messages, one every 0.8 s, too)


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


def _events(mesh: SidecarMesh, out: dict[str, object]) -> None:
    """GET the event stream through the sidecar; ``out``: status, body, seconds (or the error)."""
    try:
        ip, port = mesh.address("events")
        conn = http.client.HTTPConnection(ip, port, timeout=10)
        start = time.monotonic()
        conn.request("GET", "/stream", headers={"Host": f"events:{port}", "Accept": "text/event-stream"})
        response = conn.getresponse()
        out["status"] = response.status
        out["body"] = response.read().decode()
        out["seconds"] = time.monotonic() - start
        conn.close()
    except Exception as exc:  # noqa: BLE001 - reported by the test below
        out["error"] = exc


def test_server_sent_events_and_a_grpc_stream_outlive_envoys_default_route_timeout(
        trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    sse = trafficmgr_envoy(SSE_MANIFESTS, plugins=["circuit_breaker"])
    events: dict[str, object] = {}
    grpc_mesh, servers = _mesh(trafficmgr_envoy, manifests(), ["lb", "circuit_breaker"])
    try:
        with serving(http.server.ThreadingHTTPServer(sse.take_over("events-1"), EventStream)):
            reader = threading.Thread(target=_events, args=(sse, events), daemon=True)
            reader.start()
            ip, port = grpc_mesh.address("echo")
            with grpc.insecure_channel(f"{ip}:{port}") as channel:
                stream = channel.unary_stream(STREAM)
                start = time.monotonic()
                assert list(stream(b"20")) == [str(i).encode() for i in range(20)]  # no client deadline
                assert time.monotonic() - start > 15  # past what Envoy's default route timeout would allow
                reader.join(30)
                assert not reader.is_alive() and "error" not in events, events
                assert events["status"] == 200
                assert [line for line in str(events["body"]).splitlines() if line] == [f"data: {i}" for i in range(EVENTS)]
                assert float(events["seconds"]) > 15  # type: ignore[arg-type]

                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as exc:
                    list(stream(b"3", timeout=0.4))
                # Both ends enforce the deadline and race: grpcio's own timer gives DEADLINE_EXCEEDED; Envoy's
                # (grpc-timeout honoured) resets the stream whose headers (x-pod) already went out: INTERNAL.
                assert exc.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL), exc.value
                # Ended by the deadline: the 3 messages would take 2.4 s (slack for a loaded machine).
                assert time.monotonic() - start < 2.0, "not ended by the 0.4 s deadline"
    finally:
        for s in servers:
            s.stop(0)
