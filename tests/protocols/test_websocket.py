"""WebSocket (HTTP/1.1 Upgrade) through a real sidecar Envoy: every connection manager the core builds
allows the upgrade, the upgraded connection outlives the route timeout, Envoy counts it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from tests.protocols.serving import serving
from trafficmgr.testing.kit import SidecarMesh

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: chat, labels: {traffic.port.9080: http, traffic.request.timeout: "1000"}}
spec: {selector: {app: chat}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: chat-1, labels: {app: chat}}
spec: {containers: [{name: app, image: chat}]}
"""


def _echo(ws: ServerConnection) -> None:
    ws.send("hello from chat-1")
    for message in ws:
        ws.send(message)


@pytest.fixture
def mesh(trafficmgr_envoy: Callable[..., SidecarMesh]) -> Iterator[SidecarMesh]:
    """The kit's sidecar with the chat pod served by a WebSocket echo server instead of its HTTP backend."""
    m = trafficmgr_envoy(MANIFESTS, plugins=["circuit_breaker"])
    host, port = m.take_over("chat-1")
    with serving(serve(_echo, host, port)):
        yield m


def test_websocket_upgrade_through_the_sidecar_outlives_the_route_timeout(mesh: SidecarMesh) -> None:
    ip, port = mesh.address("chat")
    before = mesh.stats().get("http.outbound_9080.downstream_cx_upgrades_total", 0)
    with connect(f"ws://{ip}:{port}/room", open_timeout=5) as ws:
        assert ws.recv(timeout=5) == "hello from chat-1"
        ws.send("one")
        assert ws.recv(timeout=5) == "one"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
        # The route timeout (traffic.request.timeout=1000) bounds a request, not an upgraded connection.
        time.sleep(2.5)
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"
    assert mesh.stats()["http.outbound_9080.downstream_cx_upgrades_total"] == before + 1


def test_a_plain_request_on_the_websocket_port_reaches_the_pod(mesh: SidecarMesh) -> None:
    """Upgrades enabled, plain HTTP is routed as before: the echo server answers a non-upgrade GET itself
    (426, from the websockets library, not Envoy)."""
    response = mesh.get("chat", "/")
    assert response.status == 426, response
