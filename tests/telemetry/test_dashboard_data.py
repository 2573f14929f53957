"""``GET /debug/dashboard/data`` against real Envoys with real traffic (issue 21).

One mesh for the module: ``productpage-1`` (meshed) calls ``reviews`` (pods ``reviews-1``, slow, and
``reviews-2``, failing first) through its sidecar's explicit proxy, as local mode's apps do. The control
plane reads the sidecars' stats-only listeners on their pod IPs; every number checked here comes from
those readings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr.core.plugins import PluginHost
from trafficmgr.testing.cluster import http_get
from trafficmgr.testing.kit import NackingPlugin

from .rig import Mesh, pod, service

pytestmark = pytest.mark.usefixtures("envoy_binary")

ERRORS = 6  # reviews-2 answers 500 to its first ERRORS requests
REQUESTS = 40


@pytest.fixture(scope="module")
def mesh(trafficmgr_envoy_binary: str) -> Iterator[Mesh]:
    m = Mesh(PluginHost.load(["lb", "ingress"], extra=[("nacking", NackingPlugin())]))
    try:
        pp, r1, r2 = m.ip(10), m.ip(11), m.ip(12)
        m.apply(service("productpage") + "---" + service("reviews"))
        m.apply(pod("productpage-1", "productpage", pp) + "---"
                + pod("reviews-1", "reviews", r1, sidecar=False, labels={"traffic.endpoint.weight": "80"}) + "---"
                + pod("reviews-2", "reviews", r2, sidecar=False, labels={"traffic.endpoint.weight": "20"}))
        m.backend("reviews-1", r1).set(delay=0.05)
        m.backend("reviews-2", r2).set(statuses=[500] * ERRORS)
        m.sidecar("productpage-1", pp)
        m.envoys["productpage-1"].wait_for(lambda: m.call(pp, "http://reviews:9080/") in (200, 500), 15,
                                           message="reviews not reachable through the sidecar")
        yield m
    finally:
        m.close()


def _service(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in data["services"] if s["name"] == name)


def test_golden_signals_and_edge_from_real_stats(mesh: Mesh) -> None:
    pp = mesh.ip(10)
    # Two readings are needed for a rate: the first answer after a quiet period has none yet.
    first = mesh.data()
    assert first["source"] == "envoy-stats" and first["window_s"] == 30.0
    reviews = _service(first, "reviews")
    assert {"rps", "error_rate", "p50_ms", "p99_ms", "upstreams", "labels", "traces_url"} <= set(reviews)
    statuses = [mesh.call(pp, "http://reviews:9080/") for _ in range(REQUESTS)]
    assert statuses.count(500) == ERRORS - 1 or statuses.count(500) == ERRORS  # the warm-up call may have taken one

    def ready(d: dict[str, Any]) -> bool:
        s = _service(d, "reviews")
        return bool(s["rps"]) and s["p99_ms"] is not None
    data = mesh.wait_data(ready, 25, message="reviews' rate and latency")
    reviews = _service(data, "reviews")
    assert reviews["rps"] > 0
    # The 5xx share of what the sidecar counted between the two readings (the warm-up call included).
    assert 0.1 < reviews["error_rate"] < 0.25
    # reviews-1 waits 50 ms: p99 is in its bucket or above, p50 at most p99 (Envoy's histogram buckets).
    assert reviews["p99_ms"] >= 40 and 0 <= reviews["p50_ms"] <= reviews["p99_ms"]
    edge = next(e for e in data["edges"] if e["to"] == "default/reviews")
    assert edge["from"] == "default/productpage" and edge["rps"] > 0 and edge["error_rate"] > 0
    # Upstreams: every pod with its weight label; rates null (local mode's sidecars have no inbound side).
    ups = {u["pod"]: u for u in reviews["upstreams"]}
    assert set(ups) == {"reviews-1", "reviews-2"}
    assert (ups["reviews-1"]["weight"], ups["reviews-2"]["weight"]) == (80, 20)
    assert data["upstream_columns"] == [{"name": "weight", "title": "weight"}]  # the lb plugin's column
    assert ups["reviews-1"]["address"] == f"{mesh.ip(11)}:9080" and ups["reviews-1"]["rps"] is None
    # Nobody called productpage: no rate, no latency, no edge into it (null, not 0).
    productpage = _service(data, "productpage")
    assert productpage["rps"] is None and productpage["p50_ms"] is None and productpage["error_rate"] is None
    assert not [e for e in data["edges"] if e["to"] == "default/productpage"]
    # Labels with the plugin that owns each.
    assert {"key": "traffic.port.9080", "value": "http", "plugin": "core"} in reviews["labels"]


def test_proxy_rows_and_last_nack(mesh: Mesh) -> None:
    rows = {p["node_id"]: p for p in mesh.data()["proxies"]}
    assert "productpage-1.default" in rows and rows["productpage-1.default"]["last_nack"] is None
    assert rows["productpage-1.default"]["replica"]  # a proxy-status row
    mesh.apply(service("broken", {"traffic.test.break": "true"}))

    def nacked(d: dict[str, Any]) -> bool:
        row = next((p for p in d["proxies"] if p["node_id"] == "productpage-1.default"), None)
        return bool(row and row["last_nack"])
    data = mesh.wait_data(nacked, 15, message="the NACK of the broken cluster")
    nack = next(p for p in data["proxies"] if p["node_id"] == "productpage-1.default")["last_nack"]
    assert nack["type"] == "clusters" and "broken" in nack["error"] and nack["time"] > 0


def test_invalid_label_is_a_warning_event(mesh: Mesh) -> None:
    mesh.label("service", "productpage", {"traffic.lb.policy": "sideways"})
    data = mesh.wait_data(lambda d: any(e["reason"] == "InvalidTrafficLabel" for e in d["events"]), 10,
                          message="InvalidTrafficLabel event")
    event = next(e for e in data["events"] if e["reason"] == "InvalidTrafficLabel")
    assert event["object"] == "Service/default/productpage" and event["type"] == "Warning"
    assert "sideways" in event["message"] and event["time"] > 0


def test_ingress_route_row(mesh: Mesh) -> None:
    mesh.store.create({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "bookinfo", "namespace": "default"}, "spec": {"ingressClassName": "traffic",
        "rules": [{"host": "bookinfo.example", "http": {"paths": [
            {"path": "/reviews", "pathType": "Prefix",
             "backend": {"service": {"name": "reviews", "port": {"number": 9080}}}}]}}]}})
    data = mesh.wait_data(lambda d: any(r["name"] == "bookinfo" for r in d["routes"]), 10, message="the Ingress row")
    row = next(r for r in data["routes"] if r["name"] == "bookinfo")
    assert row["kind"] == "Ingress" and row["namespace"] == "default"
    assert row["hosts"] == ["bookinfo.example"]
    assert row["matches"] == ["Prefix /reviews"] and row["backends"] == ["reviews:9080"]
    assert row["status"]


def test_gateway_calls_count_for_the_service_and_the_edge(mesh: Mesh) -> None:
    """The gateway's own stats (read on its pod IP, found from its xDS peer address) count its requests
    to productpage: productpage gets a rate, and the graph an edge from the gateway."""
    mesh.apply(pod("traffic-ingress-1", "traffic-ingress", mesh.gateway_ip, sidecar=False))
    mesh.backend("productpage-1", mesh.ip(10))
    mesh.store.create({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "front", "namespace": "default"},
        "spec": {"ingressClassName": "traffic", "rules": [{"host": "front.example", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "productpage", "port": {"number": 9080}}}}]}}]}})
    gw = mesh.gateway()
    url = f"http://{mesh.gateway_ip}:{mesh.gateway_port}/"
    gw.wait_for(lambda: http_get(url, headers={"Host": "front.example"})[0] == 200, 15, message="the gateway route")
    mesh.data()  # a first reading of the gateway
    for _ in range(10):
        assert http_get(url, headers={"Host": "front.example"})[0] == 200
    data = mesh.wait_data(lambda d: bool(_service(d, "productpage")["rps"]), 15, message="productpage's rate")
    edge = next(e for e in data["edges"] if e["to"] == "default/productpage")
    assert edge["from"] == "default/traffic-ingress" and edge["rps"] > 0 and edge["error_rate"] == 0
    assert _service(data, "productpage")["error_rate"] == 0
