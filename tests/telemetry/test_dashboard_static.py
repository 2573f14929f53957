"""The admin endpoint's dashboard routes without Envoy: the page's files (``/dashboard/``: types, no
directory traversal, the token rule of ``/debug/*``) and the data document when no numbers exist."""

from __future__ import annotations

import argparse
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trafficmgr.core.admin import STATIC_DIR, AdminServer, static_file
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.model import Endpoint, Labels, Model, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost

TOKEN = "s3cret-token-0123456789"


def _get(server: AdminServer, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:  # http.client sends the path as given: no client-side normalisation of "..".
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    root = tmp_path / "static"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><title>t</title>")
    (root / "app.js").write_text("console.log(1)")
    (root / ".hidden.js").write_text("no")
    (root / "notes.py").write_text("no")
    (tmp_path / "secret.js").write_text("outside")
    (root / "link.js").symlink_to(tmp_path / "secret.js")
    return root


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    cp = ControlPlane(PluginHost.load(["lb"]), argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0"))
    yield cp
    cp.stop()


@pytest.fixture
def admin(plane: ControlPlane, static_dir: Path) -> Iterator[AdminServer]:
    with AdminServer(plane, "127.0.0.1", 0, static_dir=static_dir) as server:
        yield server


def test_page_files_and_types(admin: AdminServer) -> None:
    status, headers, _ = _get(admin, "/dashboard")
    assert status == 301 and headers["location"] == "/dashboard/"
    status, headers, body = _get(admin, "/dashboard/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8" and body.startswith(b"<!doctype")
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    status, headers, body = _get(admin, "/dashboard/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and body == b"console.log(1)"


@pytest.mark.parametrize("path", [
    "/dashboard/../static/app.js", "/dashboard/../secret.js", "/dashboard/%2e%2e/secret.js", "/dashboard/..%2fsecret.js",
    "/dashboard/.hidden.js", "/dashboard/notes.py", "/dashboard/link.js", "/dashboard//app.js", "/dashboard/app.js/",
    "/dashboard/missing.js", "/dashboard/a\\..\\secret.js",
])
def test_no_file_outside_the_allow_list(admin: AdminServer, path: str) -> None:
    status, _, body = _get(admin, path)
    assert status == 404, (path, body)
    assert b"outside" not in body and b"no" != body


def test_static_file_refuses_dot_dot_directly() -> None:
    assert static_file("../admin.py") is None and static_file("..") is None and static_file("a/../index.html") is None
    assert static_file("", STATIC_DIR) is not None  # the real page exists (trafficmgr/dashboard/static)


def test_page_and_data_need_the_token_when_one_is_set(plane: ControlPlane, static_dir: Path) -> None:
    with AdminServer(plane, "127.0.0.1", 0, token=TOKEN, static_dir=static_dir) as server:
        for path in ("/dashboard/", "/dashboard/app.js", "/debug/dashboard/data"):
            assert _get(server, path)[0] == 401, path
            assert _get(server, path, "wrong-token-0123456789")[0] == 401, path
            assert _get(server, path, TOKEN)[0] == 200, path
        assert _get(server, "/healthz")[0] == 200  # unchanged: no token for health


def test_metrics_endpoint_serves_no_dashboard(plane: ControlPlane, static_dir: Path) -> None:
    from trafficmgr.core.admin import METRICS_ROUTES

    with AdminServer(plane, "127.0.0.1", 0, routes=METRICS_ROUTES, static_dir=static_dir, flag="--metrics-port") as server:
        assert _get(server, "/dashboard/")[0] == 404 and _get(server, "/debug/dashboard/data")[0] == 404


def test_no_numbers_without_readings(admin: AdminServer, plane: ControlPlane) -> None:
    """Before any build: empty lists. Then a meshed pod whose stats nobody answers (nothing listens on
    its stats port): the service row exists, every number is null, no edge, twice in a row."""
    status, _, body = _get(admin, "/debug/dashboard/data")
    data = json.loads(body)
    assert status == 200 and data["services"] == [] and data["edges"] == [] and data["proxies"] == []
    port = ServicePort("http", 9080, 9080)
    svc = Service("default", "reviews", (port,), "10.96.0.9", Labels({"traffic.port.9080": "http"}))
    pod = Pod("default", "reviews-1", "127.0.0.1", ready=True, sidecar=True, ips=("127.0.0.1",))
    ep = Endpoint("127.0.0.1", 9080, pod="reviews-1", namespace="default")
    plane.options.dashboard_stats_port = 9  # discard: nothing listens, connection refused
    plane.publish_model(Model(services={svc.key: svc}, endpoints={("default", "reviews", "http"): (ep,)},
                              pods={pod.key: pod}))
    for _ in range(2):
        data: dict[str, Any] = json.loads(_get(admin, "/debug/dashboard/data")[2])
        row = data["services"][0]
        assert (row["name"], row["rps"], row["error_rate"], row["p50_ms"], row["p99_ms"]) == ("reviews", None, None, None, None)
        # The lb plugin's column: an unlabeled pod has the default weight (a known value, not "no data").
        assert row["upstreams"] == [{"pod": "reviews-1", "address": "127.0.0.1:9080", "weight": 100, "rps": None,
                                     "error_rate": None}]
        assert data["upstream_columns"] == [{"name": "weight", "title": "weight"}]
        assert data["edges"] == [] and data["source"] == "envoy-stats"
        plane._scraper.min_interval = 0  # noqa: SLF001 - read again at once


def test_stats_port_zero_reads_nothing(admin: AdminServer, plane: ControlPlane) -> None:
    port = ServicePort("http", 9080, 9080)
    svc = Service("default", "reviews", (port,), "10.96.0.9")
    pod = Pod("default", "reviews-1", "127.0.0.1", ready=True, sidecar=True, ips=("127.0.0.1",))
    plane.options.dashboard_stats_port = 0
    plane.publish_model(Model(services={svc.key: svc}, pods={pod.key: pod}))
    data = json.loads(_get(admin, "/debug/dashboard/data")[2])
    assert data["source"] == "none" and data["services"][0]["rps"] is None
    assert plane._scraper.readings == {} and plane._scraper.errors == {}  # noqa: SLF001 - nothing was read
