"""Local mode (``trafficmgr demo``): no capture, applications reach the mesh through their sidecar's explicit
HTTP proxy on ``<pod IP>:15001`` (``HTTP_PROXY``). WebSocket through it (an absolute-URI upgrade request and
a CONNECT tunnel), gRPC through it (grpcio's proxy support: a CONNECT tunnel, passed on as TCP).

The rig is what the demo runs, on loopback: the control plane with ``--explicit-proxy`` (the gateway rig's,
:class:`GatewayCluster`, with that option) and one sidecar Envoy for pod ``app-1`` made as the local runtime
makes it (:func:`trafficmgr.core.agent.local_runtime.add_explicit_proxy`): the static listener
``<pod IP>:15001`` forwarding to the internal listener ``outbound_proxy`` the control plane serves.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr.apps.grpc_echo import ECHO_METHOD, GrpcEchoServer
from trafficmgr.apps.ws_echo import WsEchoServer
from trafficmgr.core.agent.local_runtime import PROXY_PORT, add_explicit_proxy
from trafficmgr.core.bootstrap import bootstrap
from trafficmgr.testing.cluster import GatewayCluster
from trafficmgr.testing.envoy import EnvoyProcess
from trafficmgr.testing.manifests import join, pod

APP_IP, WS_IP = "127.0.14.1", "127.0.14.3"
GRPC_PODS = {"gecho-1": "127.0.14.2", "gecho-2": "127.0.14.4"}
PROXY = f"http://{APP_IP}:{PROXY_PORT}"

MANIFESTS = join(
    pod("app-1", APP_IP, "app"),
    *(pod(name, ip, "gecho") for name, ip in GRPC_PODS.items()),
    pod("chat-1", WS_IP, "chat"),
    """apiVersion: v1
kind: Service
metadata: {name: gecho, namespace: default}
spec: {selector: {app: gecho}, ports: [{name: grpc, port: 9090, targetPort: 9090, appProtocol: grpc}]}
""",
    """apiVersion: v1
kind: Service
metadata: {name: chat, namespace: default, labels: {traffic.port.8765: http, traffic.request.timeout: "1000"}}
spec: {selector: {app: chat}, ports: [{name: http, port: 8765, targetPort: 8765}]}
""",
)


class Rig:
    def __init__(self, c: GatewayCluster, sidecar: EnvoyProcess) -> None:
        self.c, self.sidecar = c, sidecar

    def stats(self) -> dict[str, int]:
        return self.sidecar.stats()


@pytest.fixture(scope="module")
def rig(envoy_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    started: list[Any] = []
    with GatewayCluster(options=argparse.Namespace(explicit_proxy=True)) as c:
        try:
            started.extend(GrpcEchoServer(ip, 9090, pod_name=name).start() for name, ip in GRPC_PODS.items())
            started.append(WsEchoServer(WS_IP, 8765, pod_name="chat-1").start())
            c.apply(MANIFESTS)
            config = add_explicit_proxy(bootstrap("app-1.default", "sidecar", "127.0.0.1", c.xds.port, admin_port=0), APP_IP)
            sidecar = EnvoyProcess(config, tmp_path_factory.mktemp("app-1-sidecar")).start()
            started.append(sidecar)
            wanted = ["8765|default|chat.outbound::", *(f"9090|default|gecho.outbound::{ip}:9090::" for ip in GRPC_PODS.values())]
            sidecar.wait_for(lambda: "outbound_proxy" in sidecar.admin("/listeners")
                             and all(name in sidecar.admin("/clusters") for name in wanted),
                             15, message="the local sidecar has no explicit proxy or endpoints")
            yield Rig(c, sidecar)
            assert c.cp.nacks() == [], c.cp.nacks()
        finally:
            for app in reversed(started):
                app.stop()


# -- WebSocket, by hand: an absolute-URI upgrade request to the proxy ------------------------------------


def _read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head


def _send_text(sock: socket.socket, text: str) -> None:
    """One masked text frame (a client's frames are masked, RFC 6455 5.3)."""
    payload, mask = text.encode(), os.urandom(4)
    assert len(payload) < 126
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def _recv_text(sock: socket.socket) -> str:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        return data

    first, second = exactly(2)
    assert first == 0x81, f"not a final text frame: {first:#x}"  # the server's frames are not masked
    length = second & 0x7F
    if length == 126:
        length = struct.unpack(">H", exactly(2))[0]
    return exactly(length).decode()


def ws_via_proxy(target: str, pause: float) -> tuple[bytes, list[str]]:
    """``GET ws://<target>/room`` as an HTTP proxy request (absolute URI) to the sidecar's explicit proxy:
    (response head, messages received: the greeting, two echoes around a ``pause``)."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET http://{target}/room HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with socket.create_connection((APP_IP, PROXY_PORT), timeout=5) as sock:
        sock.sendall(request.encode())
        head = _read_head(sock)
        if not head.startswith(b"HTTP/1.1 101"):
            return head + sock.recv(4096), []
        got = [_recv_text(sock)]
        _send_text(sock, "one")
        got.append(_recv_text(sock))
        time.sleep(pause)
        _send_text(sock, "still here")
        got.append(_recv_text(sock))
        sock.sendall(bytes([0x88, 0x80]) + os.urandom(4))  # close
    return head, got


def test_websocket_through_the_explicit_proxy_by_absolute_uri(rig: Rig) -> None:
    """An HTTP proxy request with Upgrade (how a plain HTTP client uses ``HTTP_PROXY``): both connection
    managers (the static ``<pod IP>:15001`` hop, the internal ``outbound_proxy``) upgrade it, and the
    connection outlives the Service's 1 s route timeout."""
    before = rig.stats().get("http.outbound_proxy.downstream_cx_upgrades_total", 0)
    start = time.monotonic()
    head, got = ws_via_proxy("chat:8765", pause=2.0)
    assert head.startswith(b"HTTP/1.1 101"), head.decode(errors="replace")
    assert got == ["hello from chat-1", "one", "still here"] and time.monotonic() - start > 2.0
    assert rig.stats()["http.outbound_proxy.downstream_cx_upgrades_total"] == before + 1
    assert rig.stats()["cluster.8765|default|chat.outbound.upstream_rq_timeout"] == 0


def test_websocket_through_the_explicit_proxy_by_connect(rig: Rig) -> None:
    """The ``websockets`` library's own proxy support (``proxy=``) opens a CONNECT tunnel; it lasts past the
    1 s route timeout too (the CONNECT route has none)."""
    from websockets.sync.client import connect

    with connect("ws://chat:8765/room", proxy=PROXY, open_timeout=5, close_timeout=2) as ws:
        assert ws.recv(timeout=5) == "hello from chat-1"
        ws.send("one")
        assert ws.recv(timeout=5) == "one"
        time.sleep(2.0)
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"


# -- gRPC: grpcio's proxy support is HTTP CONNECT ------------------------------------------------------

#: A grpcio client as a pod process in local mode: the proxy comes from the environment the local kubelet
#: sets (``HTTP_PROXY`` and ``http_proxy``). ``argv``: target, method, number of calls over one channel.
#: Prints JSON: the x-pod of each reply, the first error as [code, details], the seconds taken.
GRPC_CLIENT = """
import json, sys, time, grpc
start = time.monotonic()
out = {"pods": [], "error": None}
with grpc.insecure_channel(sys.argv[1]) as channel:
    echo = channel.unary_unary(sys.argv[2])
    try:
        for i in range(int(sys.argv[3])):
            reply, call = echo.with_call(b"ping %d" % i, timeout=5)
            assert reply == b"ping %d" % i, reply
            out["pods"].append(dict(call.initial_metadata()).get("x-pod"))
    except grpc.RpcError as exc:
        out["error"] = [exc.code().name, exc.details()]
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def grpc_via_proxy(target: str, n: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HTTP_PROXY=PROXY, http_proxy=PROXY)
    proc = subprocess.run([sys.executable, "-c", GRPC_CLIENT, target, ECHO_METHOD, str(n)], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_grpc_through_the_explicit_proxy_is_one_tcp_tunnel_to_one_pod(rig: Rig) -> None:
    """grpcio with ``HTTP_PROXY`` (as local mode sets it) sends ``CONNECT gecho:9090``; the proxy terminates
    the tunnel and passes its bytes to the service's cluster as TCP. The calls work, but the sidecar never
    sees them as gRPC: every call of the channel goes to the one pod the tunnel reached (a captured
    sidecar balances them per call, see test_protocols_e2e), and the cluster counts one request (the
    tunnel) on no HTTP/2 connection: per-call policies do not apply to gRPC in local mode."""
    cluster = "cluster.9090|default|gecho.outbound."
    before = {k: rig.stats().get(cluster + k, 0) for k in ("upstream_rq_total", "upstream_cx_total", "upstream_cx_http2_total")}
    before_connect = rig.stats().get("http.explicit_proxy.downstream_cx_upgrades_total", 0)
    out = grpc_via_proxy("gecho:9090", 20)
    assert out["error"] is None, out
    assert len(out["pods"]) == 20 and len(set(out["pods"])) == 1 and out["pods"][0] in GRPC_PODS, out
    after = rig.stats()
    assert after["http.explicit_proxy.downstream_cx_upgrades_total"] == before_connect + 1  # the CONNECT
    assert after[cluster + "upstream_rq_total"] == before["upstream_rq_total"] + 1
    assert after[cluster + "upstream_cx_total"] == before["upstream_cx_total"] + 1
    assert after.get(cluster + "upstream_cx_http2_total", 0) == before["upstream_cx_http2_total"]
