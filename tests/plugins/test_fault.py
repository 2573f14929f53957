"""fault plugin: the original README's fault-injection walkthrough and more, through a real sidecar Envoy
(LocalCluster), plus the contract that only sidecars get the filter (the ingress gateway ignores faults)."""

from __future__ import annotations

import argparse
import json
import math
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from envoy.config.route.v3 import route_components_pb2

from tests.plugins.reviews import PODS, assert_no_nacks, request_reviews, reviews_url, route_has, start_reviews
from trafficmgr.core.kube.events import INVALID_LABEL
from trafficmgr.core.model import GATEWAY, SIDECAR, Labels, Model, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.plugins import fault
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.kit import BuildResult, SidecarMesh
from trafficmgr.testing.netns import require as _require_netns

FAULT_LABELS = ("traffic.fault.delay.time", "traffic.fault.delay.percentage",
                "traffic.fault.abort.status", "traffic.fault.abort.percentage")


@pytest.fixture(params=["sotw", "delta"])
def cluster(request: pytest.FixtureRequest, envoy_binary: str) -> Iterator[LocalCluster]:
    """One reviews pod behind the reviews Service, in both xDS modes."""
    _require_netns()
    c = start_reviews(request.param == "delta", {"reviews-1": PODS["reviews-1"]})
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def sotw(envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    c = start_reviews(False, {"reviews-1": PODS["reviews-1"]})
    try:
        yield c
    finally:
        c.close()


def _fault_config(c: LocalCluster) -> dict | None:
    """The fault filter's per-virtual-host config for reviews in the sidecar's route dump."""
    dump = json.loads(c.pod.admin("/config_dump?resource=dynamic_route_configs"))
    for rc in dump.get("configs", []):
        for vh in rc.get("route_config", {}).get("virtual_hosts", []):
            if vh.get("name", "").startswith("reviews.default:"):
                return vh.get("typed_per_filter_config", {}).get(fault.FILTER_NAME)
    return None


def test_readme_walkthrough_delay_abort_restore(sotw: LocalCluster) -> None:
    """The original README, with its values: delay 3 s at 100 %, then also abort 505 at 100 %, then the
    four labels removed (in the README's order) restore normal answers."""
    c = sotw
    backend = c.backends[0]
    c.label("service", "reviews", {"traffic.fault.delay.time": "3000"})
    c.label("service", "reviews", {"traffic.fault.delay.percentage": "100"})
    c.wait_config(lambda: (_fault_config(c) or {}).get("delay", {}).get("fixed_delay") == "3s", message="delay not configured")
    status, _, seconds = request_reviews(c)
    assert status == 200
    assert 2.9 <= seconds < 5, seconds
    c.label("service", "reviews", {"traffic.fault.abort.status": "505"})
    c.label("service", "reviews", {"traffic.fault.abort.percentage": "100"})
    c.wait_config(lambda: (_fault_config(c) or {}).get("abort", {}).get("http_status") == 505, message="abort not configured")
    hits = backend.hits
    status, _, seconds = request_reviews(c)
    assert status == 505
    assert 2.9 <= seconds < 5, seconds  # the delay comes first, then the abort
    assert backend.hits == hits, "an aborted request must not reach the backend"
    for key in ("traffic.fault.abort.percentage", "traffic.fault.abort.status",
                "traffic.fault.delay.percentage", "traffic.fault.delay.time"):
        c.label("service", "reviews", {key: None})
    c.wait_config(lambda: _fault_config(c) is None, message="fault config not removed")
    status, _, seconds = request_reviews(c)
    assert status == 200
    assert seconds < 2.0, seconds  # the 3 s delay is gone (bound loose for a loaded machine)
    assert_no_nacks(c)


def _statuses(c: LocalCluster, n: int) -> Counter[int]:
    url = reviews_url(c)

    def run() -> Counter[int]:
        seen: Counter[int] = Counter()
        for _ in range(n):
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    resp.read()
                    seen[resp.status] += 1
            except urllib.error.HTTPError as exc:
                exc.read()
                seen[exc.code] += 1
        return seen

    return c.pod.in_ns(run)


def test_half_of_requests_aborted(cluster: LocalCluster) -> None:
    c = cluster
    c.label("service", "reviews", {"traffic.fault.abort.status": "502", "traffic.fault.abort.percentage": "50"})
    c.wait_config(lambda: (_fault_config(c) or {}).get("abort", {}).get("percentage", {}).get("numerator") == 500000,
                  message="abort not configured")
    n = 400
    seen = _statuses(c, n)
    assert set(seen) == {200, 502}, seen
    # Envoy draws each request independently: aborted ~ Binomial(400, 0.5), sd = 10. Six sd (60) is
    # exceeded with probability ~2e-9, and still catches 0 %, 100 % or a 25 % share (100 +- 60 misses).
    sd = math.sqrt(n * 0.5 * 0.5)
    assert abs(seen[502] - n / 2) < 6 * sd, seen
    assert c.pod.stat("http.outbound_9080.fault.aborts_injected") == seen[502]
    assert c.backends[0].hits == seen[200], "aborted requests must not reach the backend"
    assert_no_nacks(c)


def test_status_or_time_alone_does_nothing_percentage_alone_aborts_503(cluster: LocalCluster) -> None:
    c = cluster
    # A status without a percentage and a delay without a percentage inject nothing. The route timeout
    # (another label) is set at the same time so we know when the sidecar has this version.
    c.label("service", "reviews", {"traffic.fault.abort.status": "500", "traffic.fault.delay.time": "2000",
                                   "traffic.request.timeout": "9000"})
    c.wait_config(lambda: route_has(c, '"timeout":"9s"'), message="route timeout not applied")
    assert _fault_config(c) is None
    status, _, seconds = request_reviews(c)
    assert status == 200 and seconds < 1.5, seconds  # no 2 s delay (bound loose for a loaded machine)
    # A percentage alone aborts with 503.
    c.label("service", "reviews", {"traffic.fault.abort.status": None, "traffic.fault.delay.time": None,
                                   "traffic.fault.abort.percentage": "100"})
    c.wait_config(lambda: _fault_config(c) is not None, message="abort not configured")
    hits = c.backends[0].hits
    code, body = c.pod.curl(reviews_url(c))
    assert (code, body) == (503, "fault filter abort")
    assert c.backends[0].hits == hits
    assert_no_nacks(c)


def test_bad_values_give_events_and_no_nack(cluster: LocalCluster) -> None:
    c = cluster
    bad = {"traffic.fault.abort.status": "600", "traffic.fault.abort.percentage": "101", "traffic.fault.delay.time": "-1"}
    c.label("service", "reviews", {**bad, "traffic.fault.delay.percentage": "100", "traffic.request.timeout": "9000"})
    c.wait_config(lambda: route_has(c, '"timeout":"9s"'), message="route timeout not applied")

    def reported() -> set[str]:
        items = c.store.list("events", "default")["items"]
        return {key for e in items if e.get("reason") == INVALID_LABEL for key in bad if key in e.get("message", "")}

    c.wait_config(lambda: reported() == set(bad), message=f"Events missing for {set(bad) - reported()}")
    assert _fault_config(c) is None, "invalid values must not reach Envoy"
    assert request_reviews(c)[0] == 200
    # The invalid status is ignored, so a valid percentage aborts with the default 503; a delay beyond
    # what Envoy can hold is clamped (ten years) and accepted.
    c.label("service", "reviews", {"traffic.fault.abort.percentage": "100", "traffic.fault.delay.time": "99999999999999999999",
                                   "traffic.fault.delay.percentage": "0.0001"})
    c.wait_config(lambda: (_fault_config(c) or {}).get("delay", {}).get("fixed_delay") == "315360000s", message="no clamped delay")
    assert request_reviews(c)[0] == 503
    assert_no_nacks(c)


def test_filter_only_for_sidecars_once_per_connection_manager(trafficmgr_build: Callable[..., BuildResult]) -> None:
    """``trafficmgr_http_filters`` adds one no-op fault filter (order 100, before rate limits) to sidecar connection
    managers only; the virtual-host hook configures nothing for the gateway (it ignores faults)."""
    plugins = PluginHost.load(["fault"])
    labels = Labels({"traffic.fault.abort.percentage": 100.0, "traffic.fault.abort.status": 505})
    port = ServicePort("http", 9080, 9080, "http")
    svc = Service("default", "reviews", (port,), "10.96.0.1", labels)

    def ctx(role: str) -> BuildContext:
        return BuildContext(role, Model(), argparse.Namespace(), reporter=lambda *a: None)

    filters = plugins.collect("trafficmgr_http_filters", ctx=ctx(SIDECAR))
    assert [(f.name, f.order) for f in filters] == [(fault.FILTER_NAME, fault.FILTER_ORDER)]
    assert filters[0].config.ByteSize() == 0, "the chain default must be a no-op"
    assert plugins.collect("trafficmgr_http_filters", ctx=ctx(GATEWAY)) == []
    for role, expected in ((SIDECAR, [fault.FILTER_NAME]), (GATEWAY, [])):
        vh = route_components_pb2.VirtualHost(name="reviews")
        plugins.mutate("trafficmgr_virtual_host", vh, service=svc, port=port, ctx=ctx(role))
        assert list(vh.typed_per_filter_config) == expected, role

    # Through the builder: every sidecar HTTP connection manager has the filter exactly once, before the
    # router, however many services are labelled.
    manifests = [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": "default",
                      "labels": {f"traffic.port.{p}": "http", "traffic.fault.abort.percentage": "10"}},
         "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": p}]}}
        for name, p in (("a", 8080), ("b", 8080), ("c", 9090))
    ]
    result = trafficmgr_build(manifests, plugins)
    assert result.warnings == []
    assert result.sidecar.http_filters() == [[fault.FILTER_NAME, "envoy.filters.http.router"]] * 3
    assert result.gateway.listeners == {}


def test_pod_labels_fault_traffic_addressed_to_the_pod(sotw: LocalCluster) -> None:
    c = sotw
    ip = PODS["reviews-1"]
    c.label("pod", "reviews-1", {"traffic.port.9080": "http", "traffic.fault.abort.status": "418",
                                 "traffic.fault.abort.percentage": "100"})
    c.wait_config(lambda: route_has(c, f'"{ip}:9080"', '"http_status":418'), message="pod fault not configured")
    assert c.pod.curl(f"http://{ip}:9080/direct")[0] == 418
    assert request_reviews(c)[0] == 200, "the Service has no fault labels"
    assert_no_nacks(c)


def test_gateway_view_has_no_fault_config(trafficmgr_build: Callable[..., BuildResult]) -> None:
    """With every built-in plugin (ingress included), an Ingress to a fault-labelled Service gets a gateway
    route without the fault filter or its config, while sidecars get both (the golden case's input)."""
    from tests.plugins.test_golden_plugins import HERE, builtin_plugins

    result = trafficmgr_build(HERE / "fault_injection.in.yaml", builtin_plugins())
    assert result.gateway.routes, "the Ingress must give the gateway a route"
    assert fault.FILTER_NAME not in result.render([GATEWAY])
    assert "http_status: 505" in result.render([SIDECAR])


# -- through the plugin kit (real Envoy on loopback, no root) ----------------------------------------

KIT_MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: ratings, labels: {traffic.port.9080: http}}
spec: {selector: {app: ratings}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-1, labels: {app: ratings}}
spec: {containers: [{name: app, image: ratings}]}
"""


def _delays_injected(mesh: SidecarMesh) -> int:
    """Delays Envoy's fault filter injected, over every connection manager of the sidecar."""
    return sum(v for k, v in mesh.stats().items() if k.endswith(".fault.delays_injected"))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_abort_delay_and_restore_through_the_kit(trafficmgr_envoy: Callable[..., SidecarMesh], delta: bool) -> None:
    mesh = trafficmgr_envoy(KIT_MANIFESTS, plugins=["fault"], delta=delta)
    assert mesh.get("ratings").status == 200
    mesh.label("service", "ratings", {"traffic.fault.abort.status": "418", "traffic.fault.abort.percentage": "100"})
    r = mesh.get("ratings")
    assert r.status == 418 and mesh.backends["ratings-1"].hits == 1, "an abort never reaches the pod"
    mesh.label("service", "ratings", {"traffic.fault.abort.status": None, "traffic.fault.abort.percentage": None,
                                      "traffic.fault.delay.time": "300", "traffic.fault.delay.percentage": "100"})
    r = mesh.get("ratings")
    # Envoy's timers fire up to a few ms early against the client's clock (seen: 298 ms for 300): allow
    # 20 ms; without the delay a request takes a few ms, far below 200.
    assert r.status == 200 and r.elapsed >= 0.28, r.elapsed
    delayed = _delays_injected(mesh)
    assert delayed == 1
    mesh.label("service", "ratings", {"traffic.fault.delay.time": None, "traffic.fault.delay.percentage": None})
    r = mesh.get("ratings")
    assert r.status == 200 and _delays_injected(mesh) == delayed, "no delay once the labels are gone"
    assert mesh.build is not None and mesh.build.warnings == []
