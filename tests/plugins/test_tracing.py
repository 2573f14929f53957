"""tracing plugin: Zipkin spans from a real sidecar Envoy to the project's collector (trafficmgr.apps.zipkin)
running inside the pod network; sampling, service names, B3 propagation; options, bootstrap, gateway HCMs."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr.apps.zipkin import ZipkinCollector
from trafficmgr.core.model import GATEWAY, SIDECAR, Model
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.plugins import tracing
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.golden import build_from_manifests, render
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns

REVIEWS_IP = "10.244.0.11"
COLLECTOR_IP = "10.244.0.50"  # a pod address: the collector runs inside the sidecar's network namespace
MANIFESTS = join(service("reviews"), pod("reviews-1", REVIEWS_IP, "reviews"))
LABELS = (tracing.ENABLED, tracing.SAMPLING)


class Rig:
    def __init__(self, cluster: LocalCluster, collector: ZipkinCollector) -> None:
        self.c = cluster
        self.zipkin = collector

    @property
    def backend(self) -> Any:
        return self.c.backends[0]

    def requests(self, n: int) -> list[dict[str, str]]:
        """``n`` GETs to reviews from the client pod; the request headers the backend saw, in order."""
        before = self.backend.hits
        answers = self.c.pod.get_many(self.c.cluster_ip("reviews"), 9080, "reviews:9080", n, "/reviews/0", timeout=10)
        assert [status for status, _ in answers] == [200] * n
        assert self.backend.hits == before + n
        return [r["headers"] for r in list(self.backend.requests)[-n:]]

    def hcm_traced(self) -> bool:
        """The outbound chain of reviews traces (the inbound listener always has the tracer, at 0 %)."""
        return "envoy.tracers.zipkin" in self.c.pod.listener_config("outbound")

    def wait_spans(self, count: int, message: str = "") -> list[dict[str, Any]]:
        return self.c.wait_config(lambda: len(self.zipkin.spans()) == count and self.zipkin.spans(), timeout=10,
                                  message=message or f"expected {count} spans, have {len(self.zipkin.spans())}")


@pytest.fixture(scope="module", params=["sotw", "delta"])
def rig_module(request: pytest.FixtureRequest, envoy_binary: str) -> Iterator[Rig]:
    _require_netns()
    # Flush every span (bootstrap runtime through trafficmgr_bootstrap): no 5-span / 5 s buffering.
    options = argparse.Namespace(zipkin_address=f"{COLLECTOR_IP}:9411", zipkin_flush_spans=1)
    with LocalCluster([REVIEWS_IP, COLLECTOR_IP], options=options, delta=request.param == "delta") as c:
        collector = c.pod.in_ns(lambda: ZipkinCollector(host=COLLECTOR_IP, port=9411).start())
        try:
            c.backend("reviews", REVIEWS_IP, 9080)
            c.apply(MANIFESTS)
            yield Rig(c, collector)
        finally:
            collector.stop()


@pytest.fixture
def rig(rig_module: Rig) -> Iterator[Rig]:
    rig_module.c.label("service", "reviews", dict.fromkeys(LABELS))
    rig_module.c.wait_config(lambda: not rig_module.hcm_traced() and rig_module.c.cp.nacks() == [],
                             message="tracing not removed")
    rig_module.zipkin.clear()
    rig_module.backend.reset()
    yield rig_module


def test_bootstrap_flushes_every_span_and_names_the_service(rig: Rig) -> None:
    config = rig.c.pod.config_path.read_text()
    assert '"tracing.zipkin.min_flush_spans": 1' in config and '"cluster": "client.default"' in config


def test_spans_carry_service_names_and_b3_reaches_the_backend(rig: Rig) -> None:
    rig.c.label("service", "reviews", {tracing.ENABLED: "true"})
    rig.c.wait_config(rig.hcm_traced, message="no tracing on the reviews chain")
    headers = rig.requests(5)
    spans = rig.wait_spans(5)
    trace_ids = {h["x-b3-traceid"] for h in headers}
    assert all(h.get("x-b3-sampled") == "1" for h in headers), headers
    assert trace_ids == {s["traceId"] for s in spans} and len(trace_ids) == 5
    for span in spans:
        assert span["localEndpoint"]["serviceName"] == "client.default", span  # the client sidecar's node id
        assert span["tags"]["upstream_cluster"] == "9080|default|reviews.outbound", span
        assert span["kind"] == "CLIENT" and span["tags"]["http.status_code"] == "200", span
    assert rig.zipkin.store.services() == ["client.default"]
    assert rig.zipkin.store.trace(spans[0]["traceId"]) == [spans[0]]
    assert rig.c.cp.nacks() == []


def test_sampling_50_traces_about_half(rig: Rig) -> None:
    rig.c.label("service", "reviews", {tracing.ENABLED: "true", tracing.SAMPLING: "50"})
    rig.c.wait_config(lambda: '"value": 50' in rig.c.pod.listener_config("outbound"),
                      message="sampling 50 not applied")
    n = 200
    headers = rig.requests(n)
    sampled = sum(h.get("x-b3-sampled") == "1" for h in headers)
    spans = rig.wait_spans(sampled, message="one span per sampled request expected")
    assert all("x-b3-traceid" in h for h in headers), "B3 headers are propagated for unsampled requests too"
    # Binomial(200, 0.5): sd = sqrt(200 * 0.25) ~ 7.1; +-6 sd (58..142) fails with probability ~2e-9,
    # and still catches sampling 100 or 0 (200 / 0) and any mix-up of percent vs fraction.
    sd = math.sqrt(n * 0.5 * 0.5)
    print(f"sampling 50: {len(spans)} of {n} requests traced")
    assert abs(len(spans) - n / 2) < 6 * sd, f"{len(spans)} of {n} sampled"
    assert len({s["traceId"] for s in spans}) == len(spans)
    assert rig.c.cp.nacks() == []


def test_tracing_off_sends_no_spans_and_no_b3(rig: Rig) -> None:
    headers = rig.requests(10)
    assert not any("x-b3-traceid" in h for h in headers), headers[0]
    # A bad value is reported and ignored (no tracing), never NACKed.
    rig.c.label("service", "reviews", {tracing.ENABLED: "yes", tracing.SAMPLING: "150"})
    rig.c.wait_config(lambda: any(e.get("reason") == "InvalidTrafficLabel" and tracing.SAMPLING in e.get("message", "")
                                  for e in rig.c.store.list("events", "default")["items"]), message="no Warning Event")
    headers = rig.requests(10)
    assert not any("x-b3-traceid" in h for h in headers) and not rig.hcm_traced()
    # Barrier instead of a sleep: spans are flushed one by one in order, so once the traced request's
    # span has arrived, any span of the 20 untraced requests would have arrived before it.
    rig.c.label("service", "reviews", {tracing.ENABLED: "true", tracing.SAMPLING: None})
    rig.c.wait_config(rig.hcm_traced, message="tracing not enabled")
    rig.requests(1)
    assert len(rig.wait_spans(1)) == 1
    rig.c.label("service", "reviews", {tracing.ENABLED: None})
    rig.c.wait_config(lambda: not rig.hcm_traced(), message="tracing not removed")
    headers = rig.requests(5)
    assert not any("x-b3-traceid" in h for h in headers)
    assert rig.c.cp.nacks() == []


# -- without a real Envoy: options, bootstrap, shared (gateway) connection managers, no collector --------


def test_add_arguments_validates_the_address() -> None:
    parser = argparse.ArgumentParser()
    tracing.trafficmgr_add_arguments(parser, command="agent")
    args = parser.parse_args(["--zipkin-address", "zipkin.tracing:9411", "--zipkin-flush-spans", "1"])
    assert (args.zipkin_address, args.zipkin_flush_spans, args.zipkin_flush_interval) == ("zipkin.tracing:9411", 1, 5000)
    assert tracing.parse_address("[fd00::1]:9411") == ("fd00::1", 9411)
    for bad in ("zipkin", "zipkin:0", "zipkin:x", ":9411", "a b:1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--zipkin-address", bad])


def test_serve_parser_gets_the_options_from_the_plugin_hook() -> None:
    host = PluginHost.load(["tracing"])
    parser = argparse.ArgumentParser()
    host.call_all("trafficmgr_add_arguments", parser=parser, command="serve")
    assert parser.parse_args(["--zipkin-address", "10.0.0.1:9411"]).zipkin_address == "10.0.0.1:9411"


def test_bootstrap_hook() -> None:
    base = lambda cluster: {"node": {"id": "web-1.shop", "cluster": cluster},  # noqa: E731
                            "layered_runtime": {"layers": [{"name": "static", "static_layer": {}}]}}
    defaults = argparse.Namespace(zipkin_address="z:9411", zipkin_flush_spans=5, zipkin_flush_interval=5000)
    cfg = base("sidecar")
    tracing.trafficmgr_bootstrap(cfg, SIDECAR, defaults)
    assert cfg["layered_runtime"]["layers"][0]["static_layer"] == {}  # Envoy's defaults are not repeated
    assert cfg["node"]["cluster"] == "web-1.shop"
    cfg = base("traffic-ingress")
    tracing.trafficmgr_bootstrap(cfg, GATEWAY, argparse.Namespace(zipkin_address="z:9411", zipkin_flush_spans=1, zipkin_flush_interval=200))
    assert cfg["layered_runtime"]["layers"][0]["static_layer"] == {"tracing.zipkin.min_flush_spans": 1,
                                                                   "tracing.zipkin.flush_interval_ms": 200}
    assert cfg["node"]["cluster"] == "traffic-ingress"  # gateways are found by their node cluster
    cfg = base("sidecar")
    tracing.trafficmgr_bootstrap(cfg, SIDECAR, argparse.Namespace())
    assert cfg == base("sidecar"), "no options: nothing changes"


def _ctx(role: str, options: argparse.Namespace) -> BuildContext:
    return BuildContext(role, Model(), options, reporter=lambda *a: None)


def test_shared_connection_manager_traces_only_routes_of_traced_services() -> None:
    """An HCM without a service (the gateway's) gets tracing at 0 %; routes of traced services
    carry their sampling."""
    from envoy.config.route.v3.route_components_pb2 import Route
    from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
        HttpConnectionManager,
    )

    from trafficmgr.core.model import Labels, Service, ServicePort

    ctx = _ctx(GATEWAY, argparse.Namespace(zipkin_address="10.0.0.9:9411"))
    hcm = HttpConnectionManager(stat_prefix="ingress_http")
    tracing.trafficmgr_http_connection_manager(hcm, None, ctx)
    assert hcm.tracing.provider.name == "envoy.tracers.zipkin"
    assert hcm.tracing.random_sampling.value == 0 and hcm.tracing.client_sampling.value == 0
    port = ServicePort("http", 9080, 9080, "http")
    traced = Service("default", "reviews", (port,), labels=Labels({tracing.ENABLED: True, tracing.SAMPLING: 12.5}))
    plain = Service("default", "ratings", (port,))
    route, other = Route(), Route()
    tracing.trafficmgr_route(route, traced, port, ctx)
    tracing.trafficmgr_route(other, plain, port, ctx)
    assert route.tracing.random_sampling.numerator == 1250 and not other.HasField("tracing")
    untouched = HttpConnectionManager(stat_prefix="x")
    tracing.trafficmgr_http_connection_manager(untouched, None, _ctx(GATEWAY, argparse.Namespace()))
    assert not untouched.HasField("tracing"), "no collector: nothing"


def test_without_collector_labels_do_nothing_and_one_line_says_why(caplog: pytest.LogCaptureFixture) -> None:
    manifests = [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": "default", "labels": {"traffic.port.9080": "http", tracing.ENABLED: "true"}},
         "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 9080}]}}
        for name in ("reviews", "ratings")
    ]
    tracing._warned_no_collector = False
    with caplog.at_level(logging.WARNING, logger=tracing.__name__):
        snaps, _ = build_from_manifests(manifests, PluginHost.load(["tracing"]))
        build_from_manifests(manifests, PluginHost.load(["tracing"]))
    lines = [r for r in caplog.records if r.name == tracing.__name__]
    assert len(lines) == 1 and "--zipkin-address" in lines[0].getMessage()
    out = render(snaps)
    assert "zipkin" not in out and "tracing" not in out.replace("traffic.tracing", "")


def test_collector_cluster_is_contributed_with_trafficmgr_resources() -> None:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    made: list[tuple[Any, str]] = []
    for address, kind in (("zipkin.tracing:9411", Cluster.STRICT_DNS), ("10.0.0.9:9411", Cluster.STATIC)):
        ctx = BuildContext(SIDECAR, Model(), argparse.Namespace(zipkin_address=address),
                           resource=lambda m, n, refs=(): made.append((m, n)) or n)
        assert tracing.trafficmgr_resources(ctx) == [tracing.COLLECTOR_CLUSTER]
        message, name = made[-1]
        assert name == tracing.COLLECTOR_CLUSTER and message.type == kind
        assert message.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 9411
    assert tracing.trafficmgr_resources(_ctx(SIDECAR, argparse.Namespace())) == []
