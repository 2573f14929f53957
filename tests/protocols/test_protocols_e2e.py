"""gRPC, WebSocket and h2c end to end through captured sidecars (network namespaces, iptables), as pods
would use them: real ``grpc-echo`` and ``ws-echo`` pods, the in-memory API server, the real control plane.

One :class:`LocalCluster` serves the module: the client pod (its sidecar captures outbound TCP) holds the
gRPC pods and one WebSocket pod on its own network; a second pod (``chat-2``) in its own namespace, linked
by a veth pair, captures inbound connections with its own sidecar, so a connection to it crosses both
sidecars (outbound of the client, inbound of the server).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from trafficmgr.apps.grpc_echo import ECHO_METHOD, GrpcEchoServer
from trafficmgr.apps.ws_echo import WsEchoServer
from trafficmgr.testing.cluster import LocalCluster, SidecarPod
from trafficmgr.testing.manifests import join, pod
from trafficmgr.testing.netns import require as _require_netns

ECHO_PODS = {"echo-1": "10.244.0.21", "echo-2": "10.244.0.22"}
CHAT_IP = "10.244.0.31"  # on the client pod's network: reached through the client's outbound capture only
CHAT_IN_IP = "10.244.1.5"  # a pod of its own (namespace, sidecar, inbound capture)
GRPC_PORT, WS_PORT, WS_IN_PORT = 9090, 8765, 8766


def _service(name: str, port: int, target_port: int, app: str, labels: dict[str, str], app_protocol: str | None = None) -> str:
    ap = f", appProtocol: {app_protocol}" if app_protocol else ""
    label_text = ", ".join(f'{k}: "{v}"' for k, v in labels.items())
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {{{label_text}}}}}
spec: {{selector: {{app: {app}}}, ports: [{{name: p{port}, port: {port}, targetPort: {target_port}{ap}}}]}}
"""


MANIFESTS = join(
    *(pod(name, ip, "echo") for name, ip in ECHO_PODS.items()),
    pod("chat-1", CHAT_IP, "chat"),
    pod("chat-2", CHAT_IN_IP, "chat-in"),
    # gRPC: by label, by appProtocol alone (no label), and the same pods on a port labeled http.
    _service("echo", GRPC_PORT, GRPC_PORT, "echo", {f"traffic.port.{GRPC_PORT}": "grpc"}),
    _service("echo-ap", 9091, GRPC_PORT, "echo", {}, app_protocol="grpc"),
    _service("echo-http", 9092, GRPC_PORT, "echo", {"traffic.port.9092": "http"}),
    # WebSocket: a 1 s route timeout that an upgraded connection must outlive.
    _service("chat", WS_PORT, WS_PORT, "chat", {f"traffic.port.{WS_PORT}": "http", "traffic.request.timeout": "1000"}),
    _service("chat-in", WS_IN_PORT, WS_IN_PORT, "chat-in", {"traffic.request.timeout": "1000"},
             app_protocol="kubernetes.io/ws"),
)


class Rig:
    def __init__(self, c: LocalCluster, server: SidecarPod) -> None:
        self.c, self.server = c, server

    @property
    def client(self) -> SidecarPod:
        assert self.c.pod is not None
        return self.c.pod


@pytest.fixture(scope="module")
def rig(envoy_binary: str) -> Iterator[Rig]:
    _require_netns()
    started: list[Any] = []
    with LocalCluster([*ECHO_PODS.values(), CHAT_IP]) as c:
        client = c.pod
        assert client is not None
        try:
            for name, ip in ECHO_PODS.items():
                started.append(client.in_ns(lambda name=name, ip=ip: GrpcEchoServer(ip, GRPC_PORT, pod_name=name).start()))
            started.append(client.in_ns(lambda: WsEchoServer(CHAT_IP, WS_PORT, pod_name="chat-1").start()))
            c.apply(MANIFESTS)
            server = c.peer_pod("chat-2", CHAT_IN_IP)
            started.append(server.in_ns(lambda: WsEchoServer(CHAT_IN_IP, WS_IN_PORT, pod_name="chat-2").start()))
            clusters = [f"{port}|default|{svc}.outbound" for svc, port in
                        (("echo", GRPC_PORT), ("echo-ap", 9091), ("echo-http", 9092), ("chat", WS_PORT), ("chat-in", WS_IN_PORT))]

            def configured() -> bool:
                dump = client.admin("/clusters")
                return (all(f"{name}::" in dump for name in clusters)
                        and f"inbound|http|{WS_IN_PORT}" in server.listener_config("inbound"))

            c.wait_config(configured, 15, message="services not configured on the sidecars")
            yield Rig(c, server)
            assert c.cp.nacks() == [], c.cp.nacks()
        finally:
            for app in started:
                app.stop()


# -- gRPC ---------------------------------------------------------------------------------------------


#: A grpcio client run as a process inside the pod namespace (``ip netns exec``), not in a thread switched
#: with ``in_ns``: grpcio connects from its own threads, and once the process has any (the rig's xDS server
#: is grpcio) those are in the host's namespace, so the call would leave through the host's network.
#: ``argv``: target, number of unary calls over one channel, method. Prints JSON: the x-pod of each reply
#: in order, and the first error as [code, details].
GRPC_CLIENT = """
import json, sys, grpc
target, n, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"pods": [], "error": None}
with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
    echo = channel.unary_unary(method)
    try:
        for i in range(n):
            reply, call = echo.with_call(b"ping %d" % i, timeout=5)
            assert reply == b"ping %d" % i, reply
            out["pods"].append(dict(call.initial_metadata()).get("x-pod"))
    except grpc.RpcError as exc:
        out["error"] = [exc.code().name, exc.details()]
print(json.dumps(out))
"""


def grpc_calls(pod: SidecarPod, target: str, n: int) -> tuple[Counter[str], list[str] | None]:
    """``n`` unary calls over one channel from inside ``pod``: (pods that answered, error or None)."""
    proc = pod.ns.run(sys.executable, "-c", GRPC_CLIENT, target, str(n), ECHO_METHOD, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return Counter(out["pods"]), out["error"]


@pytest.mark.parametrize("service,port", [("echo", GRPC_PORT), ("echo-ap", 9091)], ids=["label", "appProtocol"])
def test_grpc_through_the_captured_sidecar_reaches_both_pods_over_one_channel(rig: Rig, service: str, port: int) -> None:
    """A grpcio client in the pod calls the ClusterIP; iptables sends it to the sidecar, which balances the
    calls of its one HTTP/2 connection across both pods and speaks HTTP/2 to them. ``echo`` has the label
    ``traffic.port.9090=grpc``, ``echo-ap`` only ``appProtocol: grpc``."""
    cluster = f"cluster.{port}|default|{service}.outbound."
    names = [cluster + "upstream_rq_total", cluster + "upstream_cx_http1_total", f"http.outbound_{port}.downstream_cx_http2_total",
             f"http.outbound_{port}.downstream_cx_total"]
    before = {n: rig.client.stat(n) for n in names}
    seen, error = grpc_calls(rig.client, f"{rig.c.cluster_ip(service)}:{port}", 20)
    assert error is None, error
    assert set(seen) == set(ECHO_PODS) and min(seen.values()) >= 5, seen
    delta = {n.rsplit(".", 1)[-1]: rig.client.stat(n) - before[n] for n in names}
    # 20 requests through the sidecar (not around it) on one downstream HTTP/2 connection, none upstream
    # on HTTP/1.1; and the pods speak only HTTP/2, so every reply above came over HTTP/2.
    assert delta == {"upstream_rq_total": 20, "upstream_cx_http1_total": 0, "downstream_cx_http2_total": 1,
                     "downstream_cx_total": 1}, delta
    assert rig.client.stat(cluster + "upstream_cx_http2_total") >= 2  # one connection per pod


# -- WebSocket ------------------------------------------------------------------------------------------


def ws_session(url: str, pod_name: str, pause: float = 2.0, **kw: Any) -> list[str | bytes]:
    """Open ``url``, check the greeting, exchange text and binary messages, stay idle for ``pause`` s (past
    the 1 s route timeout), then exchange again; returns what was received (call inside the namespace)."""
    got: list[str | bytes] = []
    with ws_connect(url, proxy=None, open_timeout=5, close_timeout=2, **kw) as ws:
        got.append(ws.recv(timeout=5))
        assert got[-1] == f"hello from {pod_name}"
        for message in ("one", b"\x00\x01binary"):
            ws.send(message)
            got.append(ws.recv(timeout=5))
        time.sleep(pause)
        ws.send("still here")
        got.append(ws.recv(timeout=5))
    return got


EXPECTED = ["one", b"\x00\x01binary", "still here"]


def test_websocket_through_the_captured_sidecar_outlives_the_route_timeout(rig: Rig) -> None:
    stat = f"http.outbound_{WS_PORT}.downstream_cx_upgrades_total"
    before = rig.client.stat(stat)
    url = f"ws://{rig.c.cluster_ip('chat')}:{WS_PORT}/room"
    start = time.monotonic()
    got = rig.client.in_ns(lambda: ws_session(url, "chat-1"))
    assert got[1:] == EXPECTED and time.monotonic() - start > 2.0
    assert rig.client.stat(stat) == before + 1
    assert rig.client.stat(f"cluster.{WS_PORT}|default|chat.outbound.upstream_rq_timeout") == 0


def test_websocket_through_the_receiving_pods_inbound_side(rig: Rig) -> None:
    """To a pod with its own sidecar: the client's outbound, the veth link, the server's inbound capture and
    its inbound listener all pass the upgrade; the service's port has ``appProtocol: kubernetes.io/ws``."""
    out_stat = f"http.outbound_{WS_IN_PORT}.downstream_cx_upgrades_total"
    in_stat = "http.inbound_http.downstream_cx_upgrades_total"
    before_out, before_in = rig.client.stat(out_stat), rig.server.stat(in_stat)
    url = f"ws://{rig.c.cluster_ip('chat-in')}:{WS_IN_PORT}/room"
    got = rig.client.in_ns(lambda: ws_session(url, "chat-2"))
    assert got[1:] == EXPECTED
    assert rig.client.stat(out_stat) == before_out + 1
    assert rig.server.stat(in_stat) == before_in + 1


# -- h2c on a port labeled http ------------------------------------------------------------------------


def _grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


@pytest.fixture
def grpc_body(tmp_path: Path) -> str:
    path = tmp_path / "body"
    path.write_bytes(_grpc_frame(b"h2c"))
    os.chmod(tmp_path, 0o755)
    return str(path)


def _h2c_post(rig: Rig, service: str, port: int, body: str) -> str:
    """``curl --http2-prior-knowledge`` a gRPC call from inside the client pod; the response head."""
    proc = rig.client.ns.run(
        "curl", "-sS", "-m", "5", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-",
        "-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", f"@{body}",
        f"http://{rig.c.cluster_ip(service)}:{port}{ECHO_METHOD}", check=False)
    return f"rc={proc.returncode} {proc.stdout.strip()} {proc.stderr.strip()}".lower()


def test_h2c_prior_knowledge_to_a_grpc_port(rig: Rig, grpc_body: str) -> None:
    """The control for the test below: the same curl to the same pods on the ``grpc`` port works."""
    head = _h2c_post(rig, "echo", GRPC_PORT, grpc_body)
    assert "http/2 200" in head and "grpc-status: 0" in head and "x-pod: echo-" in head, head


def test_h2c_prior_knowledge_to_an_http2_only_server_on_an_http_port(rig: Rig, grpc_body: str) -> None:
    """An ``http`` port sends upstream what the client spoke: an h2c client reaches an HTTP/2-only server
    (before, the sidecar opened HTTP/1.1 to it: protocol error, 502)."""
    stat = "cluster.9092|default|echo-http.outbound."
    before = {k: rig.client.stat(stat + k) for k in ("upstream_cx_http1_total", "upstream_cx_protocol_error")}
    head = _h2c_post(rig, "echo-http", 9092, grpc_body)
    after = {k: rig.client.stat(stat + k) for k in before}
    assert "http/2 200" in head and "grpc-status: 0" in head and "x-pod: echo-" in head, (head, before, after)
    assert after == before, "no HTTP/1.1 connection and no protocol error upstream"
    assert rig.client.stat(stat + "upstream_cx_http2_total") >= 1
