"""The Zipkin collector app (trafficmgr.apps.zipkin): API v2 on loopback, as Envoy and users call it."""

from __future__ import annotations

import gzip
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr import cli
from trafficmgr.apps.zipkin import ZipkinCollector


@pytest.fixture
def zipkin() -> Iterator[ZipkinCollector]:
    with ZipkinCollector("127.0.0.1", 0) as collector:
        yield collector


def span(trace: str, sid: str, service: str = "client.default", name: str = "GET", ts: int | None = None,
         duration: int = 100, **extra: Any) -> dict[str, Any]:
    return {"traceId": trace, "id": sid, "name": name, "kind": "CLIENT",
            "timestamp": ts if ts is not None else int(time.time() * 1e6), "duration": duration,
            "localEndpoint": {"serviceName": service}, **extra}


def call(z: ZipkinCollector, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, chunked: bool = False) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", z.port, timeout=5)
    if chunked:
        conn.request(method, path, body=iter([body[:7], body[7:]]) if body else iter([]), headers=headers or {},
                     encode_chunked=True)
    else:
        conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw else None


def post(z: ZipkinCollector, spans: list[dict[str, Any]], **kw: Any) -> int:
    return call(z, "POST", "/api/v2/spans", json.dumps(spans).encode(), {"Content-Type": "application/json"}, **kw)[0]


def test_post_then_query_every_endpoint(zipkin: ZipkinCollector) -> None:
    now = int(time.time() * 1e6)
    assert post(zipkin, [span("a1", "1", ts=now - 3000), span("a1", "2", service="Reviews.default", name="inbound", ts=now - 2000,
                                                                parentId="1")]) == 202
    assert post(zipkin, [span("B2", "3", ts=now - 1000)]) == 202
    status, traces = call(zipkin, "GET", "/api/v2/traces?limit=10")
    assert status == 200 and [t[0]["traceId"] for t in traces] == ["00000000000000b2", "00000000000000a1"]  # newest first
    assert [len(t) for t in traces] == [1, 2]
    _, traces = call(zipkin, "GET", "/api/v2/traces?serviceName=reviews.default")
    assert [t[0]["traceId"] for t in traces] == ["00000000000000a1"]
    _, traces = call(zipkin, "GET", "/api/v2/traces?limit=1")
    assert len(traces) == 1
    status, trace = call(zipkin, "GET", "/api/v2/trace/A1")
    assert status == 200 and [s["id"] for s in trace] == ["0000000000000001", "0000000000000002"]
    assert trace[1]["parentId"] == "0000000000000001"
    assert call(zipkin, "GET", "/api/v2/services") == (200, ["client.default", "reviews.default"])
    assert call(zipkin, "GET", "/api/v2/spans?serviceName=client.default") == (200, ["get"])
    assert call(zipkin, "GET", "/api/v2/trace/ffff")[0] == 404


def test_gzip_and_chunked_bodies(zipkin: ZipkinCollector) -> None:
    body = json.dumps([span("c3", "1")]).encode()
    assert call(zipkin, "POST", "/api/v2/spans", gzip.compress(body),
                {"Content-Type": "application/json", "Content-Encoding": "gzip"})[0] == 202
    assert post(zipkin, [span("d4", "1")], chunked=True) == 202  # Envoy sends chunked bodies
    assert call(zipkin, "POST", "/api/v2/spans", gzip.compress(json.dumps([span("e5", "1")]).encode()),
                {"Content-Encoding": "gzip"}, chunked=True)[0] == 202
    assert {s["traceId"][-2:] for s in zipkin.spans()} == {"c3", "d4", "e5"}
    # The connection stays usable after a chunked body (keep-alive, as Envoy reuses it).
    conn = http.client.HTTPConnection("127.0.0.1", zipkin.port, timeout=5)
    for trace in ("f6", "f7"):
        conn.request("POST", "/api/v2/spans", body=iter([json.dumps([span(trace, "1")]).encode()]), encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 202
    conn.close()
    assert len(zipkin.spans()) == 5


@pytest.mark.parametrize("body, headers", [
    (b"not json", {}),
    (b'{"traceId": "a"}', {}),
    (b'[{"traceId": "xyz", "id": "1"}]', {}),
    (b'[{"traceId": "a", "id": "1", "timestamp": "soon"}]', {}),
    (b'[1]', {}),
    (b"plain", {"Content-Encoding": "gzip"}),
    (b"[]", {"Content-Encoding": "br"}),
])
def test_bad_posts_get_400_and_store_nothing(zipkin: ZipkinCollector, body: bytes, headers: dict[str, str]) -> None:
    status, answer = call(zipkin, "POST", "/api/v2/spans", body, headers)
    assert status == 400 and answer["error"]
    assert zipkin.spans() == []


def test_query_errors(zipkin: ZipkinCollector) -> None:
    assert call(zipkin, "GET", "/api/v2/spans")[0] == 400  # serviceName is required, as in Zipkin
    assert call(zipkin, "GET", "/api/v2/traces?limit=x")[0] == 400
    assert call(zipkin, "GET", "/api/v2/trace/not-hex")[0] == 400
    assert call(zipkin, "GET", "/nope")[0] == 404
    assert call(zipkin, "POST", "/nope", b"[]")[0] == 404
    assert call(zipkin, "GET", "/health") == (200, {"status": "UP"})


def test_lookback_and_min_duration(zipkin: ZipkinCollector) -> None:
    now_ms = int(time.time() * 1000)
    post(zipkin, [span("1", "1", ts=(now_ms - 60_000) * 1000, duration=10), span("2", "1", ts=now_ms * 1000, duration=5000)])
    _, recent = call(zipkin, "GET", f"/api/v2/traces?endTs={now_ms + 1}&lookback=1000")
    assert [t[0]["traceId"] for t in recent] == ["0000000000000002"]
    _, slow = call(zipkin, "GET", "/api/v2/traces?minDuration=1000")
    assert [t[0]["traceId"] for t in slow] == ["0000000000000002"]


def test_oldest_traces_are_dropped_beyond_max_spans() -> None:
    with ZipkinCollector("127.0.0.1", 0, max_spans=3) as z:
        for i in range(1, 6):
            post(z, [span(f"{i:x}", "1")])
        assert [s["traceId"][-1] for s in z.spans()] == ["3", "4", "5"]


def test_module_entry_point_serves_until_sigterm() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "trafficmgr.apps.zipkin", "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert f"127.0.0.1:{port}" in (proc.stderr.readline() if proc.stderr else "")
        z = ZipkinCollector("127.0.0.1", port)  # only used for its address helpers
        assert post(z, [span("ab", "1")]) == 202
        assert call(z, "GET", "/api/v2/trace/ab")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_cli_command_reports_a_taken_port(zipkin: ZipkinCollector, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["zipkin", "--port", str(zipkin.port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trafficmgr: error: cannot listen on 127.0.0.1:"), err


# -- limits: what a sender can make the collector hold (review of issue 20; flood: tests/test_zipkin_memory.py) --


def metric(z: ZipkinCollector, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", z.port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_a_span_over_the_limit_is_refused_with_413_and_counted(zipkin: ZipkinCollector) -> None:
    assert zipkin.store.max_span_bytes == 1024 * 1024
    big = span("b1", "1", tags={"pad": "x" * (1024 * 1024)})
    status, answer = call(zipkin, "POST", "/api/v2/spans", json.dumps([span("a1", "1"), big]).encode())
    assert status == 413 and "over the limit of 1048576 per span" in answer["error"], answer
    assert zipkin.spans() == []  # nothing of that request is stored
    assert metric(zipkin, 'trafficmgr_zipkin_spans_refused_total{protocol="zipkin"}') == 1
    assert post(zipkin, [span("a1", "1", tags={"pad": "x" * (1024 * 1024 - 400)})]) == 202  # just under: kept


def test_the_byte_budget_keeps_the_newest_spans() -> None:
    with ZipkinCollector("127.0.0.1", 0, max_store_bytes=1024 * 1024) as z:
        assert z.store.max_span_bytes == 64 * 1024  # 1/16 of the budget
        for i in range(1, 61):
            assert post(z, [span(f"{i:x}", "1", tags={"pad": "x" * 30_000})]) == 202
        kept = [int(s["traceId"], 16) for s in z.spans()]
        assert kept == list(range(61 - len(kept), 61)) and 25 <= len(kept) <= 34, kept  # ~31 KB each in 1 MiB
        assert z.store.stored_bytes <= 1024 * 1024 < z.store.stored_bytes + 31_500
        assert metric(z, "trafficmgr_zipkin_spans_evicted_total") == 60 - len(kept)
        _, traces = call(z, "GET", "/api/v2/traces?limit=1000")
        assert sorted(int(t[0]["traceId"], 16) for t in traces) == kept


def _raw_reply(s: socket.socket) -> tuple[int, bytes]:
    """Status and body of the HTTP response on ``s`` (headers and body may arrive in separate reads)."""
    resp = http.client.HTTPResponse(s)
    resp.begin()
    return resp.status, resp.read()


def test_bodies_are_bounded_before_and_after_decoding(zipkin: ZipkinCollector) -> None:
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]")  # 64 KB that inflate to 64 MiB
    assert len(bomb) < 100_000
    status, answer = call(zipkin, "POST", "/api/v2/spans", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decodes to more than 8388608 bytes" in answer["error"], answer
    with socket.create_connection(("127.0.0.1", zipkin.port), timeout=5) as s:  # refused on its headers, unread
        s.sendall(b"POST /api/v2/spans HTTP/1.1\r\nHost: x\r\nContent-Length: 8388609\r\n\r\n")
        status, reply = _raw_reply(s)
    assert status == 413 and b"body over 8388608 bytes" in reply, (status, reply)
    many = json.dumps([{"traceId": "1", "id": "1"}] * 50_001).encode()
    status, answer = call(zipkin, "POST", "/api/v2/spans", many)
    assert status == 413 and "more than 50000 spans" in answer["error"], answer
    assert zipkin.spans() == []
    assert post(zipkin, [span("c3", "1")]) == 202


def test_a_slow_sender_loses_its_slot_and_waiting_ones_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    from trafficmgr.apps import zipkin as zipkin_app

    monkeypatch.setattr(zipkin_app, "BODY_DEADLINE", 1.5)
    monkeypatch.setattr(zipkin_app, "POST_SLOT_WAIT", 0.5)
    with ZipkinCollector("127.0.0.1", 0) as z:
        stalled = []
        for _ in range(zipkin_app.POST_SLOTS):  # each sends its headers and 10 of 1000 bytes, then nothing
            s = socket.create_connection(("127.0.0.1", z.port), timeout=10)
            s.sendall(b"POST /api/v2/spans HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[{\"traceId")
            stalled.append(s)
        time.sleep(0.3)
        status, answer = call(z, "POST", "/api/v2/spans", json.dumps([span("d4", "1")]).encode())
        assert status == 503 and "too many requests" in answer["error"], answer  # both slots held
        for s in stalled:
            status, reply = _raw_reply(s)
            assert status == 400 and b"not received within 1.5 s" in reply, (status, reply)
            s.close()
        assert post(z, [span("d4", "1")]) == 202  # the slots are free again
        assert call(z, "GET", "/health") == (200, {"status": "UP"})
