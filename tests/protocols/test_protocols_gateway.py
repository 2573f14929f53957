"""gRPC and WebSocket through the ingress gateway (a real gateway Envoy, the real control plane, the
in-memory API server; pods are ``grpc-echo`` and ``ws-echo`` servers on 127.0.x loopback addresses).

- gRPC: an Ingress whose backend Service port has ``appProtocol: grpc`` (no label); a grpcio client on the
  gateway's plain port speaks h2c, the gateway reaches the pod over HTTP/2.
- WebSocket over TLS: ``wss://`` to the SNI host of an Ingress with ``spec.tls`` (certificates from a
  test CA, as in the tls plugin's tests); the upgraded connection outlives the Service's 1 s route timeout.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from websockets.sync.client import connect as ws_connect

from tests.plugins.tlscerts import CA, https_get, make_ca, make_leaf, secret_yaml, tls_handshake
from trafficmgr.apps.grpc_echo import ECHO_METHOD, STREAM_METHOD, GrpcEchoServer
from trafficmgr.apps.ws_echo import WsEchoServer
from trafficmgr.testing.cluster import GatewayCluster
from trafficmgr.testing.manifests import join, pod

GRPC_IP, WS_IP = "127.0.13.1", "127.0.13.2"
GRPC_HOST, WS_HOST = "grpc.example.com", "chat.example.com"
GRPC_CLUSTER = "9090|default|gecho.outbound"

MANIFESTS = join(
    pod("gecho-1", GRPC_IP, "gecho"),
    pod("chat-1", WS_IP, "chat"),
    """apiVersion: v1
kind: Service
metadata: {name: gecho, namespace: default}
spec: {selector: {app: gecho}, ports: [{name: grpc, port: 9090, targetPort: 9090, appProtocol: grpc}]}
""",
    """apiVersion: v1
kind: Service
metadata: {name: chat, namespace: default, labels: {traffic.request.timeout: "1000"}}
spec: {selector: {app: chat}, ports: [{name: http, port: 8765, targetPort: 8765}]}
""",
    f"""apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: protocols, namespace: default}}
spec:
  ingressClassName: traffic
  tls:
  - {{hosts: [{WS_HOST}], secretName: chat-tls}}
  rules:
  - host: {GRPC_HOST}
    http:
      paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: gecho, port: {{number: 9090}}}}}}}}]
  - host: {WS_HOST}
    http:
      paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: chat, port: {{number: 8765}}}}}}}}]
""",
)


class Rig:
    def __init__(self, c: GatewayCluster, ca: CA) -> None:
        self.c, self.ca = c, ca

    def stat(self, name: str) -> int:
        stats = self.c.envoy.stats()
        assert name in stats, f"the gateway has no stat {name!r}: {sorted(k for k in stats if name.rsplit('.', 1)[0] in k)[:20]}"
        return stats[name]

    def stats_ending(self, suffix: str) -> int:
        """The sum of the gateway's stats ending with ``suffix`` (the ingress listener's HCM stat prefix is
        the plugin's business)."""
        return sum(v for k, v in self.c.envoy.stats().items() if k.startswith("http.") and k.endswith(suffix))


@pytest.fixture(scope="module")
def rig(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    leaf = make_leaf(ca, d, [WS_HOST], 0xC4A7)
    started: list[Any] = []
    with GatewayCluster() as c:
        try:
            started.append(GrpcEchoServer(GRPC_IP, 9090, pod_name="gecho-1").start())
            started.append(WsEchoServer(WS_IP, 8765, pod_name="chat-1").start())
            c.apply(secret_yaml("chat-tls", leaf.cert, leaf.key))
            c.apply(MANIFESTS)
            c.wait_config(lambda: _serial(c, ca) == 0xC4A7 and f"{GRPC_CLUSTER}::{GRPC_IP}:9090::" in c.envoy.admin("/clusters"),
                          15, message="the Ingress is not served")
            yield Rig(c, ca)
            assert c.cp.nacks() == [], c.cp.nacks()
        finally:
            for app in started:
                app.stop()


def _serial(c: GatewayCluster, ca: CA) -> int | None:
    try:
        return tls_handshake("127.0.0.1", c.gateway_port, WS_HOST, str(ca.cert_path))[0]
    except OSError:
        return None


def test_grpc_through_the_gateway_plain_port_reaches_an_app_protocol_grpc_backend_over_http2(rig: Rig) -> None:
    before_h2, before_rq = rig.stat(f"cluster.{GRPC_CLUSTER}.upstream_cx_http2_total"), rig.stat(f"cluster.{GRPC_CLUSTER}.upstream_rq_total")
    options = [("grpc.enable_http_proxy", 0), ("grpc.default_authority", GRPC_HOST)]
    with grpc.insecure_channel(f"127.0.0.1:{rig.c.gateway_port}", options=options) as channel:
        reply, call = channel.unary_unary(ECHO_METHOD).with_call(b"through the gateway", timeout=5)
        assert reply == b"through the gateway"
        assert dict(call.initial_metadata())["x-pod"] == "gecho-1"
        # A server stream on the same channel: three messages, then OK.
        stream = channel.unary_stream(STREAM_METHOD)(b"s", timeout=5, metadata=(("x-count", "3"), ("x-interval-ms", "50")))
        assert list(stream) == [b"s"] * 3 and stream.code() == grpc.StatusCode.OK
    assert rig.stat(f"cluster.{GRPC_CLUSTER}.upstream_rq_total") == before_rq + 2
    assert rig.stat(f"cluster.{GRPC_CLUSTER}.upstream_cx_http2_total") == before_h2 + (0 if before_h2 else 1)
    assert rig.stat(f"cluster.{GRPC_CLUSTER}.upstream_cx_http1_total") == 0
    assert rig.stats_ending(".downstream_cx_http2_total") >= 1  # the client's h2c on the plain port


def test_wss_through_the_gateway_outlives_the_route_timeout(rig: Rig) -> None:
    before = rig.stats_ending(".downstream_cx_upgrades_total")
    ctx = ssl.create_default_context(cafile=str(rig.ca.cert_path))
    port = rig.c.gateway_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    start = time.monotonic()
    # The URI's host is the SNI name and the Host header; the socket goes to the gateway on loopback.
    with ws_connect(f"wss://{WS_HOST}:{port}/room", sock=sock, ssl=ctx, proxy=None, open_timeout=5, close_timeout=2) as ws:
        tls = ws.socket
        assert isinstance(tls, ssl.SSLSocket) and tls.version() is not None
        assert ws.recv(timeout=5) == "hello from chat-1"
        ws.send("one")
        assert ws.recv(timeout=5) == "one"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
        time.sleep(2.0)  # past the 1 s route timeout (traffic.request.timeout=1000 on the Service)
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"
    assert time.monotonic() - start > 2.0
    assert rig.stats_ending(".downstream_cx_upgrades_total") == before + 1
    assert rig.stat("cluster.8765|default|chat.outbound.upstream_rq_timeout") == 0


def test_plain_https_to_the_websocket_host_keeps_its_route(rig: Rig) -> None:
    """The same host without the upgrade: the ws-echo server's own 426, so the route is the chat pod's."""
    status, body = https_get("127.0.0.1", rig.c.gateway_port, WS_HOST, "/room", str(rig.ca.cert_path))
    assert status == 426, (status, body)


def test_http2_over_tls_to_the_gateway_reaches_an_http1_backend_as_http1(rig: Rig) -> None:
    """A browser negotiates HTTP/2 with the gateway (ALPN h2); that says nothing about the backend. An
    ``http`` port's shared cluster uses the client's protocol (right for sidecars), so the gateway view
    has its own HTTP/1.1 variant of the clusters its routes target: the HTTP/1.1-only ws-echo pod still
    answers (its own 426), over an HTTP/1.1 upstream connection."""
    cluster = "cluster.8765|default|chat.outbound."
    h2_before = rig.stat(cluster + "upstream_cx_http2_total") if cluster + "upstream_cx_http2_total" in rig.c.envoy.stats() else 0
    port = rig.c.gateway_port
    proc = subprocess.run(
        ["curl", "-sS", "-m", "5", "--http2", "--cacert", str(rig.ca.cert_path), "--resolve", f"{WS_HOST}:{port}:127.0.0.1",
         "-o", "/dev/null", "-w", "%{http_code} %{http_version}", f"https://{WS_HOST}:{port}/room"],
        capture_output=True, text=True, timeout=30, check=False)
    assert proc.stdout == "426 2", (proc.stdout, proc.stderr)  # HTTP/2 to the gateway, the pod's answer back
    assert rig.stat(cluster + "upstream_cx_http1_total") >= 1
    assert rig.c.envoy.stats().get(cluster + "upstream_cx_http2_total", 0) == h2_before == 0
