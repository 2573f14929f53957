"""The built-in collector's OTLP/gRPC receiver (``trafficmgr zipkin --otlp-port``) under abuse.

- Its message cap is 16 MiB (``DEFAULT_MAX_MESSAGE_BYTES``), not gRPC's default of 4 MiB: a valid export
  of exactly the cap (20 spans: a span is at most 1 MiB) is stored, one byte more is refused with
  RESOURCE_EXHAUSTED before any parsing, and the receiver keeps serving.
- A span over 1 MiB is not kept, as OTLP's partial success says: alone in its export, the call fails with
  INVALID_ARGUMENT; next to a small one, the call succeeds, the small one is stored and the response's
  ``partial_success`` (decoded here with a message class built from OTLP's own field numbers, which the
  protos xds-protos ships lack) counts one rejected span and says why.
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


def export_request(pad: int = 0, span_id: bytes = b"\x02" * 8, spans: int = 1, pads: list[int] | None = None) -> bytes:
    """A valid ExportTraceServiceRequest with ``spans`` spans (ids ``span_id``, then counting up from
    ``span_id``'s first byte); the tag ``pad`` of the first holds ``pad`` bytes, or span ``i``'s holds
    ``pads[i]``."""
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "abuse"
    now = time.time_ns()
    group = getattr(rs, GROUPS_FIELD).add()
    pads = pads if pads is not None else [pad] + [0] * (spans - 1)
    for i, size in enumerate(pads):
        sid = span_id if i == 0 else bytes([(span_id[0] + i) % 256 or 1]) * 8
        span = trace_pb2.Span(trace_id=b"\x01" * 16, span_id=sid, name="GET /x", start_time_unix_nano=now - 1000,
                              end_time_unix_nano=now, kind=trace_pb2.Span.SPAN_KIND_SERVER)
        if size:
            span.attributes.add(key="pad").value.string_value = "p" * size
        group.spans.append(span)
    return req.SerializeToString()


def export_of_size(size: int, spans: int = 1) -> bytes:
    """A valid export request of exactly ``size`` bytes in ``spans`` spans of about equal size (the last
    pad's length adjusted to the varints)."""
    base = len(export_request(spans=spans))
    each = (size - base) // spans
    pads = [each] * spans
    for _ in range(10):
        body = export_request(pads=pads)
        if len(body) == size:
            return body
        pads[-1] += size - len(body)
    raise AssertionError(f"no export request of exactly {size} bytes")


def partial_success(response: bytes) -> tuple[int, str]:
    """``(rejected_spans, error_message)`` of an encoded ExportTraceServiceResponse, read with a message class
    built here from OTLP's field numbers (opentelemetry-proto >= 0.19), independent of the receiver's encoder."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="otlp_partial_test.proto", package="otlptest", syntax="proto3")
    partial = file.message_type.add(name="ExportTracePartialSuccess")
    partial.field.add(name="rejected_spans", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    partial.field.add(name="error_message", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    resp = file.message_type.add(name="ExportTraceServiceResponse")
    resp.field.add(name="partial_success", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                   type_name=".otlptest.ExportTracePartialSuccess", label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("otlptest.ExportTraceServiceResponse"))
    msg: Any = cls.FromString(response)
    return msg.partial_success.rejected_spans, msg.partial_success.error_message


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
    at_cap = export_of_size(DEFAULT_MAX_MESSAGE_BYTES, spans=20)
    assert call(_address(collector), at_cap) is None, "a valid export of exactly 16 MiB must be accepted"
    stored = collector.spans()
    assert len(stored) == 20 and sum(len(s["tags"]["pad"]) for s in stored) > 16 * 1024 * 1024 - 2000
    collector.clear()
    over = export_of_size(DEFAULT_MAX_MESSAGE_BYTES + 1)
    error = call(_address(collector), over)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert collector.spans() == []
    assert call(_address(collector), export_request(span_id=b"\x03" * 8)) is None, "the receiver keeps serving"
    assert [s["id"] for s in collector.spans()] == ["03" * 8]


def call_response(address: str, body: bytes) -> bytes:
    with grpc.insecure_channel(address, options=[*NO_PROXY, ("grpc.max_send_message_length", -1)]) as channel:
        response: bytes = channel.unary_unary(EXPORT)(body, timeout=20)
    return response


def test_a_span_over_1_mib_is_refused_per_otlp_partial_success(collector: ZipkinCollector) -> None:
    address = _address(collector)
    assert call_response(address, export_request()) == b""  # all kept: no partial_success at all
    collector.clear()
    big = 1024 * 1024 + 1
    error = call(address, export_request(pad=big))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error  # none kept: not retried
    assert "over the limit of 1048576 per span" in (error.details() or "")
    assert collector.spans() == []
    response = call_response(address, export_request(pads=[big, 10]))  # one too large, one small
    rejected, message = partial_success(response)
    assert rejected == 1 and "over the limit of 1048576 per span" in message, message
    assert [len(s["tags"]["pad"]) for s in collector.spans()] == [10]
    # Just under the limit as protobuf, but over it as the stored JSON (more tags than pad): refused by the store.
    near = export_request(pads=[1024 * 1024 - 100, 1])
    rejected, message = partial_success(call_response(address, near))
    assert rejected == 1 and "bytes as JSON, over the limit" in message, message
    error = call(address, export_request(pad=1024 * 1024 - 100))  # alone: none kept, so a failure
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "bytes as JSON, over the limit" in (error.details() or "")
    assert collector.otlp is not None and collector.otlp.spans_refused == 2 and collector.store.refused == 2


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
