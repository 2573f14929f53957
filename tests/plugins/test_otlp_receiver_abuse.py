"""The built-in collector's OTLP/gRPC receiver (``trafficmgr zipkin --otlp-port``) under abuse.

- Its message cap is 16 MiB (``DEFAULT_MAX_MESSAGE_BYTES``), not gRPC's default of 4 MiB: a valid export
  of exactly the cap is stored, one byte more is refused with RESOURCE_EXHAUSTED before any parsing, and
  the receiver keeps serving.
- Junk gets a clean gRPC error or a closed connection, never a crash: a wrong method or service
  (UNIMPLEMENTED), a streaming call to the unary Export, raw bytes that are not HTTP/2, an HTTP/1.1
  request, an HTTP/2 preface followed by garbage frames.
- From another network namespace (a peer pod, linked by a veth pair the test makes): with the default
  ``--host`` (127.0.0.1) the receiver is not reachable at all (the code says "loopback unless told
  otherwise"); bound to the pod's address it is, and the same abuse from there leaves it serving. grpcio
  serves and calls from its own threads, so the collector and every client run as processes inside
  their namespace (``ip netns exec``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from trafficmgr.apps.otlp import DEFAULT_MAX_MESSAGE_BYTES, EXPORT, GROUPS_FIELD, SERVICE
from trafficmgr.apps.zipkin import ZipkinCollector
from trafficmgr.testing.netns import NetNS
from trafficmgr.testing.netns import require as require_netns

NO_PROXY = [("grpc.enable_http_proxy", 0)]


def export_request(pad: int = 0, span_id: bytes = b"\x02" * 8) -> bytes:
    """A valid ExportTraceServiceRequest with one span whose tag ``pad`` holds ``pad`` bytes."""
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "abuse"
    now = time.time_ns()
    span = trace_pb2.Span(trace_id=b"\x01" * 16, span_id=span_id, name="GET /x", start_time_unix_nano=now - 1000,
                          end_time_unix_nano=now, kind=trace_pb2.Span.SPAN_KIND_SERVER)
    if pad:
        span.attributes.add(key="pad").value.string_value = "p" * pad
    getattr(rs, GROUPS_FIELD).add().spans.append(span)
    return req.SerializeToString()


def export_of_size(size: int) -> bytes:
    """A valid export request of exactly ``size`` bytes (the pad's length adjusted to its varints)."""
    pad = size - len(export_request())
    for _ in range(10):
        body = export_request(pad)
        if len(body) == size:
            return body
        pad += size - len(body)
    raise AssertionError(f"no export request of exactly {size} bytes")


def call(address: str, body: bytes, method: str = EXPORT) -> grpc.RpcError | None:
    with grpc.insecure_channel(address, options=[*NO_PROXY, ("grpc.max_send_message_length", -1)]) as channel:
        try:
            channel.unary_unary(method)(body, timeout=20)
        except grpc.RpcError as exc:
            return exc
    return None


@pytest.fixture
def collector() -> Iterator[ZipkinCollector]:
    with ZipkinCollector("127.0.0.1", 0, otlp_port=0) as z:
        yield z


def _address(z: ZipkinCollector) -> str:
    assert z.otlp is not None
    return z.otlp.address


def test_the_cap_is_16_mib_exactly_and_the_receiver_keeps_serving(collector: ZipkinCollector) -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 16 * 1024 * 1024  # what README and the module docstring say
    at_cap = export_of_size(DEFAULT_MAX_MESSAGE_BYTES)
    assert call(_address(collector), at_cap) is None, "a valid export of exactly 16 MiB must be accepted"
    stored = collector.spans()
    assert len(stored) == 1 and len(stored[0]["tags"]["pad"]) > 16 * 1024 * 1024 - 200
    collector.clear()
    over = export_of_size(DEFAULT_MAX_MESSAGE_BYTES + 1)
    error = call(_address(collector), over)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert collector.spans() == []
    assert call(_address(collector), export_request(span_id=b"\x03" * 8)) is None, "the receiver keeps serving"
    assert [s["id"] for s in collector.spans()] == ["03" * 8]


def _raw(port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a plain TCP connection; what the server answered before closing (or 2 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.settimeout(2)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return got


def test_junk_gets_clean_errors_and_no_crash(collector: ZipkinCollector) -> None:
    address = _address(collector)
    for method in (f"/{SERVICE}/Nope", "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", "/x"):
        error = call(address, export_request(), method)
        assert error is not None and error.code() == grpc.StatusCode.UNIMPLEMENTED, (method, error)
    # A client stream to the unary Export: gRPC's unary handler reads the first message only (a second
    # one is never parsed nor stored); no message at all is an error.
    with grpc.insecure_channel(address, options=NO_PROXY) as channel:
        channel.stream_unary(EXPORT)(iter([export_request(), export_request(span_id=b"\x05" * 8)]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            channel.stream_unary(EXPORT)(iter([]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value
    assert [s["id"] for s in collector.spans()] == ["02" * 8]
    collector.clear()
    # Not HTTP/2 at all, HTTP/1.1, and the HTTP/2 preface followed by garbage frames.
    assert collector.otlp is not None
    port = collector.otlp.port
    for payload in (os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\xff\x00\x00\x00\x00\x00" + os.urandom(2048)):
        answer = _raw(port, payload)
        assert b"Traceback" not in answer
    assert collector.spans() == []
    assert call(address, export_request()) is None, "the receiver keeps serving"
    assert len(collector.spans()) == 1


# -- from another network namespace ------------------------------------------------------------------

POD_IP, PEER_IP = "10.244.77.10", "10.244.77.20"  # inside the namespaces this test makes
ZIPKIN_PORT, OTLP_PORT = 9411, 4317

CLIENT = r"""
import json, sys
import grpc
address, method, kind = sys.argv[1:4]
sys.path.insert(0, sys.argv[4])
from test_otlp_receiver_abuse import export_of_size, export_request
body = {"valid": export_request, "junk": lambda: b"\xff\xff\xff",
        "over": lambda: export_of_size(16 * 1024 * 1024 + 1)}[kind]()
with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", -1)]) as ch:
    try:
        ch.unary_unary(method)(body, timeout=10, wait_for_ready=False)
        print(json.dumps({"code": "OK"}))
    except grpc.RpcError as exc:
        print(json.dumps({"code": exc.code().name, "details": exc.details()}))
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def client_in(ns: NetNS, address: str, kind: str = "valid", method: str = EXPORT) -> dict[str, Any]:
    """An export from a separate process inside ``ns``: ``{"code": "OK" | <gRPC status name>, ...}``."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(ns.exec_args(sys.executable, "-c", CLIENT, address, method, kind, here),
                          capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def pods() -> Iterator[tuple[NetNS, NetNS]]:
    """The collector's pod (``POD_IP``) and a peer pod (``PEER_IP``), linked by a veth pair and nothing else."""
    require_netns()
    pod, peer = NetNS("tm-otlp"), NetNS("tm-peer")
    try:
        pod.link(peer, [POD_IP], [PEER_IP])
        yield pod, peer
    finally:
        pod.delete()
        peer.delete()


def _collector(ns: NetNS, *host: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(ns.exec_args(sys.executable, "-m", "trafficmgr.apps.zipkin", *host, "--port",
                                         str(ZIPKIN_PORT), "--otlp-port", str(OTLP_PORT)),
                            stderr=subprocess.PIPE, text=True, env=_env())
    banner = proc.stderr.readline() if proc.stderr else ""
    assert "OTLP/gRPC on" in banner, banner
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.poll() is None, "the collector died"
    proc.terminate()
    assert proc.wait(10) == 0


def _traces(ns: NetNS, host: str) -> int:
    out = ns.run("curl", "-sS", "--noproxy", "*", "--fail", "-m", "5", f"http://{host}:{ZIPKIN_PORT}/api/v2/traces?limit=1000")
    return sum(len(t) for t in json.loads(out.stdout))


def test_default_bind_is_loopback_and_not_reachable_from_another_netns(pods: tuple[NetNS, NetNS]) -> None:
    pod, peer = pods
    proc = _collector(pod)  # no --host: 127.0.0.1
    try:
        # The peer reaches the pod's address (a refused connection, not a timeout: nothing listens there) ...
        answer = client_in(peer, f"{POD_IP}:{OTLP_PORT}")
        assert answer["code"] == "UNAVAILABLE", answer
        assert "refused" in answer.get("details", "").lower() or "connect" in answer.get("details", "").lower(), answer
        # ... while inside the pod, on loopback, the receiver answers.
        assert client_in(pod, f"127.0.0.1:{OTLP_PORT}") == {"code": "OK"}
        assert client_in(pod, f"{POD_IP}:{OTLP_PORT}")["code"] == "UNAVAILABLE"  # loopback only, not the pod IP
        assert _traces(pod, "127.0.0.1") == 1
    finally:
        _stop(proc)


def test_bound_to_the_pod_ip_a_peer_reaches_it_and_its_abuse_is_refused(pods: tuple[NetNS, NetNS]) -> None:
    pod, peer = pods
    proc = _collector(pod, "--host", POD_IP)
    try:
        target = f"{POD_IP}:{OTLP_PORT}"
        assert client_in(peer, target) == {"code": "OK"}
        assert client_in(peer, target, "over")["code"] == "RESOURCE_EXHAUSTED"
        assert client_in(peer, target, "junk")["code"] == "INVALID_ARGUMENT"
        assert client_in(peer, target, method=f"/{SERVICE}/Nope")["code"] == "UNIMPLEMENTED"
        raw = peer.run(sys.executable, "-c", f"import os, socket; s = socket.create_connection(({POD_IP!r}, {OTLP_PORT}), 5); "
                       "s.sendall(os.urandom(65536)); s.close()")
        assert raw.returncode == 0, raw.stderr
        assert client_in(peer, target) == {"code": "OK"}, "the receiver keeps serving"
        assert _traces(pod, POD_IP) == 2  # the two valid exports (each the same one span), nothing else
        assert client_in(pod, f"127.0.0.1:{OTLP_PORT}")["code"] == "UNAVAILABLE"  # only the address it was given
    finally:
        _stop(proc)
