"""The built-in collector's memory stays bounded whoever sends spans (review of issue 20).

Before, its store bounded the number of spans (100k) but not their bytes, and a span could carry a tag
of up to 16 MiB (OTLP) or 64 MiB (POST): peak RSS grew with what was sent (32 concurrent 16 MiB exports:
~900 MB). Now the store has a byte budget (``--max-store-mib``), a span over 1 MiB is refused, one OTLP call
is handled at a time and two POST bodies are parsed at a time.

Here the collector runs as its own process (``trafficmgr zipkin --max-store-mib 16 --otlp-port``) and a
separate client process sends ~480 MB of 1000 KiB spans from 24 threads at once (OTLP exports of 3 spans,
in every third the last one of 1.5 MiB; JSON POSTs of 2 spans). Its peak RSS (``VmHWM``) must stay under
what the design allows, derived below from the idle process: the budget, plus one OTLP call in flight at
its cap (1/4 of the budget; measured ~7x its message, 8x allowed), plus the POST slots at their cap (1/8
of the budget, 5x a body each), plus slack for the allocator. The old collector (no byte budget, 4 OTLP
workers) peaked at 661 MB under the same flood. While it runs the HTTP API keeps answering, also with every
stored span (answers are streamed); afterwards it serves exactly the newest spans that fit the budget, and
``/metrics`` counts every refused span.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.zipkin_flood_client import PAD, SPANS_PER_EXPORT, export
from trafficmgr.apps.otlp import EXPORT
from trafficmgr.apps.zipkin import POST_SLOTS, SPAN_OVERHEAD

BUDGET = 16 * 1024 * 1024
THREADS, ROUNDS = 24, 4
MIB = 1024 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert match, field
    return int(match.group(1)) * 1024


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    return env


def _get(port: int, path: str, timeout: float = 20) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _metric(port: int, name: str, **labels: str) -> float:
    text = _get(port, "/metrics")[1].decode()
    want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    for line in text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{want} not in /metrics:\n{text}")


@pytest.fixture
def collector() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    http_port, otlp_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trafficmgr.apps.zipkin", "--port", str(http_port),
                             "--otlp-port", str(otlp_port), "--max-store-mib", str(BUDGET // MIB)],
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        banner = proc.stderr.readline() if proc.stderr else ""
        assert "OTLP/gRPC on" in banner, banner
        yield proc, http_port, otlp_port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _export(address: str, body: bytes) -> bytes:
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", -1)]) as ch:
        response: bytes = ch.unary_unary(EXPORT)(body, timeout=60)
    return response


def test_a_flood_of_large_spans_keeps_rss_bounded_and_the_newest_spans(
        collector: tuple[subprocess.Popen[str], int, int]) -> None:
    proc, http_port, otlp_port = collector
    address = f"127.0.0.1:{otlp_port}"
    # Warm up every path once (imports, gRPC's threads, the HTTP handler), then take the idle RSS.
    _export(address, export(1, 1, [10]))
    assert _get(http_port, "/api/v2/traces?limit=5")[0] == 200
    time.sleep(0.5)
    idle = _status(proc.pid, "VmRSS")
    # One OTLP call in flight at its cap (1/4 of the budget), each POST slot at its cap (1/8).
    bound = idle + int(BUDGET * 1.1) + 8 * (BUDGET // 4) + POST_SLOTS * 5 * (BUDGET // 8) + 32 * MIB

    # The HTTP API answers all along (a poller in this process, every 0.2 s).
    answers: list[tuple[str, int, float]] = []
    flooding = threading.Event()
    flooding.set()

    def poll() -> None:
        while flooding.is_set():
            for path in ("/health", "/api/v2/services", "/api/v2/traces?limit=100000"):  # the last: everything
                start = time.monotonic()
                try:
                    status = _get(http_port, path)[0]
                except OSError as exc:
                    status = -1
                    print("poll failed:", path, exc, file=sys.stderr)
                answers.append((path, status, time.monotonic() - start))
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    flood = subprocess.run([sys.executable, os.path.join(HERE, "zipkin_flood_client.py"), address, str(http_port),
                            str(THREADS), str(ROUNDS)], capture_output=True, text=True, timeout=900, env=_env())
    flooding.clear()
    poller.join(30)
    assert flood.returncode == 0, flood.stderr[-3000:]
    summary: dict[str, Any] = json.loads(flood.stdout.strip().splitlines()[-1])
    peak = _status(proc.pid, "VmHWM")
    print(f"idle {idle / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, bound {bound / MIB:.0f} MiB; flood {summary}")

    exports = THREADS * ROUNDS
    assert summary["grpc"] == {"OK": exports}, summary  # every export landed (RESOURCE_EXHAUSTED ones retried)
    assert summary["http"] == {"202": exports}, summary
    assert summary["rejected"] == summary["big_sent"] > 0, summary  # each 1.5 MiB span refused, via partial_success
    assert peak <= bound, f"peak RSS {peak / MIB:.0f} MiB over the bound {bound / MIB:.0f} MiB"
    assert answers and all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200]
    slowest = max(answers, key=lambda a: a[2])
    assert slowest[2] < 10, slowest

    # Afterwards: 40 more exports of one span each, one after another. The budget holds the newest of them
    # (each charged its JSON size + SPAN_OVERHEAD), and nothing older.
    tail = [(0xA0000 + i, 0xA00000 + i) for i in range(40)]
    for trace, span in tail:
        assert _export(address, export(trace, span, [PAD])) == b""
    status, body = _get(http_port, "/api/v2/traces?limit=100000")
    assert status == 200
    served = [s for trace in json.loads(body) for s in trace]
    charge = len(json.dumps(served[0], separators=(",", ":"))) + SPAN_OVERHEAD
    assert {s["id"] for s in served} == {struct.pack(">Q", span).hex() for _, span in tail[-(BUDGET // charge):]}
    assert _metric(http_port, "trafficmgr_zipkin_spans") == BUDGET // charge
    assert _metric(http_port, "trafficmgr_zipkin_store_bytes") == (BUDGET // charge) * charge <= BUDGET
    assert _metric(http_port, "trafficmgr_zipkin_spans_refused_total", protocol="otlp") == summary["big_sent"]
    sent = exports * (SPANS_PER_EXPORT + 2) - summary["rejected"] + len(tail) + 1
    assert _metric(http_port, "trafficmgr_zipkin_spans_evicted_total") == sent - BUDGET // charge
    assert _status(proc.pid, "VmHWM") <= bound
