"""The stats reader's bounds, against real sockets: a proxy that never answers costs at most the timeout,
answers are shared for ``min_interval`` seconds, readings leave the window, and forgotten targets go.

Time: caching and the window are checked on the scraper's own clock, set by the test (no sleeps, so no
bound to miss on a busy machine). What a silent or dripping proxy costs is wall-clock time by nature; it is
measured with :class:`Stopwatch`, which leaves out the time this process was kept off the CPU (the tests'
bounds are what the reader promises, not allowances for a loaded machine)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trafficmgr.core.telemetry.promtext import parse, quantile
from trafficmgr.core.telemetry.scrape import STATS_PATH, StatsScraper

TEXT = """# TYPE envoy_cluster_outbound_upstream_rq_total counter
envoy_cluster_outbound_upstream_rq_total{envoy_cluster_name="9080|default|reviews"} 12
envoy_cluster_outbound_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="9080|default|reviews"} 3
envoy_cluster_outbound_upstream_rq_time_bucket{envoy_cluster_name="9080|default|reviews",le="10"} 6
envoy_cluster_outbound_upstream_rq_time_bucket{envoy_cluster_name="9080|default|reviews",le="+Inf"} 12
envoy_http_downstream_rq_xx{envoy_response_code_class="2",envoy_http_conn_manager_prefix="inbound_http"} 7
"""


class Clock:
    """A clock the test moves (``StatsScraper(clock=...)``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stopwatch:
    """Elapsed wall-clock seconds minus the scheduling lag seen meanwhile: a probe thread sleeps in
    ``step`` slices and adds up how much later than asked it woke (time this process could not run, e.g.
    other processes on a busy machine). What the code under test waits for (timeouts, budgets) is counted;
    the machine's load is not."""

    def __init__(self, step: float = 0.005) -> None:
        self.step = step
        self.lag = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def _probe(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            time.sleep(self.step)
            self.lag += max(0.0, time.monotonic() - t - self.step - 0.001)  # 1 ms: a timer's normal overshoot

    def __enter__(self) -> Stopwatch:
        self._thread.start()
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.start
        self._stop.set()
        self._thread.join(1)

    @property
    def seconds(self) -> float:
        return self.wall - self.lag


class _Stats(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = TEXT.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stats_url() -> Iterator[str]:
    _Stats.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stats)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}{STATS_PATH}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent() -> Iterator[str]:
    """A listener that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}{STATS_PATH}"
    s.close()


def test_parse_and_quantile() -> None:
    r = parse(TEXT)
    c = r.clusters["9080|default|reviews.outbound"]
    assert (c.rq_total, c.rq_5xx, r.inbound_total, r.inbound_5xx) == (12, 3, 7, 0)
    assert quantile(0.5, c.buckets) == 10.0 and quantile(0.25, c.buckets) == 5.0
    assert quantile(0.99, c.buckets) == 10.0  # in +Inf: the largest finite bound
    assert quantile(0.5, {}) is None and quantile(0.5, {float("inf"): 0.0}) is None


def test_cached_for_min_interval_and_windowed(stats_url: str) -> None:
    clock = Clock()
    s = StatsScraper(window=0.6, min_interval=0.3, clock=clock)
    try:
        assert len(s.collect({"a": stats_url})["a"]) == 1
        clock.now += 0.29
        assert len(s.collect({"a": stats_url})["a"]) == 1 and len(_Stats.hits) == 1  # shared, not read again
        assert "usedonly" in _Stats.hits[0] and "filter=" in _Stats.hits[0]
        # A proxy that appeared meanwhile is read at once (its first reading starts its rate), the others not.
        got = s.collect({"a": stats_url, "b": stats_url + "&b"})
        assert (len(got["a"]), len(got["b"]), len(_Stats.hits)) == (1, 1, 2) and _Stats.hits[1].endswith("&b")
        s.collect({"a": stats_url})
        clock.now += 0.06  # 0.35 s after the first round
        assert len(s.collect({"a": stats_url})["a"]) == 2 and len(_Stats.hits) == 3
        clock.now += 0.7
        assert len(s.collect({"a": stats_url})["a"]) == 1  # the older readings left the window
        clock.now += 0.35
        s.collect({})
        assert s.readings == {}  # a target no longer asked about is forgotten
    finally:
        s.close()


def test_a_silent_proxy_costs_at_most_the_timeout(stats_url: str, silent: str) -> None:
    s = StatsScraper(timeout=0.3, workers=2)
    try:
        with Stopwatch() as took:
            got = s.collect({"silent-1": silent, "silent-2": silent, "silent-3": silent, "ok": stats_url})
        # Two workers, three silent proxies: two timeouts one after the other (0.6 s), within the round's budget.
        assert took.seconds < s.round_budget, (took.wall, took.lag)
        assert len(got["ok"]) == 1 and got["silent-1"] == [] and "timed out" in s.errors["silent-1"]
    finally:
        s.close()


@pytest.fixture
def dripping() -> Iterator[str]:
    """A server that answers its headers, then one byte every 0.1 s for ever."""
    stop = threading.Event()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    def drip(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not stop.is_set():
                    conn.sendall(b"#")
                    time.sleep(0.1)
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{s.getsockname()[1]}{STATS_PATH}"
    stop.set()
    s.close()


def test_a_dripping_proxy_is_cut_at_the_timeout(dripping: str) -> None:
    s = StatsScraper(timeout=0.5)
    try:
        with Stopwatch() as took:
            got = s.collect({"slow": dripping})
        # Cut at the 0.5 s timeout, well before the round's budget (1.5 s) would end the wait.
        assert took.seconds < 1.2, (took.wall, took.lag)
        assert got["slow"] == [] and "no complete answer" in s.errors["slow"]
    finally:
        s.close()


def test_a_round_has_a_budget_and_the_next_round_goes_on_with_the_others(silent: str) -> None:
    s = StatsScraper(timeout=0.2, workers=1, min_interval=0)
    targets = {f"p{i}": f"{silent}&{i}" for i in range(8)}
    try:
        with Stopwatch() as took:
            s.collect(targets)
        assert took.seconds < s.round_budget + 0.5, (took.wall, took.lag)
        first = set(s.errors)
        assert 0 < len(first) < len(targets)  # not all fit in one round's budget
        s.collect(targets)
        assert set(s.errors) - first  # the second round read some the first could not
    finally:
        s.close()


def test_a_flooding_proxy_is_read_no_further_than_the_cap() -> None:
    """A pod's stats port answering far more than MAX_BYTES at full speed: the reader keeps at most
    MAX_BYTES of it (a hostile pod cannot make the control plane hold its whole answer)."""
    from trafficmgr.core.telemetry import scrape

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)

    def flood() -> None:
        conn, _ = s.accept()
        with conn:
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                block = b"x" * (1 << 20)
                for _ in range(3 * scrape.MAX_BYTES >> 20):
                    conn.sendall(block)
            except OSError:
                return

    threading.Thread(target=flood, daemon=True).start()
    try:
        body = scrape.fetch(f"http://127.0.0.1:{s.getsockname()[1]}{scrape.STATS_PATH}", 20)
    finally:
        s.close()
    assert len(body) == scrape.MAX_BYTES
