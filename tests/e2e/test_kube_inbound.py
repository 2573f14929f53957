"""The sidecar's inbound side, end to end across a real network boundary: a client pod and a server pod
in two network namespaces joined by a veth pair, each with its own sidecar Envoy; the server pod's
connections are captured by the agent's nat PREROUTING rules and go through its ``inbound`` listener.

What a user observes: requests still arrive (HTTP and TCP, including a server-first protocol without
delay), the application sees its own sidecar as the peer, and tracing reports both sides of a call."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trafficmgr.apps.zipkin import ZipkinCollector
from trafficmgr.core.envoy import find_envoy
from trafficmgr.plugins import tracing
from trafficmgr.testing.cluster import LocalCluster, SidecarPod
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns
from trafficmgr.testing.netns import world_executable

SERVER_IP = "10.244.1.5"  # lives only in the server pod's namespace
COLLECTOR_IP = "10.244.0.50"  # in the client pod's namespace; the server's sidecar reaches it over the link
GREETING = b"220 hello from a server-first protocol\r\n"


class _Greeting(socketserver.BaseRequestHandler):
    """A server-first TCP protocol (like SMTP or MySQL): it speaks before the client sends anything."""

    def handle(self) -> None:
        self.request.sendall(GREETING)
        self.request.recv(100)


class _PingPong(socketserver.StreamRequestHandler):
    """A client-first line protocol that is not HTTP: ``PING`` -> ``PONG``."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(b"PONG\r\n" if line.strip() == b"PING" else b"ERR " + line)


def tcp_server(host: str, port: int, handler: type[socketserver.BaseRequestHandler]) -> socketserver.ThreadingTCPServer:
    """``handler`` on ``host:port``, served by a daemon thread (create it inside the pod's namespace)."""
    server = socketserver.ThreadingTCPServer((host, port), handler, bind_and_activate=False)
    server.daemon_threads = server.allow_reuse_address = True
    server.server_bind()
    server.server_activate()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Rig:
    def __init__(self, c: LocalCluster, server: SidecarPod, web: Any, zipkin: ZipkinCollector) -> None:
        self.c, self.server, self.web, self.zipkin = c, server, web, zipkin

    def get(self, n: int = 1, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """``n`` GETs from the client pod to service ``web``; what the application saw, in order."""
        before = self.web.hits
        answers = self.c.pod.get_many(self.c.cluster_ip("web"), 8080, "web:8080", n, "/hello", headers, timeout=10)
        assert [status for status, _ in answers] == [200] * n
        assert self.web.hits == before + n
        return list(self.web.requests)[-n:]

    def inbound_http_requests(self) -> int:
        return self.server.stat("http.inbound_http.downstream_rq_total")


@pytest.fixture(scope="module")
def rig(envoy_binary: str) -> Iterator[Rig]:
    _require_netns()
    options = argparse.Namespace(zipkin_address=f"{COLLECTOR_IP}:9411", zipkin_flush_spans=1)
    with LocalCluster([COLLECTOR_IP], options=options) as c:
        zipkin = c.pod.in_ns(lambda: ZipkinCollector(host=COLLECTOR_IP, port=9411).start())
        try:
            c.apply(join(
                pod("web-1", SERVER_IP, "web"),
                service("web", port=8080),
                service("greeter", port=2525, labels={"traffic.port.2525": "tcp"}, app="web", http=False),
            ))
            server = c.peer_pod("web-1", SERVER_IP)
            web = c.peer_backend(server, "web", 8080)
            greeter = server.in_ns(lambda: tcp_server(SERVER_IP, 2525, _Greeting))
            c.wait_config(lambda: "inbound|http|8080" in server.listener_config("inbound"),
                          message="the server sidecar has no inbound listener")
            yield Rig(c, server, web, zipkin)
            greeter.shutdown()
        finally:
            zipkin.stop()


@pytest.fixture
def traced(rig: Rig) -> Iterator[Rig]:
    rig.zipkin.clear()
    yield rig
    rig.c.label("service", "web", {tracing.ENABLED: None, tracing.SAMPLING: None})


def test_http_goes_through_the_server_sidecar(rig: Rig) -> None:
    before = rig.inbound_http_requests()
    seen = rig.get(3)
    # The application's peer is its own sidecar (Envoy connects to the pod's address from inside the
    # pod), not the client pod: the request crossed the server's inbound listener.
    assert {r["peer"] for r in seen} == {SERVER_IP}, seen
    assert rig.inbound_http_requests() == before + 3
    # The caller's request id reaches the application unchanged through both sidecars.
    [one] = rig.get(1, headers={"x-request-id": "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"})
    assert one["headers"]["x-request-id"] == "4bf92f35-77b3-4da6-a3ce-929d0e0e4736" and one["peer"] == SERVER_IP
    assert rig.c.cp.nacks() == []


def test_tcp_port_is_passed_through_and_server_first_protocols_are_not_delayed(rig: Rig) -> None:
    ip = rig.c.cluster_ip("greeter")
    before = rig.server.stat("tcp.inbound_tcp.downstream_cx_total")

    def greet() -> tuple[bytes, float]:
        start = time.monotonic()
        with socket.create_connection((ip, 2525), timeout=5) as s:
            data = s.recv(100)
            s.sendall(b"QUIT\r\n")
        return data, time.monotonic() - start

    data, took = rig.c.pod.in_ns(greet)
    assert data == GREETING
    # No listener filter waits for client bytes on either side (an HTTP inspector would hold the
    # connection until its timeout: 5 s outbound, 15 s by default inbound).
    assert took < 3.0, f"greeting took {took:.2f}s"
    rig.c.wait_config(lambda: rig.server.stat("tcp.inbound_tcp.downstream_cx_total") == before + 1,
                      message="the TCP connection did not cross the inbound listener")


def test_a_non_http_protocol_on_a_port_another_service_calls_http_passes_through(rig: Rig) -> None:
    # Port 7070 of the server pod speaks a line protocol (service "echo", labeled tcp); another service
    # ("web-alt") labels the same target port http, so the shared inbound listener has an HTTP chain
    # for 7070. Only what is recognised as HTTP may go to the connection manager.
    echo = rig.server.in_ns(lambda: tcp_server(SERVER_IP, 7070, _PingPong))
    try:
        rig.c.apply(join(service("echo", port=7070, labels={"traffic.port.7070": "tcp"}, app="web", http=False),
                         service("web-alt", port=7071, target_port=7070, app="web")))
        rig.c.wait_config(lambda: "inbound|http|7070" in rig.server.listener_config("inbound"),
                          message="no HTTP chain for port 7070")
        ip = rig.c.cluster_ip("echo")
        before = rig.inbound_http_requests()

        def ping() -> bytes:
            with socket.create_connection((ip, 7070), timeout=5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(100)

        assert rig.c.pod.in_ns(ping) == b"PONG\r\n"
        assert rig.inbound_http_requests() == before, "the line protocol went to the HTTP connection manager"
    finally:
        echo.shutdown()
        rig.c.store.delete("services", "echo", "default")
        rig.c.store.delete("services", "web-alt", "default")


def test_a_connection_straight_to_the_inbound_port_is_ended_not_looped(rig: Rig) -> None:
    # Not redirected, so its original destination is the inbound listener itself: passing it through
    # would connect to the same port again, without end. From inside the pod, as an application could.
    # (stat() fails on a name Envoy does not have, so a typo cannot read as an unchanged 0.)
    passed = rig.server.stat("cluster.inbound|passthrough.upstream_cx_total")
    ended = rig.server.stat("cluster.inbound|blackhole.upstream_cx_none_healthy")
    proc = rig.server.ns.run("curl", "-sS", "-m", "5", "http://127.0.0.1:15006/", check=False)
    assert proc.returncode in (52, 56), proc  # empty reply / connection reset (a loop would time out: 28)
    rig.c.wait_config(lambda: rig.server.stat("cluster.inbound|blackhole.upstream_cx_none_healthy") == ended + 1,
                      message="the connection did not end at the blackhole")
    assert rig.server.stat("cluster.inbound|passthrough.upstream_cx_total") == passed
    assert rig.get(1)[0]["peer"] == SERVER_IP, "the sidecar still serves"


H2_PORT = 8081
H2_BACKEND = {  # an Envoy inside the server pod that answers with the protocol it was spoken to in
    "static_resources": {"listeners": [{
        "name": "h2", "address": {"socket_address": {"address": SERVER_IP, "port_value": H2_PORT}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "h2", "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                "match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                "response_headers_to_add": [{"header": {"key": "x-backend-protocol", "value": "%PROTOCOL%"}}]}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}]},
}


def test_http2_reaches_the_application_as_http2(rig: Rig, tmp_path: Path) -> None:
    """h2c (gRPC's transport) from a client outside the mesh stays HTTP/2 through the inbound side."""
    rig.c.apply(service("h2", port=H2_PORT, app="web"))
    rig.c.wait_config(lambda: f"inbound|http|{H2_PORT}" in rig.server.listener_config("inbound"),
                      message="no HTTP chain for the h2 port")
    config = tmp_path / "h2.json"
    config.write_text(json.dumps(H2_BACKEND))
    os.chmod(tmp_path, 0o755)
    os.chmod(config, 0o644)
    envoy = subprocess.Popen(rig.server.ns.exec_args(world_executable(find_envoy()), "-c", str(config), "--disable-hot-restart",
                                                     "--concurrency", "1", "-l", "warning"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # As uid 1337 the client pod's own capture lets the connection go straight to the server pod.
        def get() -> str:
            proc = rig.c.pod.ns.run("setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", "curl", "-sS", "-m", "5",
                                    "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-",
                                    f"http://{SERVER_IP}:{H2_PORT}/", check=False)
            return proc.stdout if proc.returncode == 0 and proc.stdout.lower().startswith("http/2 200") else ""

        headers = rig.c.wait_config(get, message="no answer from the h2 backend through the inbound side").lower()
        assert "x-backend-protocol: http/2" in headers, headers
        assert rig.server.stat("http.inbound_http.downstream_cx_http2_total") >= 1
    finally:
        os.killpg(envoy.pid, signal.SIGKILL)
        envoy.wait(5)


def test_tracing_reports_both_sides_of_a_call(traced: Rig) -> None:
    rig = traced
    rig.c.label("service", "web", {tracing.ENABLED: "true"})
    rig.c.wait_config(lambda: "envoy.tracers.zipkin" in rig.c.pod.listener_config("outbound"),
                      message="no tracing on the client sidecar")
    seen = rig.get(3)
    spans = rig.c.wait_config(lambda: len(rig.zipkin.spans()) == 6 and rig.zipkin.spans(), 10,
                              message=f"expected a client and a server span per request, have {rig.zipkin.spans()}")
    by_trace: dict[str, dict[str, dict[str, Any]]] = {}
    for span in spans:
        by_trace.setdefault(span["traceId"], {})[span["kind"]] = span
    assert set(by_trace) == {r["headers"]["x-b3-traceid"] for r in seen}
    for trace in by_trace.values():
        client, server = trace["CLIENT"], trace["SERVER"]
        assert client["localEndpoint"]["serviceName"] == "client.default"
        assert server["localEndpoint"]["serviceName"] == "web-1.default"
        assert server["id"] == client["id"]  # Zipkin's shared span: one RPC, two sides
    assert sorted(rig.zipkin.store.services()) == ["client.default", "web-1.default"]


def test_unsampled_calls_produce_no_server_span(traced: Rig) -> None:
    rig = traced
    rig.c.label("service", "web", {tracing.ENABLED: "true", tracing.SAMPLING: "0"})
    # Applied when the client sidecar starts marking requests unsampled (0 is omitted from config dumps).
    rig.c.wait_config(lambda: rig.get(1)[0]["headers"].get("x-b3-sampled") == "0", message="sampling 0 not applied")
    before = rig.inbound_http_requests()
    seen = rig.get(5)
    unsampled = {r["headers"]["x-b3-traceid"] for r in seen}
    assert all(r["headers"].get("x-b3-sampled") == "0" for r in seen) and len(unsampled) == 5, seen
    assert rig.inbound_http_requests() == before + 5
    # Barrier: a sampled request afterwards. Each sidecar sends its spans in order (one per flush), so
    # once both spans of this trace are in, a span of the five unsampled calls would be in too.
    rig.c.label("service", "web", {tracing.SAMPLING: "100"})
    barrier = rig.c.wait_config(lambda: [r for r in rig.get(1) if r["headers"].get("x-b3-sampled") == "1"],
                                message="sampling 100 not applied")[0]["headers"]["x-b3-traceid"]
    spans = rig.c.wait_config(lambda: {s["kind"]: s for s in rig.zipkin.spans() if s["traceId"] == barrier}.keys()
                              == {"CLIENT", "SERVER"} and rig.zipkin.spans(), 10, message="no spans for the sampled call")
    assert not [s for s in spans if s["traceId"] in unsampled], "an unsampled call was traced"
