"""A flood of large span exports at the built-in collector, run as its own process by tests/test_zipkin_memory.py.

``python zipkin_flood_client.py OTLP_ADDRESS HTTP_PORT THREADS ROUNDS``: each of ``THREADS`` threads sends
``ROUNDS`` times an OTLP export of 3 spans of :data:`PAD` bytes (in every third one the last is a span of
1.5 MiB, which the collector must refuse) and a Zipkin JSON POST of 2 such spans. A RESOURCE_EXHAUSTED (the receiver's
queue is full) is retried after a pause, as an exporter would. Prints one JSON line: the gRPC codes seen,
the HTTP statuses, the spans the collector said it rejected (``partial_success``) and how many big spans were
sent.
"""

from __future__ import annotations

import http.client
import json
import struct
import sys
import threading
import time
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from trafficmgr.apps.otlp import EXPORT, GROUPS_FIELD

PAD = 1000 * 1024  # a span of ~1000 KiB: under the collector's 1 MiB limit, also as JSON
BIG = 1536 * 1024  # over it
SPANS_PER_EXPORT = 3  # 3 MB, or 3.5 MB with a BIG one: under the OTLP cap of a 16 MiB store (4 MiB)


def export(trace: int, first_span: int, pads: list[int]) -> bytes:
    """An export of one trace (id ``trace``) whose spans are numbered from ``first_span``, span i's tag
    ``pad`` holding ``pads[i]`` bytes."""
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "flood"
    group = getattr(rs, GROUPS_FIELD).add()
    now = time.time_ns()
    for i, size in enumerate(pads):
        span = trace_pb2.Span(trace_id=struct.pack(">QQ", 1, trace), span_id=struct.pack(">Q", first_span + i),
                              name="flood", start_time_unix_nano=now - 1000, end_time_unix_nano=now)
        span.attributes.add(key="pad").value.string_value = "p" * size
        group.spans.append(span)
    return req.SerializeToString()


def partial_rejected(response: bytes) -> int:
    """``partial_success.rejected_spans`` of an ExportTraceServiceResponse (field 1 { field 1 varint })."""
    if not response:
        return 0
    assert response[0] == 0x0A and response[2] == 0x08, response[:8]
    value, shift, pos = 0, 0, 3
    while True:
        byte = response[pos]
        value |= (byte & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
        if not byte & 0x80:
            return value


def main() -> None:
    address, http_port, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    lock = threading.Lock()
    summary: dict[str, Any] = {"grpc": {}, "http": {}, "rejected": 0, "big_sent": 0, "retries": 0}

    def count(kind: str, code: str) -> None:
        with lock:
            summary[kind][code] = summary[kind].get(code, 0) + 1

    def worker(t: int) -> None:
        options = [("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as channel:
            call = channel.unary_unary(EXPORT)
            for r in range(rounds):
                n = t * rounds + r
                big = n % 3 == 0
                body = export(n + 1, (n + 1) << 8, [PAD] * (SPANS_PER_EXPORT - big) + ([BIG] if big else []))
                for _attempt in range(200):
                    try:
                        rejected = partial_rejected(call(body, timeout=60))
                        count("grpc", "OK")
                        with lock:
                            summary["rejected"] += rejected
                            summary["big_sent"] += big
                        break
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            count("grpc", exc.code().name)
                            break
                        with lock:
                            summary["retries"] += 1
                        time.sleep(0.1)
                spans = [{"traceId": f"{0xF000 + n:x}", "id": f"{0xF0000 + 2 * n + i:x}", "name": "post",
                          "timestamp": int(time.time() * 1e6), "duration": 5, "tags": {"pad": "q" * PAD}}
                         for i in range(2)]
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
                try:
                    conn.request("POST", "/api/v2/spans", json.dumps(spans).encode(), {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    count("http", str(resp.status))
                finally:
                    conn.close()

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
