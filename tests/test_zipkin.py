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
