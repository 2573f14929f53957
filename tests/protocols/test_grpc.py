"""gRPC through a real sidecar Envoy: a ``grpc`` port is balanced per call (one channel reaches every pod),
weights apply per call, and a port labeled ``grpc`` whose pods speak HTTP/1.1 only fails fast with an error
instead of hanging. (Server streams outlive the route timeout: ``test_long_streams.py``.)"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from trafficmgr.testing.kit import SidecarMesh

UNARY = "/trafficmgr.test.Echo/Echo"
STREAM = "/trafficmgr.test.Echo/Stream"


def manifests(protocol_label: str = "traffic.port.9090: grpc", extra: str = "", weights: tuple[int, int] = (100, 100)) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: echo, labels: {{{protocol_label}{extra}}}}}
spec: {{selector: {{app: echo}}, ports: [{{name: grpc, port: 9090}}]}}
""" + "".join(f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-{i}, labels: {{app: echo, traffic.endpoint.weight: "{w}"}}}}
spec: {{containers: [{{name: app, image: echo}}]}}
""" for i, w in enumerate(weights, 1))


def _server(pod: str, host: str, port: int) -> grpc.Server:
    """A gRPC echo server (raw bytes) that names its pod in the ``x-pod`` initial metadata."""

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.send_initial_metadata((("x-pod", pod),))
        return request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """``request`` is ``<count>``: that many messages, one every 0.8 s."""
        context.send_initial_metadata((("x-pod", pod),))
        for i in range(int(request)):
            time.sleep(0.8)
            yield str(i).encode()

    handler = grpc.method_handlers_generic_handler("trafficmgr.test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=(handler,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server


def _mesh(make: Callable[..., SidecarMesh], text: str, plugins: list[str]) -> tuple[SidecarMesh, list[grpc.Server]]:
    """The kit's sidecar with each echo pod served by a gRPC server instead of its HTTP backend."""
    mesh = make(text, plugins=plugins)
    servers = []
    for name in sorted(mesh.backends):
        servers.append(_server(name, *mesh.take_over(name)))
    return mesh, servers


@pytest.fixture
def servers() -> Iterator[list[grpc.Server]]:
    made: list[grpc.Server] = []
    yield made
    for s in made:
        s.stop(0)


def _pod_of(call: Any) -> str:
    return dict(call.initial_metadata())["x-pod"]


def test_grpc_calls_of_one_channel_are_balanced_per_call(trafficmgr_envoy: Callable[..., SidecarMesh],
                                                         servers: list[grpc.Server]) -> None:
    mesh, made = _mesh(trafficmgr_envoy, manifests(), ["lb"])
    servers.extend(made)
    ip, port = mesh.address("echo")
    with grpc.insecure_channel(f"{ip}:{port}") as channel:
        echo = channel.unary_unary(UNARY)
        seen: Counter[str] = Counter()
        for i in range(40):
            reply, call = echo.with_call(b"ping%d" % i, timeout=5)
            assert reply == b"ping%d" % i
            seen[_pod_of(call)] += 1
    # Round robin per call over one HTTP/2 connection: both pods (with tcp, one connection = one pod).
    assert set(seen) == {"echo-1", "echo-2"} and min(seen.values()) >= 10, seen
    assert mesh.stats()["cluster.9090|default|echo.outbound.upstream_cx_http2_total"] >= 1


def test_grpc_weights_apply_per_call(trafficmgr_envoy: Callable[..., SidecarMesh], servers: list[grpc.Server]) -> None:
    mesh, made = _mesh(trafficmgr_envoy, manifests(weights=(100, 0)), ["lb"])
    servers.extend(made)
    ip, port = mesh.address("echo")
    with grpc.insecure_channel(f"{ip}:{port}") as channel:
        echo = channel.unary_unary(UNARY)
        pods = {_pod_of(echo.with_call(b"x", timeout=5)[1]) for _ in range(20)}
    assert pods == {"echo-1"}


def test_a_grpc_label_on_http1_pods_fails_fast(trafficmgr_envoy: Callable[..., SidecarMesh]) -> None:
    """The kit's HTTP/1.1 backends behind a port labeled grpc: a call fails with UNAVAILABLE (Envoy's 503
    after the HTTP/2 connection is refused), quickly, and plain HTTP to another service is unaffected."""
    text = manifests() + """
---
apiVersion: v1
kind: Service
metadata: {name: web, labels: {traffic.port.8080: http}}
spec: {selector: {app: web}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {containers: [{name: app, image: web}]}
"""
    mesh = trafficmgr_envoy(text, plugins=["lb"])
    ip, port = mesh.address("echo")
    start = time.monotonic()
    with grpc.insecure_channel(f"{ip}:{port}") as channel:
        with pytest.raises(grpc.RpcError) as exc:
            channel.unary_unary(UNARY)(b"x", timeout=10)
    assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), exc.value
    assert time.monotonic() - start < 5
    assert mesh.get("web", "/").status == 200
