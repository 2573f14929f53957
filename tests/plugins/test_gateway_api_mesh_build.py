"""Gateway API mesh routes in the sidecar view, at build level (no Envoy): the golden sidecar view with
mesh routes, the incremental contract of ``trafficmgr_service_routes`` (only changed virtual hosts are
rebuilt), last good on plugin errors, and the explicit proxy serving the same routes."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from trafficmgr.apiserver.crds import GATEWAY_API_CRDS
from trafficmgr.apiserver.crds import load_manifests as load_crds
from trafficmgr.core import cache
from trafficmgr.core.controlplane import kinds_of
from trafficmgr.core.kube.assemble import Assembler
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder, default_options
from trafficmgr.core.translate.explicit_proxy import PROXY_ROUTE
from trafficmgr.core.translate.sidecar_outbound import OutboundTranslator
from trafficmgr.plugins.gateway_api import mesh
from trafficmgr.testing.golden import build_from_manifests, check_golden, list_items, render

GOLDEN = Path(__file__).parent.parent / "golden" / "gateway_api" / "mesh_sidecar.out.yaml"
PLUGINS = ["ingress", "gateway_api", "circuit_breaker", "lb"]

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default, labels: {traffic.retries.5xx: "2", traffic.port.9080: http}}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: default}
spec: {selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: default, labels: {traffic.lb.policy: RANDOM}}
spec: {selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default, labels: {traffic.port.9080: http}}
spec: {selector: {app: ratings}, ports: [{name: http, port: 9080}]}
"""

ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs: [{name: reviews-v1, port: 9080, weight: 90}, {name: reviews-v2, port: 9080, weight: 10}]
"""


def plugins() -> PluginHost:
    return PluginHost.load(PLUGINS)


def manifests(*extra: str) -> list[dict[str, Any]]:
    docs = [d for text in (SERVICES, *extra) for d in yaml.safe_load_all(text) if d]
    return [*load_crds(GATEWAY_API_CRDS), *docs]


def route_config(snaps: dict[str, cache.Snapshot], name: str) -> dict[str, Any]:
    from envoy.config.route.v3 import route_pb2
    from google.protobuf.json_format import MessageToDict

    res = snaps["sidecar"].types[cache.ROUTE].resources[name]
    rc = route_pb2.RouteConfiguration()
    rc.ParseFromString(res.body)
    return MessageToDict(rc, preserving_proto_field_name=True)


def vhost(rc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in rc["virtual_hosts"] if v["name"] == name)


def test_golden_sidecar_view_with_a_mesh_route(update_golden: bool) -> None:
    snaps, warnings = build_from_manifests(manifests(ROUTE), plugins())
    assert snaps["sidecar"].errors() == []
    rc = route_config(snaps, "outbound|9080")
    routes = vhost(rc, "reviews.default:9080")["routes"]
    # Precedence: the header match first; the weighted catch-all gets the parent Service's policies
    # (reviews: traffic.retries.5xx), the single-backend route its backend's (reviews-v2: RANDOM has no
    # route part, and no retries).
    assert [r["name"] for r in routes] == ["HTTPRoute/default/reviews/rule0/match0", "HTTPRoute/default/reviews/rule1/match0"]
    assert routes[0]["route"]["cluster"] == "9080|default|reviews-v2.outbound" and "retry_policy" not in routes[0]["route"]
    assert [c["weight"] for c in routes[1]["route"]["weighted_clusters"]["clusters"]] == [90, 10]
    assert routes[1]["route"]["retry_policy"]["num_retries"] == 2
    # The unlabelled backend ports are HTTP because of the route (implied protocols).
    assert {v["name"] for v in rc["virtual_hosts"]} >= {"reviews.default:9080", "reviews-v1.default:9080", "reviews-v2.default:9080"}
    out = render(snaps, views=["sidecar"]) + yaml.safe_dump({"warnings": warnings}, width=200)
    check_golden(out, GOLDEN, update_golden)


class Rig:
    """A store, an Assembler and one Builder kept across builds (as the control plane does)."""

    def __init__(self, *docs: str, options: argparse.Namespace | None = None) -> None:
        from trafficmgr.apiserver.controllers import Controllers
        from trafficmgr.apiserver.store import Store

        self.plugins = plugins()
        self.store = Store()
        controllers = Controllers(self.store, endpointslices=True)
        controllers.start()
        try:
            for obj in manifests(*docs):
                self.store.create(obj)
            controllers.wait_idle()
        finally:
            controllers.stop()
        self.asm = Assembler(self.plugins.labels, self.plugins.collect("trafficmgr_watch_kinds"))
        self.builder = Builder(self.plugins, options or default_options())

    def build(self) -> dict[str, cache.Snapshot]:
        for kind in kinds_of(self.plugins):
            self.asm.apply("RELIST", kind, list_items(self.store, kind.plural))
        return self.builder.build(self.asm.model())

    def put_route(self, text: str) -> None:
        obj = yaml.safe_load(text)
        try:
            current = self.store.get("httproutes", obj["metadata"]["name"], "default")
        except Exception:  # noqa: BLE001 - not there yet
            self.store.create(obj)
            return
        obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        self.store.update(obj)


@pytest.fixture
def vhost_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The virtual hosts the sidecar translation (re)builds, by name."""
    calls: list[str] = []
    real = OutboundTranslator._vhost

    def counting(self: OutboundTranslator, d: Any, routes: Any, ctx: Any) -> Any:
        calls.append(f"{d.service.name}:{d.port.port}")
        return real(self, d, routes, ctx)

    monkeypatch.setattr(OutboundTranslator, "_vhost", counting)
    yield calls


def test_only_the_changed_virtual_host_is_rebuilt(vhost_calls: list[str]) -> None:
    rig = Rig(ROUTE)
    first = rig.build()
    assert "reviews:9080" in vhost_calls
    before = route_config(first, "outbound|9080")
    # An unrelated build (nothing changed): no virtual host is rebuilt, the route configuration is the same object.
    vhost_calls.clear()
    second = rig.build()
    assert vhost_calls == []
    assert second["sidecar"].types[cache.ROUTE].resources["outbound|9080"] is first["sidecar"].types[cache.ROUTE].resources["outbound|9080"]
    # The route's weights change: only reviews' virtual host is rebuilt.
    rig.put_route(ROUTE.replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50"))
    third = rig.build()
    assert vhost_calls == ["reviews:9080"]
    after = route_config(third, "outbound|9080")
    assert [c["weight"] for c in vhost(after, "reviews.default:9080")["routes"][1]["route"]["weighted_clusters"]["clusters"]] == [50, 50]
    for name in ("reviews-v1.default:9080", "reviews-v2.default:9080", "ratings.default:9080"):
        assert vhost(after, name) == vhost(before, name)
    # The route is deleted: reviews (labelled http) gets its default route back (again only that virtual
    # host); reviews-v1/v2 (unlabelled, HTTP only as the route's backends) are no longer HTTP destinations.
    vhost_calls.clear()
    rig.store.delete("httproutes", "reviews", "default")
    fourth = rig.build()
    assert vhost_calls == ["reviews:9080"]
    default = vhost(route_config(fourth, "outbound|9080"), "reviews.default:9080")["routes"]
    assert len(default) == 1 and default[0]["route"]["cluster"] == "9080|default|reviews.outbound"


def test_plugin_error_keeps_the_last_good_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(ROUTE)
    good = vhost(route_config(rig.build(), "outbound|9080"), "reviews.default:9080")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("mesh translation broke")

    monkeypatch.setattr(mesh, "service_routes", broken)
    rig.put_route(ROUTE.replace("weight: 90", "weight: 1"))
    kept = vhost(route_config(rig.build(), "outbound|9080"), "reviews.default:9080")
    assert kept == good  # the previous routes, not the default route nor nothing


def test_explicit_proxy_serves_the_mesh_routes() -> None:
    options = default_options()
    options.explicit_proxy = True
    rig = Rig(ROUTE, options=options)
    rc = route_config(rig.build(), PROXY_ROUTE)
    routes = vhost(rc, "reviews.default:9080")["routes"]
    # CONNECT first, to the Service's own cluster; then the mesh routes.
    assert "connect_matcher" in routes[0]["match"] and routes[0]["route"]["cluster"] == "9080|default|reviews.outbound"
    assert [r.get("name") for r in routes[1:]] == ["HTTPRoute/default/reviews/rule0/match0", "HTTPRoute/default/reviews/rule1/match0"]


def test_malformed_items_fail_the_plugin_call() -> None:
    """Anything but ServiceRoutes of Route messages fails the plugin's call (then last good applies)."""
    from envoy.config.route.v3 import route_components_pb2

    from trafficmgr.core.plugins import _check_item
    from trafficmgr.plugin import ServiceRoutes

    _check_item("trafficmgr_service_routes", ServiceRoutes("default", "reviews", 9080, (route_components_pb2.Route(),)))
    for bad in ("not routes", ServiceRoutes("default", "reviews", 9080, (route_components_pb2.VirtualHost(),)),
                ServiceRoutes("default", "reviews", 9080, [route_components_pb2.Route()])):  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            _check_item("trafficmgr_service_routes", bad)


GRPC = """
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {selector: {app: echo}, ports: [{name: grpc, port: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: default}
spec: {selector: {app: echo, version: v2}, ports: [{name: grpc, port: 9090}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Say}}]
    backendRefs: [{name: echo-v2, port: 9090}]
  - backendRefs: [{name: echo, port: 9090}]
"""


def test_grpcroute_on_a_service_parent() -> None:
    """A GRPCRoute with a Service parent (no port: every port of the Service): the method match first,
    HTTP/2 (grpc) clusters for the unlabelled parent and backend ports, the client's grpc-timeout honoured."""
    snaps, _ = build_from_manifests(manifests(GRPC), plugins())
    rc = route_config(snaps, "outbound|9090")
    routes = vhost(rc, "echo.default:9090")["routes"]
    assert routes[0]["match"]["path"] == "/echo.Echo/Say" and routes[0]["route"]["cluster"] == "9090|default|echo-v2.outbound"
    assert routes[1]["route"]["cluster"] == "9090|default|echo.outbound"
    assert all("grpc_timeout_header_max" in r["route"]["max_stream_duration"] for r in routes)
    clusters = snaps["sidecar"].types[cache.CLUSTER].resources
    for name in ("9090|default|echo.outbound", "9090|default|echo-v2.outbound"):
        assert b"envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in clusters[name].body, name  # HTTP/2 upstream
