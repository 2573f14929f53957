"""A small in-memory Zipkin collector (API v2 subset; OTLP/gRPC too, see below) for local mode and tests.

Endpoints (as Zipkin's):

- ``POST /api/v2/spans``: a JSON list of v2 spans; ``Content-Encoding: gzip`` and chunked bodies (Envoy
  sends chunked) are accepted; answers 202.
- ``GET /api/v2/traces?serviceName=&spanName=&limit=10&endTs=&lookback=``: a list of traces (each a list
  of spans), newest first. trafficmgr's own ``meshService=<name>.<namespace>`` keeps the traces with a span
  whose ``upstream_cluster`` tag is an outbound cluster of that Service (``<port>|<namespace>|<name>.outbound``):
  the recent traces of a mesh Service (the dashboard links to it).
- ``GET /api/v2/trace/{traceId}``: the spans of one trace (404 when unknown).
- ``GET /api/v2/services``: service names (``localEndpoint.serviceName``), sorted.
- ``GET /api/v2/spans?serviceName=``: span names of that service, sorted.

With ``--otlp-port`` it also accepts OTLP/gRPC trace exports (:mod:`trafficmgr.apps.otlp`) into the same
store, so the API above shows OpenTelemetry spans too.

- ``GET /metrics``: the store's counters in Prometheus text (spans and bytes held, spans evicted and refused).

Run ``python -m trafficmgr.apps.zipkin --port 9411`` (or ``trafficmgr zipkin``), or in Python
``ZipkinCollector(host, port, otlp_port=None).start()`` ... ``.stop()``. Service and span names are lower-cased and
trace ids normalized to 16 or 32 lower-case hex digits, as Zipkin does.

Memory is bounded whoever sends (see :class:`SpanStore` and ``tests/test_zipkin_memory.py``): spans are kept
up to ``max_spans`` and ``max_store_bytes`` (each span charged its JSON size plus :data:`SPAN_OVERHEAD`), the
oldest spans evicted first; a span over ``max_span_bytes`` (1 MiB, at most 1/16 of the store) is refused (a
POST with one: 413, nothing stored; OTLP: partial success). A POST body is at most :data:`MAX_BODY` bytes
(1/8 of the store) before and after decompression and :data:`MAX_SPANS_PER_REQUEST` spans, and
:data:`POST_SLOTS` bodies are read and parsed at a time; an OTLP message is at most 16 MiB (1/4 of the store)
and one is handled at a time; query answers are written span by span (chunked), never built whole. So the
one knob ``max_store_bytes`` (``--max-store-mib``, default 64) bounds the whole process: under a flood of
1 MB spans from 24 senders, read whole meanwhile, a 16 MiB store's collector peaked at 110-117 MB RSS, 48 MB idle
(``tests/test_zipkin_memory.py``, which allows idle + 1.1 x budget + one OTLP call and two POSTs at their caps).
"""

from __future__ import annotations

import argparse
import ctypes
import http.server
import json
import re
import sys
import threading
import time
import urllib.parse
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trafficmgr.apps.base import AppCommand, ThreadedHTTPApp
from trafficmgr.apps.otlp import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_SPANS_PER_REQUEST,
    OtlpBindError,
    OtlpReceiver,
    PartialSuccess,
)
from trafficmgr.core import argtypes
from trafficmgr.core.signals import stop_on_signals

DEFAULT_PORT = 9411
MIB = 1024 * 1024
#: Largest POST body, as sent and after gzip/deflate decoding (a body that decodes to more is refused as it
#: decodes: no gzip bomb is ever expanded past this), at most 1/8 of the store's budget. Zipkin reporters
#: send far less (Envoy: every 5 spans).
MAX_BODY = 8 * MIB
#: Most spans in one POST (as in one OTLP export).
MAX_SPANS_PER_REQUEST = DEFAULT_MAX_SPANS_PER_REQUEST
#: POST bodies read and parsed at once (the others wait up to :data:`POST_SLOT_WAIT` seconds, then 503): one
#: body at its cap costs ~5 times :data:`MAX_BODY` while parsed (its bytes, its text, the span objects).
POST_SLOTS = 2
POST_SLOT_WAIT = 30.0
#: Seconds a client has to send a whole POST body (a slow sender must not hold a slot for ever).
BODY_DEADLINE = 30.0
DEFAULT_MAX_STORE_BYTES = 64 * MIB
#: Largest span kept (its compact JSON encoding), also at most 1/16 of the store's budget.
MAX_SPAN_BYTES = MIB
#: What a stored span is charged beyond its JSON encoding: the Python objects that hold it (measured: an
#: Envoy span of 876 JSON bytes takes 2.3 KB as dicts and strings; a tiny one ~200 bytes more than its JSON).
SPAN_OVERHEAD = 1024
_HEX = re.compile(r"[0-9a-f]{1,32}")
_WS = re.compile(r"[ \t\n\r]*")
_COMPACT = json.JSONEncoder(separators=(",", ":"))


class BadRequest(ValueError):
    """The request is malformed (answered with 400 and this message)."""

    status = 400


class TooLarge(BadRequest):
    """The request, or a span in it, is over a limit (answered with 413 and this message)."""

    status = 413


def normalize_id(value: Any, what: str) -> str:
    """A hex id lower-cased and left-padded to 16 (or 32) digits; BadRequest when not hex."""
    if not isinstance(value, str) or not _HEX.fullmatch(value.lower()):
        raise BadRequest(f"{what} must be 1 to 32 hex digits, got {value!r}")
    value = value.lower()
    return value.zfill(16) if len(value) <= 16 else value.zfill(32)


def normalize_span(span: Any) -> dict[str, Any]:
    """A validated copy of one v2 span with normalized ids and lower-case names."""
    if not isinstance(span, dict):
        raise BadRequest("each span must be a JSON object")
    out = dict(span)
    out["traceId"] = normalize_id(span.get("traceId"), "traceId")
    out["id"] = normalize_id(span.get("id"), "id")[-16:]
    if span.get("parentId") is not None:
        out["parentId"] = normalize_id(span["parentId"], "parentId")[-16:]
    if isinstance(span.get("name"), str):
        out["name"] = span["name"].lower()
    for key in ("localEndpoint", "remoteEndpoint"):
        ep = span.get(key)
        if isinstance(ep, dict) and isinstance(ep.get("serviceName"), str):
            out[key] = {**ep, "serviceName": ep["serviceName"].lower()}
    for key in ("timestamp", "duration"):
        if key in span and not isinstance(span[key], int):
            raise BadRequest(f"{key} must be an integer (microseconds)")
    return out


def service_name(span: dict[str, Any]) -> str:
    return ((span.get("localEndpoint") or {}).get("serviceName")) or ""


def encoded_size(span: dict[str, Any]) -> int:
    """The length of ``span``'s compact JSON encoding (non-ASCII escaped: never less than its UTF-8 size)."""
    return len(_COMPACT.encode(span))


class SpanStore:
    """Thread-safe in-memory spans grouped by trace id, in arrival order, within a span count and a byte
    budget: each span is charged its :func:`encoded_size` plus :data:`SPAN_OVERHEAD`; past either limit the
    oldest spans are evicted, one by one (so the oldest trace kept may show only its newest spans). A span
    over ``max_span_bytes`` is refused (:meth:`measure`); since that is at most 1/16 of ``max_bytes``, the
    newest spans always fit. Counters: ``evicted``, ``refused``."""

    def __init__(self, max_spans: int = 100_000, max_bytes: int = DEFAULT_MAX_STORE_BYTES,
                 max_span_bytes: int | None = None) -> None:
        """``max_span_bytes`` defaults to :data:`MAX_SPAN_BYTES`, at most ``max_bytes // 16``."""
        if max_spans < 1 or max_bytes < 16 * 1024:
            raise ValueError("a span store holds at least 1 span and 16 KiB")
        self.max_spans = max_spans
        self.max_bytes = max_bytes
        self.max_span_bytes = min(MAX_SPAN_BYTES, max_bytes // 16) if max_span_bytes is None else max_span_bytes
        if not 0 < self.max_span_bytes <= max_bytes // 16:
            raise ValueError(f"max_span_bytes must be 1..{max_bytes // 16} (1/16 of max_bytes)")
        self._lock = threading.Lock()
        self._traces: dict[str, deque[dict[str, Any]]] = {}
        self._order: deque[tuple[str, int]] = deque()  # (trace id, charge) of every span, oldest first
        self._bytes = 0
        self.evicted = 0
        self.refused = 0

    def measure(self, spans: Iterable[dict[str, Any]]) -> tuple[list[tuple[dict[str, Any], int]], list[str]]:
        """Each span with its charge, and one message per span refused as over ``max_span_bytes`` (counted
        in ``refused``); nothing is stored."""
        sized: list[tuple[dict[str, Any], int]] = []
        refused: list[str] = []
        for span in spans:
            size = encoded_size(span)
            if size > self.max_span_bytes:
                refused.append(f"span {span.get('id')} is {size} bytes as JSON, over the limit of "
                               f"{self.max_span_bytes} per span")
            else:
                sized.append((span, size + SPAN_OVERHEAD))
        if refused:
            with self._lock:
                self.refused += len(refused)
        return sized, refused

    def put(self, sized: Iterable[tuple[dict[str, Any], int]]) -> None:
        """Store spans measured by :meth:`measure`, then evict the oldest beyond the limits."""
        with self._lock:
            for span, charge in sized:
                trace_id = span["traceId"]
                spans = self._traces.get(trace_id)
                if spans is None:
                    spans = self._traces[trace_id] = deque()
                spans.append(span)
                self._order.append((trace_id, charge))
                self._bytes += charge
            while self._order and (self._bytes > self.max_bytes or len(self._order) > self.max_spans):
                trace_id, charge = self._order.popleft()
                spans = self._traces[trace_id]
                spans.popleft()  # the trace's oldest span: both queues are in arrival order
                if not spans:
                    del self._traces[trace_id]
                self._bytes -= charge
                self.evicted += 1

    def add(self, spans: Sequence[dict[str, Any]]) -> None:
        """Store ``spans``, or none of them: TooLarge when one is over ``max_span_bytes``."""
        sized, refused = self.measure(spans)
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise TooLarge(refused[0] + more + "; nothing stored")
        self.put(sized)

    @property
    def stored_bytes(self) -> int:
        """The charge of every stored span (at most ``max_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._order)

    def clear(self) -> None:
        with self._lock:
            self._traces.clear()
            self._order.clear()
            self._bytes = 0

    def spans(self) -> list[dict[str, Any]]:
        """Every stored span, in arrival order."""
        with self._lock:
            traces = {trace_id: iter(spans) for trace_id, spans in self._traces.items()}
            return [next(traces[trace_id]) for trace_id, _ in self._order]

    def trace(self, trace_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            spans = self._traces.get(trace_id)
            return list(spans) if spans is not None else None

    def traces(self, service: str = "", span_name: str = "", limit: int = 10, end_ts_ms: int | None = None,
               lookback_ms: int | None = None, min_duration_us: int = 0,
               mesh_service: str = "") -> list[list[dict[str, Any]]]:
        """Traces with a span matching every given criterion, newest (latest span timestamp) first.
        ``mesh_service`` (``<name>.<namespace>``): the span's ``upstream_cluster`` tag is an outbound
        cluster of that Service."""
        end_us = (end_ts_ms if end_ts_ms is not None else int(time.time() * 1000)) * 1000
        start_us = end_us - lookback_ms * 1000 if lookback_ms is not None else None
        service, span_name = service.lower(), span_name.lower()
        cluster_suffix = ""
        if mesh_service:
            name, dot, namespace = mesh_service.partition(".")
            if not dot or not name or not namespace:
                raise BadRequest("meshService must be <name>.<namespace>")
            cluster_suffix = f"|{namespace}|{name}.outbound"

        def matches(span: dict[str, Any]) -> bool:
            ts = span.get("timestamp")
            if ts is not None and (ts > end_us or (start_us is not None and ts < start_us)):
                return False
            if service and service_name(span) != service:
                return False
            if span_name and span.get("name") != span_name:
                return False
            if cluster_suffix and not str((span.get("tags") or {}).get("upstream_cluster", "")).endswith(cluster_suffix):
                return False
            return span.get("duration", 0) >= min_duration_us

        with self._lock:
            found = [list(spans) for spans in self._traces.values() if any(matches(s) for s in spans)]
        found.sort(key=lambda spans: max((s.get("timestamp") or 0) for s in spans), reverse=True)
        return found[:limit]

    def services(self) -> list[str]:
        return sorted({n for n in map(service_name, self.spans()) if n})

    def span_names(self, service: str) -> list[str]:
        service = service.lower()
        return sorted({s["name"] for s in self.spans() if service_name(s) == service and s.get("name")})


class _BodyReader:
    """Reads a request body within :data:`BODY_DEADLINE` (the socket's timeout is the time left)."""

    def __init__(self, handler: http.server.BaseHTTPRequestHandler, deadline: float) -> None:
        self.handler = handler
        self.deadline = deadline

    def _left(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BadRequest(f"body not received within {BODY_DEADLINE:g} s")
        self.handler.connection.settimeout(left)

    def read(self, size: int) -> bytes:
        rfile: Any = self.handler.rfile  # a BufferedReader (read1: one raw read at most)
        parts: list[bytes] = []
        while size > 0:
            self._left()
            try:
                part = rfile.read1(min(size, 65536))
            except TimeoutError:
                raise BadRequest(f"body not received within {BODY_DEADLINE:g} s") from None
            if not part:
                raise BadRequest("truncated body")
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    def readline(self, limit: int) -> bytes:
        """Up to ``limit`` bytes through the next LF; one raw read at most between deadline checks."""
        rfile: Any = self.handler.rfile  # a BufferedReader (peek, read1)
        line = b""
        while len(line) < limit:
            self._left()
            try:
                buffered = rfile.peek(1)  # what is buffered, else one read
            except TimeoutError:
                raise BadRequest(f"body not received within {BODY_DEADLINE:g} s") from None
            if not buffered:
                break
            end = buffered.find(b"\n", 0, limit - len(line))
            line += rfile.read(end + 1 if end >= 0 else min(len(buffered), limit - len(line)))  # buffered: no wait
            if end >= 0:
                break
        return line


def _decode(body: bytes, wbits: int, limit: int) -> bytes:
    """``body`` inflated (every gzip member), refused with TooLarge as soon as it passes ``limit`` bytes."""
    out: list[bytes] = []
    total = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        part = inflater.decompress(body, limit - total + 1)
        total += len(part)
        if total > limit or inflater.unconsumed_tail:
            raise TooLarge(f"body decodes to more than {limit} bytes")
        if not inflater.eof:
            raise BadRequest("truncated compressed body")
        out.append(part)
        body = inflater.unused_data
        if not body:
            return b"".join(out)


def read_body(handler: http.server.BaseHTTPRequestHandler, max_body: int = MAX_BODY) -> bytes:
    """The request body: Content-Length or chunked, then gzip/deflate-decoded per Content-Encoding; at
    most ``max_body`` bytes either way (TooLarge), received within :data:`BODY_DEADLINE` (BadRequest)."""
    reader = _BodyReader(handler, time.monotonic() + BODY_DEADLINE)
    try:
        if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                line = reader.readline(1024)
                if not line:
                    raise BadRequest("truncated chunked body")
                try:
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                except ValueError:
                    raise BadRequest("malformed chunk size") from None
                if size == 0:
                    while reader.readline(1024).strip():  # trailers up to the empty line
                        pass
                    break
                total += size
                if total > max_body:
                    raise TooLarge(f"body over {max_body} bytes")
                parts.append(reader.read(size))
                reader.readline(8)  # CRLF after each chunk
            body = b"".join(parts)
        else:
            try:
                length = int(handler.headers.get("Content-Length") or 0)
            except ValueError:
                raise BadRequest("malformed Content-Length") from None
            if length > max_body:
                raise TooLarge(f"body over {max_body} bytes")
            body = reader.read(length) if length > 0 else b""
    finally:
        handler.connection.settimeout(None)
    encoding = (handler.headers.get("Content-Encoding") or "identity").lower()
    try:
        if encoding == "gzip":
            body = _decode(body, 16 + zlib.MAX_WBITS, max_body)
        elif encoding == "deflate":
            body = _decode(body, zlib.MAX_WBITS, max_body)
        elif encoding != "identity":
            raise BadRequest(f"unsupported Content-Encoding {encoding}")
    except zlib.error as exc:
        raise BadRequest(f"cannot decode {encoding} body: {exc}") from None
    return body


def parse_spans(body: bytes, max_spans: int = MAX_SPANS_PER_REQUEST) -> list[dict[str, Any]]:
    """The normalized spans of a JSON list, decoded one span at a time: TooLarge past ``max_spans`` spans
    (before decoding more), BadRequest when the body is not a JSON (UTF-8) list of valid spans."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not UTF-8: {exc}") from None
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if pos == len(text):
        return []
    if text[pos] != "[":
        raise BadRequest("body must be a JSON list of spans")
    spans: list[dict[str, Any]] = []
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text[pos:pos + 1] != "]":
        while True:
            if len(spans) == max_spans:
                raise TooLarge(f"more than {max_spans} spans in one request")
            try:
                item, pos = decoder.raw_decode(text, pos)
            except ValueError as exc:
                raise BadRequest(f"body is not JSON: {exc}") from None
            spans.append(normalize_span(item))
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos:pos + 1] == ",":
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if text[pos:pos + 1] == "]":
                break
            raise BadRequest(f"body is not JSON: expected ',' or ']' at {pos}")
    if _WS.match(text, pos + 1).end() != len(text):  # type: ignore[union-attr]
        raise BadRequest(f"body is not JSON: extra data at {pos + 1}")
    return spans


class _StoreMetrics(Collector):
    """The collector's own counters, read at scrape time (``GET /metrics``)."""

    def __init__(self, collector: ZipkinCollector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        store, otlp = self.collector.store, self.collector.otlp
        yield GaugeMetricFamily("trafficmgr_zipkin_spans", "Spans held", value=len(store))
        yield GaugeMetricFamily("trafficmgr_zipkin_store_bytes",
                                "Bytes charged for the spans held (JSON size + per-span overhead)", value=store.stored_bytes)
        yield GaugeMetricFamily("trafficmgr_zipkin_store_max_bytes", "The store's byte budget", value=store.max_bytes)
        yield CounterMetricFamily("trafficmgr_zipkin_spans_evicted", "Oldest spans evicted to stay within the limits",
                                  value=store.evicted)
        refused = CounterMetricFamily("trafficmgr_zipkin_spans_refused",
                                      "Spans refused as over the per-span size limit", labels=["protocol"])
        refused.add_metric(["zipkin"], store.refused)
        refused.add_metric(["otlp"], otlp.spans_refused if otlp is not None else 0)
        yield refused


def _int_param(query: dict[str, list[str]], name: str, default: int | None) -> int | None:
    values = query.get(name)
    if not values or values[0] == "":
        return default
    try:
        return int(values[0])
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None


class ZipkinCollector(ThreadedHTTPApp):
    """The collector as an object: ``start()`` serves on ``host:port`` (0 = any free port) in a thread."""

    thread_name = "zipkin"

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, max_spans: int = 100_000,
                 otlp_port: int | None = None, max_store_bytes: int = DEFAULT_MAX_STORE_BYTES) -> None:
        """``otlp_port``: also accept OTLP/gRPC on ``host:otlp_port`` (0 = any free port; None = no).
        ``max_spans`` and ``max_store_bytes`` bound the store (see :class:`SpanStore`)."""
        super().__init__(host, port)
        self.store = SpanStore(max_spans, max_store_bytes)
        self.max_body = min(MAX_BODY, max_store_bytes // 8)
        self.posts = 0
        self._post_slots = threading.BoundedSemaphore(POST_SLOTS)
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(_StoreMetrics(self))
        self.otlp: OtlpReceiver | None = None
        if otlp_port is not None:
            # In flight, a call holds ~7 times its message (see otlp.MAX_WORKERS): a cap of 1/4 of the store
            # keeps that under 2 budgets (16 MiB with the default 64 MiB store).
            self.otlp = OtlpReceiver(self._add_otlp, host, otlp_port, max_span_bytes=self.store.max_span_bytes,
                                     max_message_bytes=min(DEFAULT_MAX_MESSAGE_BYTES, max_store_bytes // 4))

    def _add_otlp(self, spans: list[dict[str, Any]]) -> PartialSuccess | None:
        try:
            normalized = [normalize_span(s) for s in spans]
        except BadRequest as exc:
            raise ValueError(str(exc)) from None
        sized, refused = self.store.measure(normalized)
        self.store.put(sized)
        return PartialSuccess(len(refused), refused[0]) if refused else None

    def start(self) -> ZipkinCollector:
        super().start()
        if self.otlp is not None:
            try:
                self.otlp.start()
            except OSError:
                super().stop()
                raise
        return self

    def stop(self) -> None:
        if self.otlp is not None:
            self.otlp.stop()
        super().stop()

    def spans(self) -> list[dict[str, Any]]:
        """Every stored span (a copy), in arrival order."""
        return self.store.spans()

    def clear(self) -> None:
        self.store.clear()

    def make_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _send(self, status: int, payload: Any = None, content_type: str = "application/json") -> None:
                if isinstance(payload, bytes):
                    body = payload
                else:
                    body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _send_spans(self, groups: Iterable[Sequence[dict[str, Any]]], nested: bool) -> None:
                """A JSON list of span lists (``nested``) or of the spans of the one group, written as
                chunks one span at a time: the answer is never held whole (it may be the whole store)."""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if self.command == "HEAD":
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def chunk(data: bytes) -> None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

                chunk(b"[")
                for i, spans in enumerate(groups):
                    if nested:
                        chunk(b",[" if i else b"[")
                    for j, span in enumerate(spans):
                        chunk((b"," if j or (i and not nested) else b"") + json.dumps(span).encode())
                    if nested:
                        chunk(b"]")
                chunk(b"]")
                self.wfile.write(b"0\r\n\r\n")

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                if urllib.parse.urlsplit(self.path).path != "/api/v2/spans":
                    self.close_connection = True  # its body is not read
                    return self._send(404, {"error": f"no such endpoint: POST {self.path}"})
                if not collector._post_slots.acquire(timeout=POST_SLOT_WAIT):
                    self.close_connection = True
                    self.send_response(503)
                    self.send_header("Retry-After", "5")
                    body = json.dumps({"error": "too many requests in progress"}).encode()
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                try:
                    spans = parse_spans(read_body(self, collector.max_body))
                    collector.store.add(spans)
                except BadRequest as exc:
                    self.close_connection = True
                    return self._send(exc.status, {"error": str(exc)})
                finally:
                    collector._post_slots.release()
                collector.posts += 1
                self._send(202)

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                one = lambda name: (query.get(name) or [""])[0]  # noqa: E731
                store = collector.store
                try:
                    if url.path == "/api/v2/services":
                        return self._send(200, store.services())
                    if url.path == "/api/v2/spans":
                        if not one("serviceName"):
                            raise BadRequest("serviceName is required")
                        return self._send(200, store.span_names(one("serviceName")))
                    if url.path == "/api/v2/traces":
                        return self._send_spans(store.traces(
                            service=one("serviceName"), span_name=one("spanName"),
                            limit=_int_param(query, "limit", 10) or 10, end_ts_ms=_int_param(query, "endTs", None),
                            lookback_ms=_int_param(query, "lookback", None),
                            min_duration_us=_int_param(query, "minDuration", 0) or 0,
                            mesh_service=one("meshService")), nested=True)
                    if url.path.startswith("/api/v2/trace/"):
                        trace = store.trace(normalize_id(url.path.rsplit("/", 1)[1], "traceId"))
                        if trace is None:
                            return self._send(404, {"error": "trace not found"})
                        return self._send_spans([trace], nested=False)
                    if url.path == "/health":
                        return self._send(200, {"status": "UP"})
                    if url.path == "/metrics":
                        return self._send(200, generate_latest(collector.metrics), "text/plain; version=0.0.4")
                except BadRequest as exc:
                    return self._send(400, {"error": str(exc)})
                self._send(404, {"error": f"no such endpoint: GET {url.path}"})

            do_HEAD = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 in a pod)")
    parser.add_argument("--port", type=argtypes.port, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--max-spans", type=argtypes.int_at_least(1), default=100_000, help="spans kept in memory (default 100000)")
    parser.add_argument("--max-store-mib", type=argtypes.int_at_least(1), default=DEFAULT_MAX_STORE_BYTES // MIB, metavar="MIB",
                        help="memory budget of the spans kept, MiB: each charged its JSON size + 1 KiB, the oldest "
                             "evicted first; a span over 1 MiB (or 1/16 of this), a POST body over 8 MiB (1/8) and "
                             f"an OTLP message over 16 MiB (1/4) are refused (default {DEFAULT_MAX_STORE_BYTES // MIB})")
    parser.add_argument("--otlp-port", type=argtypes.port, default=None, metavar="PORT",
                        help="also accept OTLP/gRPC trace exports on --host:PORT (4317 is OTLP's usual port; "
                             "default: off)")


def unmap_large_frees() -> bool:
    """Make glibc map every allocation from 128 KiB up on its own and unmap it when freed (``mallopt
    M_MMAP_THRESHOLD``, fixed at glibc's initial value); False where that is not glibc.

    By default glibc raises the threshold to the largest block freed so far: after the first large span is
    freed, bodies, messages and spans of up to 32 MiB come from the threads' heaps, where freed ones stay
    (fragmented across up to 8 arenas per core) instead of returning to the system. The collector's memory is
    mostly such blocks; measured under ``tests/test_zipkin_memory.py``'s flood: peak RSS 146 -> 99 MB. Only
    ``serve`` calls this, once serving (the process is then the collector's), never a class that embeds it.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, 128 * 1024))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); OSError when the address cannot be bound."""
    # The OTLP port binds the same --host as the Zipkin port: loopback unless told otherwise (a pod sets
    # 0.0.0.0); the receiver only stores spans, with gRPC's message size cap and a per-request span cap.
    collector = ZipkinCollector(args.host, args.port, args.max_spans, otlp_port=getattr(args, "otlp_port", None),
                                max_store_bytes=getattr(args, "max_store_mib", DEFAULT_MAX_STORE_BYTES // MIB) * MIB)
    try:
        collector.start()
    except OtlpBindError as exc:
        print(f"trafficmgr zipkin: error: {exc} (use --otlp-port)", file=sys.stderr, flush=True)
        return 1
    unmap_large_frees()  # serving: this process is the collector's
    stop = stop_on_signals(stop)  # before the banner: whoever waits for it may signal at once
    otlp = f", OTLP/gRPC on {collector.otlp.address}" if collector.otlp is not None else ""
    print(f"zipkin collector on {collector.url} (POST /api/v2/spans){otlp}", file=sys.stderr, flush=True)
    stop.wait()
    collector.stop()
    return 0


COMMAND = AppCommand("zipkin", "run a small in-memory Zipkin collector (API v2) for local mode and tests", add_arguments, serve)
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
