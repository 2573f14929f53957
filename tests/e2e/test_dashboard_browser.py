"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) loads the page and the tests
read what a person sees (the rendered DOM's text, and element boxes that are on screen).

- Against a fixture server (the page's files from ``trafficmgr/dashboard/static`` and a data document
  the test controls): nulls show as "no data yet", strings from the data are text and never markup,
  only http(s) trace links, and an unreachable control plane shows the fetch error, then recovers.
- Against ``trafficmgr demo`` with requests flowing to ``reviews`` through productpage: the bookinfo
  service rows, a non-zero request rate for reviews, the graph edge productpage -> reviews, and a NACK
  (a plugin on ``TRAFFICMGR_PLUGIN_PATH`` that breaks the cluster of a Service labelled
  ``traffic.test.break=true``: ratings) shown with Envoy's error. The screenshot is saved as a test artifact
  (``$TRAFFICMGR_TEST_ARTIFACTS/dashboard.png``, else pytest's temporary directory; the path is printed);
  with ``TRAFFICMGR_UPDATE_SCREENSHOT=1`` it also replaces ``docs/images/dashboard.png``.
"""

from __future__ import annotations

import copy
import http.client
import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trafficmgr.cli.dashboard import DashboardProxy
from trafficmgr.core.admin import AdminServer
from trafficmgr.dashboard import DATA_PATH, PAGE_PATH, STATIC_DIR
from trafficmgr.testing.browser import Browser, Page, find_chromium
from trafficmgr.testing.cluster import Kubectl
from trafficmgr.testing.envoy import free_port, wait_for
from trafficmgr.testing.prereq import missing

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DOC_IMAGE = REPO / "docs" / "images" / "dashboard.png"
BOOKINFO = ("productpage-v1", "details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3")
XSS = '<img src=x onerror="window.__pwned=1">'

# What a person sees: the text of the row of a service, of a table cell, of the graph.
JS_ROW_TEXT = "(id => { const r = document.querySelector(`#services tr[data-service=\"${id}\"]`); return r ? r.innerText : null; })"
JS_CELL = ("((id, f) => { const c = document.querySelector(`#services tr[data-service=\"${id}\"] td[data-field=\"${f}\"]`);"
           " return c ? c.innerText : null; })")
JS_EDGE = ("((a, b) => { const g = document.querySelector(`#graph-box g.edge[data-from=\"${a}\"][data-to=\"${b}\"]`);"
           " if (!g) return null; const r = g.querySelector('line').getBoundingClientRect();"
           " return {label: g.querySelector('text').textContent, title: g.querySelector('title').textContent,"
           " w: r.width, h: r.height}; })")
JS_NODE_NAMES = "[...document.querySelectorAll('#graph-box g.node text')].map(t => t.textContent)"


def _browser() -> Browser:
    if find_chromium() is None:
        missing("chromium not installed (apt install chromium; .ci/install.d/chromium.apt)")
    return Browser()


def _rate(text: str | None) -> float | None:
    """``"1.23 req/s"`` -> 1.23; anything else (``no data yet``, missing) -> None."""
    if not text or not text.strip().endswith("req/s"):
        return None
    return float(text.split()[0])


# -- the page against a fixture ----------------------------------------------------------------------

FIXTURE: dict[str, Any] = {
    "generated": 1796601600, "source": "envoy-stats", "window_s": 10,
    "services": [
        {"namespace": "default", "name": "productpage", "labels": [], "rps": 2.5, "error_rate": 0.0,
         "p50_ms": 12.0, "p99_ms": 48.0, "upstreams": [], "traces_url": "http://127.0.0.1:9411/zipkin/?serviceName=productpage"},
        {"namespace": "default", "name": "reviews",
         "labels": [{"key": "traffic.lb.policy", "value": "RING_HASH", "plugin": "lb"},
                    {"key": "traffic.test.note", "value": XSS, "plugin": "evil"}],
         "rps": 2.5, "error_rate": 0.04, "p50_ms": 8.0, "p99_ms": None,
         "upstreams": [{"pod": "reviews-v1-abc", "address": "127.1.0.5:9080", "weight": 100, "zone": XSS, "rps": 2.0,
                        "error_rate": 0.0},
                       {"pod": "reviews-v3-def", "address": "127.1.0.7:9080", "weight": None, "rps": None, "error_rate": None}],
         "traces_url": "javascript:window.__pwned=2"},
        {"namespace": "default", "name": "ratings", "labels": [], "rps": None, "error_rate": None, "p50_ms": None,
         "p99_ms": None, "upstreams": [], "traces_url": None},
    ],
    # Plugins' upstream columns (lb's weight, a third party's zone): the page shows the ones listed here.
    "upstream_columns": [{"name": "weight", "title": "weight"}, {"name": "zone", "title": "zone"}],
    "edges": [{"from": "default/productpage", "to": "default/reviews", "rps": 2.5, "error_rate": 0.04},
              {"from": "default/reviews", "to": "default/ratings", "rps": 1.0, "error_rate": 0.0}],
    "proxies": [{"node_id": "productpage-v1-x.default", "view": "sidecar", "mode": "sotw",
                 "clusters": {"sent": "v2", "acked": "v1", "last_nack": {"error": "bad <b>cluster</b>"}},
                 "endpoints": {"sent": "e1", "acked": "e1", "last_nack": None},
                 "listeners": {"sent": "l1", "acked": "l1", "last_nack": None},
                 "routes": {"sent": "r1", "acked": "r1", "last_nack": None},
                 "secrets": {"sent": None, "acked": None, "last_nack": None},
                 "last_nack": {"type": "clusters", "error": "bad <b>cluster</b>", "time": 1796601590}}],
    "events": [{"time": 1796601500, "type": "Warning", "reason": "InvalidTrafficLabel", "object": "Service/default/reviews",
                "message": f"label traffic.x: {XSS}"}],
    "routes": [{"kind": "Ingress", "namespace": "default", "name": "bookinfo", "hosts": ["*"],
                "matches": ["PathPrefix /productpage"], "backends": ["productpage:9080"], "status": "Accepted"}],
}


class _FixtureHandler(http.server.BaseHTTPRequestHandler):
    server: _FixtureServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == DATA_PATH:
            status, body, ctype = self.server.answer()
        elif path.startswith(PAGE_PATH):
            name = path[len(PAGE_PATH):] or "index.html"
            file = STATIC_DIR / name
            if "/" in name or not file.is_file():
                status, body, ctype = 404, b"not found", "text/plain"
            else:
                ctype = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}[file.suffix] + "; charset=utf-8"
                status, body = 200, file.read_bytes()
        else:
            status, body, ctype = 404, b"not found", "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _FixtureServer(http.server.ThreadingHTTPServer):
    """The page's files plus a data route answering ``self.data`` (or ``self.fail``: status, text)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FixtureHandler)
        self.data: dict[str, Any] = copy.deepcopy(FIXTURE)
        self.fail: tuple[int, str] | None = None

    def answer(self) -> tuple[int, bytes, str]:
        if self.fail:
            return self.fail[0], self.fail[1].encode(), "text/plain"
        return 200, json.dumps(self.data).encode(), "application/json"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{PAGE_PATH}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with _browser() as b:
        yield b


@pytest.fixture
def fixture_server() -> Iterator[_FixtureServer]:
    srv = _FixtureServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _open(browser: Browser, url: str) -> Page:
    page = browser.page()
    page.goto(url)
    page.wait("document.readyState === 'complete'", 15)
    return page


def test_page_shows_the_data_as_text(browser: Browser, fixture_server: _FixtureServer) -> None:
    page = _open(browser, fixture_server.url)
    page.wait(f"{JS_ROW_TEXT}('default/reviews')", 15, message="no reviews row")
    reviews = page.eval(f"{JS_ROW_TEXT}('default/reviews')")
    # Labels with their owning plugin; the hostile label value is shown as the text it is.
    assert "traffic.lb.policy=RING_HASH" in reviews and "lb" in reviews
    assert f"traffic.test.note={XSS}" in reviews
    assert page.eval("document.querySelectorAll('img').length") == 0 and page.eval("window.__pwned") is None
    # Numbers as given; null is "no data yet", never a number.
    assert page.eval(f"{JS_CELL}('default/reviews', 'rps')") == "2.50 req/s"
    assert page.eval(f"{JS_CELL}('default/reviews', 'error_rate')") == "4.0 %"
    assert "no data yet" in reviews  # p99 and the second upstream's weight and rate
    assert "reviews-v1-abc" in reviews and "weight 100" in reviews
    # Plugin columns: named by the data's upstream_columns (the heading too), values as text.
    assert f"zone {XSS}" in reviews
    head = "document.getElementById('upstreams-head').innerText"
    assert page.eval(head) == "Upstream pods (weight, zone, rate, errors)"
    assert page.eval(f"{JS_CELL}('default/ratings', 'rps')") == "no data yet"
    # Trace links: productpage's http URL is a link, reviews' javascript: URL is not.
    links = page.eval("[...document.querySelectorAll('#services a')].map(a => [a.closest('tr').dataset.service, a.href])")
    assert links == [["default/productpage", "http://127.0.0.1:9411/zipkin/?serviceName=productpage"]]
    # The graph: both edges drawn with their rates, nodes named.
    edge = page.eval(f"{JS_EDGE}('default/productpage', 'default/reviews')")
    assert edge and edge["label"].startswith("2.50 req/s") and edge["w"] > 10
    assert sorted(page.eval(JS_NODE_NAMES)) == ["productpage", "ratings", "reviews"]
    # Proxies, events, routes.
    proxies = page.eval("document.querySelector('#proxies tbody').innerText")
    assert "productpage-v1-x.default" in proxies and "NACK" in proxies and "clusters: bad <b>cluster</b>" in proxies
    assert "SYNCED" in proxies
    events = page.eval("document.querySelector('#events tbody').innerText")
    assert "InvalidTrafficLabel" in events and XSS in events
    assert page.eval("document.querySelectorAll('#events b, #proxies b').length") == 0
    routes = page.eval("document.querySelector('#routes tbody').innerText")
    assert "bookinfo" in routes and "PathPrefix /productpage" in routes
    assert "envoy-stats" in page.eval("document.getElementById('status').innerText")

    # Live: a change shows within a poll or two.
    fixture_server.data["services"][2]["rps"] = 7.25
    page.wait(f"{JS_CELL}('default/ratings', 'rps') === '7.25 req/s'", 10, message="the page did not update")
    fixture_server.data["upstream_columns"] = []  # e.g. the lb plugin deselected: no weight on the page
    page.wait(f"{head} === 'Upstream pods (rate, errors)'", 10, message="the columns did not update")
    assert "weight" not in page.eval(f"{JS_ROW_TEXT}('default/reviews')")


def test_page_shows_the_fetch_error_and_recovers(browser: Browser, fixture_server: _FixtureServer) -> None:
    page = _open(browser, fixture_server.url)
    page.wait(f"{JS_ROW_TEXT}('default/reviews')", 15)
    fixture_server.fail = (401, "missing or wrong bearer token")
    text = page.wait("(e => e.hidden ? '' : e.innerText)(document.getElementById('error'))", 10)
    assert "HTTP 401: missing or wrong bearer token" in text and "showing data from" in text
    assert page.eval(f"{JS_ROW_TEXT}('default/reviews')")  # the last data stays
    fixture_server.fail = None
    page.wait("document.getElementById('error').hidden", 10, message="the error stayed after recovery")


def test_page_shows_an_unreachable_control_plane(browser: Browser) -> None:
    srv = _FixtureServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    page = _open(browser, srv.url)
    page.wait(f"{JS_ROW_TEXT}('default/reviews')", 15)
    srv.shutdown()
    srv.server_close()
    text = page.wait("(e => e.hidden ? '' : e.innerText)(document.getElementById('error'))", 15)
    assert "control plane is unreachable" in text, text


def test_page_before_any_data(browser: Browser, fixture_server: _FixtureServer) -> None:
    fixture_server.data = {"generated": 1796601600, "source": "envoy-stats", "window_s": 10, "services": [
        {"namespace": "default", "name": "details", "labels": [], "rps": None, "error_rate": None, "p50_ms": None,
         "p99_ms": None, "upstreams": [], "traces_url": None}], "edges": [], "proxies": [], "events": [], "routes": []}
    page = _open(browser, fixture_server.url)
    row = page.wait(f"{JS_ROW_TEXT}('default/details')", 15)
    assert row.count("no data yet") == 4
    assert "no proxies connected" in page.eval("document.querySelector('#proxies tbody').innerText")


class _State:
    """An admin state with only dashboard data (the routes under test read nothing else)."""

    def dashboard_data(self) -> dict[str, Any]:
        return FIXTURE


def test_page_through_the_token_proxy(browser: Browser) -> None:
    """An admin endpoint with a bearer token: the browser alone gets 401; through ``trafficmgr dashboard``'s
    proxy (which adds the token) the page loads and shows the data."""
    token = "dashboard-test-token-0123456789"
    with AdminServer(_State(), "127.0.0.1", 0, token=token) as admin:  # type: ignore[arg-type]
        page = _open(browser, f"{admin.url}{PAGE_PATH}")
        assert "missing or wrong bearer token" in page.eval("document.body.innerText")
        proxy = DashboardProxy(admin.url, token)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            page = _open(browser, proxy.url)
            assert "default/reviews" in page.wait("[...document.querySelectorAll('#services tr')]"
                                                  ".map(r => r.dataset.service).join(' ')", 15)
            assert page.eval(f"{JS_CELL}('default/reviews', 'rps')") == "2.50 req/s"
            assert page.eval("document.getElementById('error').hidden")
        finally:
            proxy.shutdown()
            proxy.server_close()


# -- the page against trafficmgr demo ----------------------------------------------------------------

NACK_PLUGIN = '''"""Test-only: a Service labelled traffic.test.break=true gets a cluster Envoy rejects."""
from trafficmgr.testing.kit import NackingPlugin

TRAFFICMGR_REQUIRES = ">=0.1"
plugin = NackingPlugin("traffic.test.break")
'''


def _nack_plugin_dir(root: Path) -> Path:
    """A plugin directory as ``pip install --target`` leaves it (module + dist-info with the entry point)."""
    d = root / "plugins"
    (d / "dashnack").mkdir(parents=True)
    (d / "dashnack" / "__init__.py").write_text(NACK_PLUGIN)
    info = d / "trafficmgr_dashnack-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trafficmgr-dashnack\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[trafficmgr.plugins]\ndashnack = dashnack:plugin\n")
    return d


def _get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "127.0.0.1"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        missing("kubectl not installed")
    if find_chromium() is None:
        missing("chromium not installed (apt install chromium; .ci/install.d/chromium.apt)")
    root = tmp_path_factory.mktemp("dashboard")
    state = root / "state"
    a, b = random.randrange(100, 200), random.randrange(0, 254)
    ports = {name: free_port() for name in ("http", "https", "admin", "xds", "serve_admin", "zipkin", "api", "gateway_api")}
    argv = [sys.executable, "-m", "trafficmgr", "demo", "--state-dir", str(state),
            "--http-port", str(ports["http"]), "--https-port", str(ports["https"]), "--admin-port", str(ports["admin"]),
            "--xds-port", str(ports["xds"]), "--serve-admin-port", str(ports["serve_admin"]),
            "--zipkin-port", str(ports["zipkin"]), "--api-port", str(ports["api"]),
            "--gateway-api-port", str(ports["gateway_api"]),
            "--pod-cidr", f"127.{a}.{b}.0/24", "--service-cidr", f"127.{a}.{b + 1}.0/24"]
    env = {**os.environ, "TRAFFICMGR_PLUGIN_PATH": str(_nack_plugin_dir(root))}
    env.pop("TRAFFICMGR_PLUGINS", None)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: any(ln.startswith("export KUBECONFIG=") for ln in lines) or proc.poll() is not None, 120, 0.2)
        assert proc.poll() is None, "demo exited:\n" + "\n".join(lines)
        ready = next(ln for ln in lines if ln.startswith("ready"))
        kubeconfig = next(ln for ln in lines if ln.startswith("export KUBECONFIG="))[len("export KUBECONFIG="):]
        yield {"ports": ports, "ready": ready, "kubectl": Kubectl(kubeconfig), "lines": lines}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        subprocess.run([sys.executable, "-m", "trafficmgr", "proxies", "--runtime", "local", "--state-dir",
                        str(state / "sidecars"), "--remove-all"], capture_output=True, timeout=60)
        from trafficmgr.local.processes import kill_leftovers

        kill_leftovers(str(state.resolve()))


class _Traffic:
    """GET /productpage on the gateway (productpage calls details and reviews) every ~0.2 s until stopped."""

    def __init__(self, port: int) -> None:
        self.port, self.ok, self.failed = port, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if _get(self.port, "/productpage")[0] == 200:
                    self.ok += 1
                else:
                    self.failed += 1
            except OSError:
                self.failed += 1
            self.stop.wait(0.2)

    def __enter__(self) -> _Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)


def _artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("TRAFFICMGR_TEST_ARTIFACTS")
    path = Path(configured) if configured else tmp_path_factory.getbasetemp() / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.envoy
def test_dashboard_against_the_demo(demo: dict[str, Any], browser: Browser,
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    admin = demo["ports"]["serve_admin"]
    url = f"http://127.0.0.1:{admin}{PAGE_PATH}"
    assert f"{url} (dashboard)" in demo["ready"], demo["ready"]
    # Sidecars for bookinfo (the README's walkthrough): the sidecars' stats are where the numbers come from.
    demo["kubectl"]("label", "deployment", *BOOKINFO, "traffic.envoy.enabled=true", "--overwrite")
    demo["kubectl"]("label", "svc", "reviews", "traffic.lb.policy=LEAST_REQUEST", "--overwrite")

    def sidecars() -> int:
        status, body = _get(admin, DATA_PATH)
        return sum(1 for p in json.loads(body)["proxies"] if p.get("view") == "sidecar") if status == 200 else 0

    wait_for(lambda: sidecars() >= len(BOOKINFO) + 1, 120, 1, message="the bookinfo sidecars did not connect")
    with _Traffic(demo["ports"]["http"]) as traffic:
        page = _open(browser, url)
        row = f"{JS_ROW_TEXT}('default/reviews')"
        # Service rows for bookinfo.
        for name in ("productpage", "details", "reviews", "ratings"):
            page.wait(f"{JS_ROW_TEXT}('default/{name}')", 60, message=f"no row for {name}")
        # A non-zero request rate for reviews while requests flow (rates need two readings of the counters).
        page.wait(f"(t => t && t.endsWith('req/s') && parseFloat(t) > 0)({JS_CELL}('default/reviews', 'rps'))", 90,
                  message=lambda: f"reviews' request rate never became non-zero: {page.eval(row)}")
        rps = _rate(page.eval(f"{JS_CELL}('default/reviews', 'rps')"))
        assert rps is not None and rps > 0
        # Its traffic labels with the plugin owning each.
        labels = page.eval("[...document.querySelectorAll('#services tr[data-service=\"default/reviews\"] .label')]"
                           ".map(l => [l.firstChild.textContent, l.querySelector('.plugin').textContent])")
        assert ["traffic.lb.policy=LEAST_REQUEST", "lb"] in labels, labels
        # The graph edge productpage -> reviews, drawn on screen with its rate.
        edge = page.wait(f"{JS_EDGE}('default/productpage', 'default/reviews')", 60,
                         message="no graph edge productpage -> reviews")
        assert edge["w"] + edge["h"] > 10 and "req/s" in edge["label"], edge
        assert "productpage \u2192 reviews" in edge["title"]
        assert {"productpage", "reviews"} <= set(page.eval(JS_NODE_NAMES))
        # A bad plugin output: the cluster of ratings becomes one Envoy rejects; the page shows the NACK.
        demo["kubectl"]("label", "svc", "ratings", "traffic.test.break=true", "--overwrite")
        try:
            nack = page.wait("[...document.querySelectorAll('#proxies td.nack-cell .nack')].map(n => n.innerText)"
                             ".find(t => t.includes('cluster provided LB specified'))", 60,
                             message=lambda: "no NACK shown: " + str(page.eval("document.querySelector('#proxies').innerText")))
            assert "Error adding/updating cluster(s)" in nack and "|default|ratings" in nack, nack
            assert "NACK" in page.eval("document.querySelector('#proxies tbody').innerText")
            assert traffic.ok > 0
            out = page.screenshot(_artifact_dir(tmp_path_factory) / "dashboard.png", full_page=True)
            print(f"dashboard screenshot: {out}")
            if os.environ.get("TRAFFICMGR_UPDATE_SCREENSHOT") == "1":
                DOC_IMAGE.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out, DOC_IMAGE)
        finally:
            demo["kubectl"]("label", "svc", "ratings", "traffic.test.break-")
