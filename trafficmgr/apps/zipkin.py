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

Run ``python -m trafficmgr.apps.zipkin --port 9411`` (or ``trafficmgr zipkin``), or in Python
``ZipkinCollector(host, port, otlp_port=None).start()`` ... ``.stop()``. Service and span names are lower-cased and
trace ids normalized to 16 or 32 lower-case hex digits, as Zipkin does. Spans are kept in memory up to
``max_spans`` (the oldest traces are dropped first).
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import re
import sys
import threading
import time
import urllib.parse
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from trafficmgr.apps.base import AppCommand, ThreadedHTTPApp, serve_until_signal
from trafficmgr.apps.otlp import OtlpBindError, OtlpReceiver
from trafficmgr.core import argtypes
from trafficmgr.core.signals import stop_on_signals

DEFAULT_PORT = 9411
MAX_BODY = 64 * 1024 * 1024
_HEX = re.compile(r"[0-9a-f]{1,32}")


class BadRequest(ValueError):
    """The request is malformed (answered with 400 and this message)."""


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


class SpanStore:
    """Thread-safe in-memory spans grouped by trace id, in arrival order."""

    def __init__(self, max_spans: int = 100_000) -> None:
        self.max_spans = max_spans
        self._lock = threading.Lock()
        self._traces: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._count = 0

    def add(self, spans: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            for span in spans:
                self._traces.setdefault(span["traceId"], []).append(span)
                self._count += 1
            while self._count > self.max_spans and self._traces:
                _, dropped = self._traces.popitem(last=False)
                self._count -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._traces.clear()
            self._count = 0

    def spans(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s for spans in self._traces.values() for s in spans]

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


def read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    """The request body: Content-Length or chunked, then gzip/deflate-decoded per Content-Encoding."""
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        parts: list[bytes] = []
        total = 0
        while True:
            line = handler.rfile.readline(1024)
            if not line:
                raise BadRequest("truncated chunked body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline(1024).strip():  # trailers up to the empty line
                    pass
                break
            total += size
            if total > MAX_BODY:
                raise BadRequest("body too large")
            parts.append(handler.rfile.read(size))
            handler.rfile.readline(8)  # CRLF after each chunk
        body = b"".join(parts)
    else:
        length = int(handler.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise BadRequest("body too large")
        body = handler.rfile.read(length) if length else b""
    encoding = (handler.headers.get("Content-Encoding") or "identity").lower()
    try:
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding != "identity":
            raise BadRequest(f"unsupported Content-Encoding {encoding}")
    except (OSError, EOFError, zlib.error) as exc:
        raise BadRequest(f"cannot decode {encoding} body: {exc}") from None
    return body


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
                 otlp_port: int | None = None) -> None:
        """``otlp_port``: also accept OTLP/gRPC on ``host:otlp_port`` (0 = any free port; None = no)."""
        super().__init__(host, port)
        self.store = SpanStore(max_spans)
        self.posts = 0
        self.otlp: OtlpReceiver | None = None
        if otlp_port is not None:
            self.otlp = OtlpReceiver(self._add_otlp, host, otlp_port)

    def _add_otlp(self, spans: list[dict[str, Any]]) -> None:
        try:
            normalized = [normalize_span(s) for s in spans]
        except BadRequest as exc:
            raise ValueError(str(exc)) from None
        self.store.add(normalized)

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

            def _send(self, status: int, payload: Any = None) -> None:
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                try:
                    body = read_body(self)
                    if urllib.parse.urlsplit(self.path).path != "/api/v2/spans":
                        return self._send(404, {"error": f"no such endpoint: POST {self.path}"})
                    try:
                        payload = json.loads(body or b"[]")
                    except ValueError as exc:
                        raise BadRequest(f"body is not JSON: {exc}") from None
                    if not isinstance(payload, list):
                        raise BadRequest("body must be a JSON list of spans")
                    spans = [normalize_span(s) for s in payload]
                except BadRequest as exc:
                    self.close_connection = True
                    return self._send(400, {"error": str(exc)})
                collector.store.add(spans)
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
                        return self._send(200, store.traces(
                            service=one("serviceName"), span_name=one("spanName"),
                            limit=_int_param(query, "limit", 10) or 10, end_ts_ms=_int_param(query, "endTs", None),
                            lookback_ms=_int_param(query, "lookback", None),
                            min_duration_us=_int_param(query, "minDuration", 0) or 0,
                            mesh_service=one("meshService")))
                    if url.path.startswith("/api/v2/trace/"):
                        trace = store.trace(normalize_id(url.path.rsplit("/", 1)[1], "traceId"))
                        if trace is None:
                            return self._send(404, {"error": "trace not found"})
                        return self._send(200, trace)
                    if url.path == "/health":
                        return self._send(200, {"status": "UP"})
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
    parser.add_argument("--otlp-port", type=argtypes.port, default=None, metavar="PORT",
                        help="also accept OTLP/gRPC trace exports on --host:PORT (4317 is OTLP's usual port; "
                             "default: off)")


def serve(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); OSError when the address cannot be bound."""
    # The OTLP port binds the same --host as the Zipkin port: loopback unless told otherwise (a pod sets
    # 0.0.0.0); the receiver only stores spans, with gRPC's message size cap and a per-request span cap.
    collector = ZipkinCollector(args.host, args.port, args.max_spans, otlp_port=getattr(args, "otlp_port", None))
    if collector.otlp is None:
        return serve_until_signal(collector, "zipkin collector on {url} (POST /api/v2/spans)", stop)
    try:
        collector.start()
    except OtlpBindError as exc:
        print(f"trafficmgr zipkin: error: {exc} (use --otlp-port)", file=sys.stderr, flush=True)
        return 1
    print(f"zipkin collector on {collector.url} (POST /api/v2/spans), OTLP/gRPC on {collector.otlp.address}",
          file=sys.stderr, flush=True)
    stop = stop_on_signals(stop)
    stop.wait()
    collector.stop()
    return 0


COMMAND = AppCommand("zipkin", "run a small in-memory Zipkin collector (API v2) for local mode and tests", add_arguments, serve)
main = COMMAND.main

if __name__ == "__main__":
    sys.exit(main())
