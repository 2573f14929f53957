"""Local mode's explicit proxy (no iptables) with real clients through a real Envoy: WebSocket by an
absolute-URI upgrade and through a CONNECT tunnel, gRPC through grpcio's CONNECT proxy support.

The sidecar is the kit's, with the bootstrap local mode gives every sidecar (``add_explicit_proxy``: the
pod's proxy port forwarding to the internal listener ``outbound_proxy``) and ``--explicit-proxy``."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from tests.protocols.serving import serving
from trafficmgr.apps.grpc_echo import GrpcEchoServer
from trafficmgr.core.agent.local_runtime import add_explicit_proxy
from trafficmgr.testing import envoy as envoy_mod
from trafficmgr.testing.kit import SidecarMesh

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: chat, labels: {traffic.port.9080: http}}
spec: {selector: {app: chat}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: chat-1, labels: {app: chat}}
spec: {containers: [{name: app, image: chat}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec: {selector: {app: echo}, ports: [{name: grpc, port: 9090, appProtocol: grpc}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, labels: {app: echo}}
spec: {containers: [{name: app, image: echo}]}
---
apiVersion: v1
kind: Service
metadata: {name: closed}
spec: {selector: {app: chat}, ports: [{name: other, port: 9081}]}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _echo(ws: ServerConnection) -> None:
    ws.send("hello from chat-1")
    for message in ws:
        ws.send(message)


@pytest.fixture
def proxied(trafficmgr_envoy: Callable[..., SidecarMesh], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SidecarMesh, str]]:
    """The mesh and the explicit proxy's URL; chat-1 serves WebSocket, echo-1 gRPC."""
    port = _free_port()
    original = envoy_mod.ControlPlane.bootstrap

    def bootstrap(self: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        return add_explicit_proxy(original(self, *args, **kw), "127.0.0.1", port)

    monkeypatch.setattr(envoy_mod.ControlPlane, "bootstrap", bootstrap)
    mesh = trafficmgr_envoy(MANIFESTS, options={"explicit_proxy": True})
    grpc_server = GrpcEchoServer(*mesh.take_over("echo-1"), pod_name="echo-1").start()
    try:
        with serving(serve(_echo, *mesh.take_over("chat-1"))):
            yield mesh, f"http://127.0.0.1:{port}"
    finally:
        grpc_server.stop()


def test_websocket_through_a_connect_tunnel(proxied: tuple[SidecarMesh, str]) -> None:
    mesh, proxy = proxied
    with connect("ws://chat:9080/room", proxy=proxy, open_timeout=5) as ws:
        assert ws.recv(timeout=5) == "hello from chat-1"
        ws.send("through the proxy")
        assert ws.recv(timeout=5) == "through the proxy"


def test_websocket_upgrade_by_absolute_uri(proxied: tuple[SidecarMesh, str]) -> None:
    """An HTTP proxy request (absolute URI) with Upgrade: the proxy's connection manager upgrades it."""
    mesh, proxy = proxied
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET http://chat:9080/room HTTP/1.1\r\nHost: chat:9080\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455 accept for this key, computed by the echo server


def test_grpc_through_the_proxy_by_connect(proxied: tuple[SidecarMesh, str]) -> None:
    mesh, proxy = proxied
    with grpc.insecure_channel("echo:9090", options=[("grpc.http_proxy", proxy)]) as channel:
        reply, call = channel.unary_unary("/trafficmgr.echo.Echo/Echo").with_call(b"hi", timeout=5)
    assert reply == b"hi" and dict(call.initial_metadata())["x-pod"] == "echo-1"


def test_connect_to_a_port_that_is_not_enabled_is_refused(proxied: tuple[SidecarMesh, str]) -> None:
    """A tunnel is no way around the blocked-unless-labeled rule: CONNECT to an unlabeled port gets 404."""
    mesh, proxy = proxied
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"CONNECT closed:9081 HTTP/1.1\r\nHost: closed:9081\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 404"), head
