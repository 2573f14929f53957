"""OTLP/gRPC trace receiver for the built-in collector (``trafficmgr zipkin --otlp-port``).

Serves ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` (plaintext HTTP/2, as Envoy's
``envoy.tracers.opentelemetry`` tracer sends it) and converts each span into the Zipkin v2 JSON the
collector's :class:`~trafficmgr.apps.zipkin.SpanStore` holds, so ``GET /api/v2/traces`` shows OTLP spans next
to Zipkin ones. The OTLP messages come from ``xds-protos`` (already a dependency: Envoy's API imports them).

Conversion (OTLP -> Zipkin v2): ``trace_id`` (16 bytes) -> 32 hex digits, ``span_id``/``parent_span_id``
(8 bytes) -> 16; kind SERVER/CLIENT/PRODUCER/CONSUMER kept (INTERNAL/unspecified: no kind); start/end
nanoseconds -> ``timestamp``/``duration`` microseconds; attributes -> string ``tags``; events ->
``annotations``; an ERROR status -> tag ``error``. ``localEndpoint.serviceName``: the span's ``node_id``
attribute (Envoy puts its node id on every span: the proxy, as the Zipkin tracer's service name is for
sidecars), else the resource's ``service.name``.

Bad input is answered with a gRPC error and stores nothing: a message that does not parse or a span with a
malformed id -> INVALID_ARGUMENT; a message over ``max_message_bytes`` -> RESOURCE_EXHAUSTED (gRPC's own
limit); more spans than ``max_spans_per_request`` -> RESOURCE_EXHAUSTED.

Spans too large to keep (over ``max_span_bytes`` as protobuf here, or refused by the sink, the collector's
store, for their JSON size) follow OTLP's partial success: when some spans of a request are kept, the call
succeeds and its ``ExportTraceServiceResponse.partial_success`` says how many were rejected and why (the
sender must not retry them); when none is kept, the call fails with INVALID_ARGUMENT (not retryable: the same
spans would be refused again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import attrs
import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT = f"/{SERVICE}/Export"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_SPANS_PER_REQUEST = 50_000
#: Export calls handled at once, and admitted to wait for that: the rest get RESOURCE_EXHAUSTED at once.
#: One call at its cap holds about 7 times its message in memory while it is parsed and converted (gRPC's
#: buffers, the bytes, the parsed message, the converted strings: measured 112 MB over the idle process for
#: a 16 MB export), so each worker more would cost more than the collector's whole default span store
#: (64 MiB); one worker converts the small exports proxies send (a few KB every 5 s each) far faster than
#: they come. Waiting calls hold only their HTTP/2 flow-control window (64 KiB: gRPC's window growth is
#: off, see :meth:`OtlpReceiver.start`), so 16 of them cost ~1 MB. Measured with 32 concurrent 16 MB
#: exports: 4 workers and 64 calls with window growth 727 MB peak RSS, 1 worker 397 MB, 1 worker without
#: window growth 152 MB (idle: 44 MB).
MAX_WORKERS = 1
MAX_CONCURRENT_RPCS = 16

#: ResourceSpans field 2: ``scope_spans`` (OTLP >= 0.15; what Envoy sends) is wire-identical to the
#: ``instrumentation_library_spans`` of older OTLP protos (the copy xds-protos ships): same number, same
#: layout (scope/library = 1, spans = 2, schema_url = 3). Whichever name the installed module has.
GROUPS_FIELD = ("scope_spans" if "scope_spans" in trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name
                else "instrumentation_library_spans")

_KINDS = {trace_pb2.Span.SPAN_KIND_SERVER: "SERVER", trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
          trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER", trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER"}


class OtlpBindError(OSError):
    """The OTLP port cannot be bound (taken, or not allowed)."""


class InvalidSpan(ValueError):
    """An OTLP span that cannot be stored (the Export call fails with INVALID_ARGUMENT)."""


@attrs.frozen
class PartialSuccess:
    """Spans of an accepted Export request that were not kept: OTLP's ``ExportTracePartialSuccess``."""

    rejected_spans: int
    error_message: str


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def export_response(partial: PartialSuccess | None = None) -> bytes:
    """An encoded ``ExportTraceServiceResponse``, with ``partial_success`` (field 1: ``rejected_spans`` = 1,
    ``error_message`` = 2) when ``partial`` rejects spans or says something. Encoded by hand: the OTLP
    protos xds-protos ships predate the field (OTLP 0.19); receivers of older protos skip it as unknown."""
    if partial is None or (not partial.rejected_spans and not partial.error_message):
        return b""
    inner = b""
    if partial.rejected_spans:
        inner += b"\x08" + _varint(partial.rejected_spans)
    if partial.error_message:
        message = partial.error_message.encode()
        inner += b"\x12" + _varint(len(message)) + message
    return b"\x0a" + _varint(len(inner)) + inner


def any_value(value: common_pb2.AnyValue) -> str:
    """An attribute value as the string a Zipkin tag holds."""
    which = value.WhichOneof("value")
    if which is None:
        return ""
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return "true" if value.bool_value else "false"
    if which == "bytes_value":
        return value.bytes_value.hex()
    if which == "array_value":
        return "[" + ",".join(any_value(v) for v in value.array_value.values) + "]"
    if which == "kvlist_value":
        return "{" + ",".join(f"{kv.key}={any_value(kv.value)}" for kv in value.kvlist_value.values) + "}"
    return str(getattr(value, which))


def _attributes(attrs: Sequence[common_pb2.KeyValue]) -> dict[str, str]:
    return {kv.key: any_value(kv.value) for kv in attrs}


def _id(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size or not any(raw):
        raise InvalidSpan(f"{what} must be {size} bytes and not all zero, got {len(raw)} bytes")
    return raw.hex()


def to_zipkin(span: trace_pb2.Span, resource: dict[str, str]) -> dict[str, Any]:
    """One OTLP span as a Zipkin v2 span (see the module docstring); InvalidSpan when its ids are malformed."""
    tags = _attributes(span.attributes)
    out: dict[str, Any] = {"traceId": _id(span.trace_id, 16, "trace_id"), "id": _id(span.span_id, 8, "span_id"),
                           "name": span.name}
    if span.parent_span_id:
        out["parentId"] = _id(span.parent_span_id, 8, "parent_span_id")
    if span.kind in _KINDS:
        out["kind"] = _KINDS[span.kind]
    if span.start_time_unix_nano:
        out["timestamp"] = span.start_time_unix_nano // 1000
        if span.end_time_unix_nano >= span.start_time_unix_nano:
            out["duration"] = max(1, (span.end_time_unix_nano - span.start_time_unix_nano) // 1000)
    if span.status.code == trace_pb2.Status.STATUS_CODE_ERROR:
        tags.setdefault("error", span.status.message or "true")
    service = tags.get("node_id") or resource.get("service.name") or ""
    out["localEndpoint"] = {"serviceName": service}
    if span.trace_state:
        tags["w3c.tracestate"] = span.trace_state
    if tags:
        out["tags"] = tags
    if span.events:
        out["annotations"] = [{"timestamp": e.time_unix_nano // 1000, "value": e.name} for e in span.events]
    return out


def convert(request: trace_service_pb2.ExportTraceServiceRequest, max_spans: int,
            max_span_bytes: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The spans of an Export request as Zipkin v2 spans, and one message per span left out because its
    protobuf encoding is over ``max_span_bytes`` (None: no limit; such a span is never converted, so its
    attributes never become strings); InvalidSpan / OverflowError on bad input."""
    out: list[dict[str, Any]] = []
    too_large: list[str] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        groups = list(getattr(resource_spans, GROUPS_FIELD))
        for group in groups:
            if len(out) + len(too_large) + len(group.spans) > max_spans:
                raise OverflowError(f"more than {max_spans} spans in one request")
            for span in group.spans:
                size = span.ByteSize() if max_span_bytes is not None else 0
                if max_span_bytes is not None and size > max_span_bytes:
                    too_large.append(f"span {span.span_id.hex() or '?'} is {size} bytes, over the limit of "
                                     f"{max_span_bytes} per span")
                else:
                    out.append(to_zipkin(span, resource))
    return out, too_large


class OtlpReceiver:
    """The Export service on ``host:port`` (0 = any free port); each accepted request's spans (Zipkin v2
    dicts, not yet normalized) go to ``sink``, which may raise ValueError to reject them all, or return a
    :class:`PartialSuccess` for the spans it did not keep (None: kept them all). Spans whose protobuf
    encoding is over ``max_span_bytes`` never reach the sink; they are counted in ``spans_refused``.

    Why this listener is safe to open: it binds ``host`` only (default loopback; ``trafficmgr zipkin`` gives
    its ``--host``, 127.0.0.1 unless told otherwise), so from another network namespace it is reachable
    only when bound to an address there. It has no authentication: whoever reaches it can add spans (and
    read them back through the collector's HTTP API), so bind it where only trusted exporters reach it. What
    a caller can make it do is bounded: one message of at most ``max_message_bytes`` (refused by gRPC
    before parsing), ``max_spans_per_request`` spans, one call handled at a time and 16 waiting
    (:data:`MAX_WORKERS`, :data:`MAX_CONCURRENT_RPCS`: the rest RESOURCE_EXHAUSTED), each waiting call
    holding at most its 64 KiB flow-control window; a unary call's extra messages are never read. What it
    stores is bounded by the sink (the collector's span store: a byte budget). Proven from another network
    namespace by ``tests/plugins/test_otlp_receiver_abuse.py``, and the memory bound under a flood by
    ``tests/test_zipkin_memory.py``.
    """

    def __init__(self, sink: Callable[[list[dict[str, Any]]], PartialSuccess | None], host: str = "127.0.0.1",
                 port: int = 0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_spans_per_request: int = DEFAULT_MAX_SPANS_PER_REQUEST, max_span_bytes: int | None = None) -> None:
        self.sink = sink
        self.host = host
        self._port = port
        self.max_message_bytes = max_message_bytes
        self.max_spans_per_request = max_spans_per_request
        self.max_span_bytes = max_span_bytes
        self.exports = 0
        self.spans_refused = 0  # left out for their protobuf size (the sink counts its own refusals)
        self._server: grpc.Server | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self._port}"

    def _export(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        request = trace_service_pb2.ExportTraceServiceRequest()
        partial: PartialSuccess | None = None
        spans: list[dict[str, Any]] = []
        too_large: list[str] = []
        try:
            request.ParseFromString(body)
            spans, too_large = convert(request, self.max_spans_per_request, self.max_span_bytes)
            self.spans_refused += len(too_large)
            if too_large and not spans:
                raise InvalidSpan(f"no span kept: {len(too_large)} too large ({too_large[0]})")
            partial = self.sink(spans)
        except OverflowError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except (DecodeError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad ExportTraceServiceRequest: {exc}")
        if too_large:
            rejected = len(too_large) + (partial.rejected_spans if partial else 0)
            messages = [too_large[0]] + ([partial.error_message] if partial and partial.error_message else [])
            partial = PartialSuccess(rejected, f"{rejected} span(s) not kept: " + "; ".join(messages))
        if partial is not None and partial.rejected_spans >= len(spans) + len(too_large) > 0:
            # Nothing kept: a failure, not a partial success (OTLP: INVALID_ARGUMENT is not retried).
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, partial.error_message)
        self.exports += 1
        return export_response(partial)

    def start(self) -> OtlpReceiver:
        """Bind and serve in background threads; OtlpBindError when the address cannot be bound."""
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            # Raw bytes in and out: parsing happens in _export so a malformed message gets INVALID_ARGUMENT.
            "Export": grpc.unary_unary_rpc_method_handler(self._export),
        })
        # Message size is capped by gRPC itself (RESOURCE_EXHAUSTED before any parsing); one worker and 16
        # admitted calls bound what a flood of exporters can make it hold (see MAX_WORKERS). Without BDP
        # probing gRPC keeps each stream's flow-control window at 64 KiB instead of growing it towards the
        # message size: with it, each waiting call buffered ~11 MB of its message before a worker took it.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="otlp"),
                             handlers=[handler], maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
                             options=[("grpc.max_receive_message_length", self.max_message_bytes),
                                      ("grpc.http2.bdp_probe", 0), ("grpc.so_reuseport", 0)])
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError:  # grpcio raises RuntimeError when the port is taken
            bound = 0
        if not bound:
            raise OtlpBindError(f"cannot listen for OTLP on {self.address} (port in use or not allowed)")
        self._port = bound
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0.5).wait(5)
            self._server = None
