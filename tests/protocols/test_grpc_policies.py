"""gRPC semantics of the fault and circuit_breaker labels, through a real sidecar Envoy:

- ``traffic.fault.abort.grpc-status`` aborts calls to a grpc port with that gRPC status (over the HTTP
  status, which still aborts the Service's HTTP port), and removing the labels restores the calls;
- ``traffic.retries.grpc`` retries CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and UNAVAILABLE (and
  nothing else), up to the largest retry count of the Service's retry labels;
- ``traffic.request.timeout`` on a grpc port ends a stream at that time and caps the client's own deadline
  (``grpc-timeout``) that Envoy forwards upstream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from trafficmgr.apps.grpc_echo import ECHO_METHOD, STREAM_METHOD, GrpcEchoServer
from trafficmgr.testing.kit import SidecarMesh

CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
CLUSTER = "cluster.9090|default|echo.outbound"


def manifests(labels: str = "", http_port: bool = False) -> str:
    """Service echo (grpc port 9090; with ``http_port`` also an http port 9180) and one pod, echo-1.

    The kit serves a pod's ports in order, so ``mesh.backends["echo-1"]`` is the 9090 one.
    """
    ports = "[{name: grpc, port: 9090}" + (", {name: http, port: 9180}]" if http_port else "]")
    port_labels = "traffic.port.9090: grpc" + (", traffic.port.9180: http" if http_port else "")
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: echo, labels: {{{port_labels}{labels}}}}}
spec: {{selector: {{app: echo}}, ports: {ports}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-1, labels: {{app: echo}}}}
spec: {{containers: [{{name: app, image: echo}}]}}
"""


@pytest.fixture
def stoppers() -> Iterator[list[Callable[[], Any]]]:
    made: list[Callable[[], Any]] = []
    yield made
    for stop in made:
        stop()


def _replace_backend(mesh: SidecarMesh, start: Callable[[str, int], Callable[[], Any]]) -> Callable[[], Any]:
    """Stop the kit's HTTP backend of echo-1 on 9090 and start a gRPC server on its address instead."""
    host, port = mesh.take_over("echo-1")
    assert port == 9090, port
    return start(host, port)


def _echo_server(mesh: SidecarMesh) -> Callable[[], Any]:
    def start(host: str, port: int) -> Callable[[], Any]:
        server = GrpcEchoServer(host, port, pod_name="echo-1").start()
        return lambda: server.stop(0)

    return _replace_backend(mesh, start)


def _channel(mesh: SidecarMesh) -> grpc.Channel:
    ip, port = mesh.address("echo", 9090)
    return grpc.insecure_channel(f"{ip}:{port}", options=CHANNEL_OPTIONS)


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status of one call (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _aborts(mesh: SidecarMesh) -> int:
    return sum(v for k, v in mesh.stats().items() if k.endswith(".fault.aborts_injected"))


# -- fault: traffic.fault.abort.grpc-status -----------------------------------------------------------------


def test_abort_grpc_status_on_the_grpc_port_http_status_on_the_http_port(trafficmgr_envoy: Callable[..., SidecarMesh],
                                                                        stoppers: list[Callable[[], Any]]) -> None:
    """One Service with a grpc and an http port, the same fault labels: gRPC calls get the grpc-status
    (not the HTTP status mapped to gRPC), HTTP requests the HTTP status; without the labels both work."""
    mesh = trafficmgr_envoy(manifests(http_port=True), plugins=["fault"])
    stoppers.append(_echo_server(mesh))
    with _channel(mesh) as channel:
        echo = channel.unary_unary(ECHO_METHOD)

        def call() -> None:
            assert echo(b"ping", timeout=5) == b"ping"

        assert _code(call) == grpc.StatusCode.OK
        assert mesh.request("GET", "echo", port=9180).status == 200

        mesh.label("service", "echo", {"traffic.fault.abort.percentage": "100", "traffic.fault.abort.grpc-status": "14"})
        assert _code(call) == grpc.StatusCode.UNAVAILABLE
        assert mesh.request("GET", "echo", port=9180).status == 503, "grpc-status is ignored on the http port"
        # The HTTP status 418 alone would reach a gRPC client as UNKNOWN (Envoy's mapping, below): the
        # grpc-status wins on the grpc port; the http port answers 418.
        mesh.label("service", "echo", {"traffic.fault.abort.status": "418"})
        assert _code(call) == grpc.StatusCode.UNAVAILABLE
        assert mesh.request("GET", "echo", port=9180).status == 418
        mesh.label("service", "echo", {"traffic.fault.abort.grpc-status": "7"})
        assert _code(call) == grpc.StatusCode.PERMISSION_DENIED
        mesh.label("service", "echo", {"traffic.fault.abort.grpc-status": None})
        assert _code(call) == grpc.StatusCode.UNKNOWN, "without grpc-status Envoy maps the HTTP status (418)"
        assert _aborts(mesh) == 6  # 4 gRPC calls and 2 HTTP requests
        assert mesh.stats()[f"{CLUSTER}.upstream_rq_total"] == 1, "an aborted call never reaches the pod"

        mesh.label("service", "echo", {"traffic.fault.abort.percentage": None, "traffic.fault.abort.status": None})
        assert _code(call) == grpc.StatusCode.OK
        assert mesh.request("GET", "echo", port=9180).status == 200
    assert mesh.build is not None and mesh.build.warnings == []


# -- circuit_breaker: traffic.retries.grpc ---------------------------------------------------------------------


REMAINING_METHOD = "/trafficmgr.echo.Echo/Remaining"
SLOW_METHOD = "/trafficmgr.echo.Echo/Slow"


class FlakyEcho(grpc.GenericRpcHandler):
    """``/trafficmgr.echo.Echo/Echo`` that fails the next calls it is told to (``fail_next``), then echoes.

    A failure is "trailers-only" (no response metadata before the status), the way a gRPC server rejects
    a call at once, unless ``after_metadata``: then it sends metadata first, as trafficmgr grpc-echo does.
    ``/trafficmgr.echo.Echo/Remaining`` answers the seconds left of the call's deadline as the server sees
    it (from the ``grpc-timeout`` it received; ``none`` without one); ``/trafficmgr.echo.Echo/Slow`` answers
    after the request's number of seconds.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._failures: list[tuple[grpc.StatusCode, bool]] = []
        self._lock = threading.Lock()

    def fail_next(self, code: grpc.StatusCode, times: int = 1, after_metadata: bool = False) -> None:
        with self._lock:
            self._failures = [(code, after_metadata)] * times

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        if handler_call_details.method == ECHO_METHOD:
            return grpc.unary_unary_rpc_method_handler(self.echo)
        if handler_call_details.method == REMAINING_METHOD:
            return grpc.unary_unary_rpc_method_handler(self.remaining)
        if handler_call_details.method == SLOW_METHOD:
            return grpc.unary_unary_rpc_method_handler(self.slow)
        return None

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(float(request))
        return request

    def remaining(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        left = context.time_remaining()  # grpcio: None or ~9e18 without a deadline
        return b"none" if left is None or left > 1e9 else f"{left:.3f}".encode()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            code, after_metadata = failure
            if after_metadata:
                context.send_initial_metadata((("x-pod", "echo-1"),))
            context.abort(code, "flaky")
        return request


def _flaky_server(mesh: SidecarMesh) -> tuple[FlakyEcho, Callable[[], Any]]:
    handler = FlakyEcho()

    def start(host: str, port: int) -> Callable[[], Any]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=(handler,))
        server.add_insecure_port(f"{host}:{port}")
        server.start()
        return lambda: server.stop(0)

    return handler, _replace_backend(mesh, start)


RETRIED = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.UNAVAILABLE)


def test_retries_grpc_retries_the_grpc_conditions(trafficmgr_envoy: Callable[..., SidecarMesh],
                                                  stoppers: list[Callable[[], Any]]) -> None:
    mesh = trafficmgr_envoy(manifests(), plugins=["circuit_breaker"])
    flaky, stop = _flaky_server(mesh)
    stoppers.append(stop)

    def retries() -> int:
        return mesh.stats()[f"{CLUSTER}.upstream_rq_retry"]

    with _channel(mesh) as channel:
        echo = channel.unary_unary(ECHO_METHOD)

        def call() -> None:
            assert echo(b"ping", timeout=10) == b"ping"

        # Without the label a failure reaches the client.
        flaky.fail_next(grpc.StatusCode.UNAVAILABLE)
        assert _code(call) == grpc.StatusCode.UNAVAILABLE
        assert retries() == 0

        mesh.label("service", "echo", {"traffic.retries.grpc": "2"})
        for code in RETRIED:  # each condition: one failure, retried, the call succeeds
            before = flaky.calls
            flaky.fail_next(code)
            assert _code(call) == grpc.StatusCode.OK, code
            assert flaky.calls == before + 2, code
        assert retries() == len(RETRIED)
        flaky.fail_next(grpc.StatusCode.UNAVAILABLE, 2)  # two retries allowed
        assert _code(call) == grpc.StatusCode.OK
        flaky.fail_next(grpc.StatusCode.UNAVAILABLE, 3)  # the third failure is passed on
        assert _code(call) == grpc.StatusCode.UNAVAILABLE
        assert retries() == len(RETRIED) + 4
        assert mesh.stats()[f"{CLUSTER}.upstream_rq_retry_limit_exceeded"] == 1
        # Other statuses are not retried, nor a failure after response metadata (Envoy has passed the
        # response headers on by then).
        flaky.fail_next(grpc.StatusCode.INTERNAL)
        assert _code(call) == grpc.StatusCode.INTERNAL
        flaky.fail_next(grpc.StatusCode.UNAVAILABLE, after_metadata=True)
        assert _code(call) == grpc.StatusCode.UNAVAILABLE
        assert retries() == len(RETRIED) + 4

        # Combined with another retry label: one policy, num_retries the largest (5xx: 3 > grpc: 1).
        mesh.label("service", "echo", {"traffic.retries.grpc": "1", "traffic.retries.5xx": "3"})
        flaky.fail_next(grpc.StatusCode.RESOURCE_EXHAUSTED, 3)
        assert _code(call) == grpc.StatusCode.OK
        # 5xx alone does not retry a gRPC status (an HTTP 200 response): the grpc label did.
        mesh.label("service", "echo", {"traffic.retries.grpc": None})
        flaky.fail_next(grpc.StatusCode.UNAVAILABLE)
        assert _code(call) == grpc.StatusCode.UNAVAILABLE
    assert retries() == len(RETRIED) + 7


# -- circuit_breaker: traffic.request.timeout on a grpc port --------------------------------------------------


def _stream(channel: grpc.Channel, deadline: float | None = None) -> tuple[grpc.StatusCode, int, float]:
    """A server stream of 6 messages 300 ms apart (1.5 s): (status, messages received, seconds)."""
    stream = channel.unary_stream(STREAM_METHOD)
    received = 0
    start = time.monotonic()
    try:
        for _ in stream(b"m", metadata=(("x-count", "6"), ("x-interval-ms", "300")), timeout=deadline):
            received += 1
    except grpc.RpcError as exc:
        return exc.code(), received, time.monotonic() - start
    return grpc.StatusCode.OK, received, time.monotonic() - start


def test_request_timeout_ends_grpc_streams_and_caps_the_client_deadline(
        trafficmgr_envoy: Callable[..., SidecarMesh], stoppers: list[Callable[[], Any]]) -> None:
    """The core leaves grpc routes without a timeout; the label bounds every stream (Envoy ignores the
    route ``timeout`` on such routes, so the plugin sets ``max_stream_duration`` too), also one whose
    client asked for a longer deadline."""
    mesh = trafficmgr_envoy(manifests(), plugins=["circuit_breaker"])
    stoppers.append(_echo_server(mesh))
    with _channel(mesh) as channel:
        assert _stream(channel)[:2] == (grpc.StatusCode.OK, 6)
        mesh.label("service", "echo", {"traffic.request.timeout": "500"})
        for deadline in (None, 10.0):
            code, received, seconds = _stream(channel, deadline)
            # Envoy resets the stream at 500 ms (its response has started): the client sees INTERNAL
            # (RST_STREAM); messages were sent at 0 and 300 ms (a loaded machine may deliver one more
            # before the reset lands, never all 6, which take 1.5 s).
            assert code != grpc.StatusCode.OK and 2 <= received < 6, (deadline, code, received)
            assert 0.45 <= seconds < 1.45, (deadline, seconds)
        # A client deadline shorter than the label still applies.
        code, received, seconds = _stream(channel, 0.2)
        assert code != grpc.StatusCode.OK and received == 1 and seconds < 1.0, (code, received, seconds)
        mesh.label("service", "echo", {"traffic.request.timeout": None})
        assert _stream(channel, 10.0)[:2] == (grpc.StatusCode.OK, 6)


def test_request_timeout_caps_the_grpc_timeout_and_ends_unanswered_calls(trafficmgr_envoy: Callable[..., SidecarMesh],
                                                                   stoppers: list[Callable[[], Any]]) -> None:
    """Envoy forwards the deadline it enforces: the client's 10 s, or with the label at most 500 ms (also
    for a client without a deadline); a shorter client deadline passes unchanged. A call the server has
    not answered by then ends with DEADLINE_EXCEEDED."""
    mesh = trafficmgr_envoy(manifests(), plugins=["circuit_breaker"])
    stoppers.append(_flaky_server(mesh)[1])
    with _channel(mesh) as channel:
        remaining = channel.unary_unary(REMAINING_METHOD)

        def seen(deadline: float | None) -> float | None:
            answer = remaining(b"", timeout=deadline)
            return None if answer == b"none" else float(answer)

        assert seen(None) is None
        # grpcio rounds a deadline up when it encodes grpc-timeout (10 s arrives as 10.1): allow 2 % + 10 ms.
        assert 9 < (seen(10.0) or 0) <= 10.21
        mesh.label("service", "echo", {"traffic.request.timeout": "500"})
        assert 0.3 < (seen(None) or 0) <= 0.52
        assert 0.3 < (seen(10.0) or 0) <= 0.52
        assert 0.1 < (seen(0.25) or 0) <= 0.265
        slow = channel.unary_unary(SLOW_METHOD)
        start = time.monotonic()
        assert _code(lambda: slow(b"1.5", timeout=10)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.45 <= time.monotonic() - start < 1.45  # cut before the server's answer at 1.5 s
        mesh.label("service", "echo", {"traffic.request.timeout": None})
        assert slow(b"0.8", timeout=10) == b"0.8"


def test_extreme_and_bad_values_reach_envoy_as_a_config_it_accepts(trafficmgr_envoy: Callable[..., SidecarMesh],
                                                                    stoppers: list[Callable[[], Any]]) -> None:
    """Every ``mesh.label`` waits for Envoy's ACK (a NACK fails the test): the largest values are clamped,
    bad ones are reported and left out (their defaults apply: calls go through untouched)."""
    mesh = trafficmgr_envoy(manifests(), plugins=["circuit_breaker", "fault"])
    stoppers.append(_echo_server(mesh))
    huge = "99999999999999999999"
    mesh.label("service", "echo", {"traffic.request.timeout": huge, "traffic.retries.grpc": huge,
                                   "traffic.fault.abort.grpc-status": "16", "traffic.fault.abort.percentage": "0.0001"})
    mesh.label("service", "echo", {"traffic.fault.abort.grpc-status": "0"})
    bad = {"traffic.fault.abort.grpc-status": "17", "traffic.retries.grpc": "-1"}
    mesh.label("service", "echo", {**bad, "traffic.request.timeout": None, "traffic.fault.abort.percentage": "100"})
    assert mesh.build is not None
    assert sorted(w.split(" invalid label ")[1].split("=")[0] for w in mesh.build.warnings) == sorted(bad)
    assert all(w.startswith("InvalidTrafficLabel Service/default/echo: ") for w in mesh.build.warnings)
    with _channel(mesh) as channel:
        # The abort stays, with the default HTTP 503, which reaches a gRPC client as UNAVAILABLE.
        assert _code(lambda: channel.unary_unary(ECHO_METHOD)(b"x", timeout=5)) == grpc.StatusCode.UNAVAILABLE
        mesh.label("service", "echo", {"traffic.fault.abort.percentage": None})
        assert channel.unary_unary(ECHO_METHOD)(b"x", timeout=5) == b"x"
