"""The dashboard's upstream columns come from plugins (``trafficmgr_dashboard_endpoint_columns``), not
from feature names in the core (review of issue 21: the core read ``traffic.endpoint.weight`` itself and
showed an unlabeled pod's weight as null).

A real control plane and its admin endpoint answer ``GET /debug/dashboard/data`` for a published model
whose endpoint labels went through the plugins' label parser, as the assembler parses them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from trafficmgr import hookimpl
from trafficmgr.core import metrics
from trafficmgr.core.admin import AdminServer
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.model import Endpoint, Model, ObjectRef, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost

WEIGHT = "traffic.endpoint.weight"


class Zones:
    """A third-party plugin: a ``zone`` column (the node each endpoint runs on), plus columns that break
    the contract, each of which must be left out without touching the rows."""

    @hookimpl
    def trafficmgr_dashboard_endpoint_columns(self, endpoints: tuple[Endpoint, ...]) -> list[dict[str, Any]]:
        n = len(endpoints)
        return [
            {"name": "zone", "title": "zone", "values": [ep.node for ep in endpoints]},
            {"name": "rps", "values": [1] * n},  # a core key
            {"name": "zone", "values": [1] * n},  # a name taken already
            {"name": "short", "values": [1] * (n - 1)},  # one value missing
            {"name": "Bad-Name", "values": [1] * n},
            {"name": "objects", "values": [{"x": 1}] * n},  # not a number or a string
            {"name": "long", "title": "x" * 100, "values": ["y" * 500] * n},  # kept, cut
        ]


class Broken:
    @hookimpl
    def trafficmgr_dashboard_endpoint_columns(self) -> list[dict[str, Any]]:
        raise RuntimeError("test failure in trafficmgr_dashboard_endpoint_columns")


def _get(server: AdminServer, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def data_with() -> Iterator[Callable[..., dict[str, Any]]]:
    """``data_with(plugins, extra=[...])``: the dashboard data of a control plane with those plugins and a
    Service ``reviews`` with three pods: labeled weight 20, labeled weight 0, unlabeled."""
    made: list[tuple[ControlPlane, AdminServer]] = []

    def make(plugins: list[str], extra: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        host = PluginHost.load(plugins, extra=extra or [])
        plane = ControlPlane(host, argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0",
                                                      dashboard_stats_port=0))
        admin = AdminServer(plane, "127.0.0.1", 0).__enter__()
        made.append((plane, admin))
        port = ServicePort("http", 9080, 9080)
        svc = Service("default", "reviews", (port,), "10.96.0.9")
        eps = []
        for i, raw in enumerate(({WEIGHT: "20"}, {WEIGHT: "0"}, {})):
            name = f"reviews-{i}"
            labels, errors = host.labels.parse(ObjectRef("Pod", "default", name), raw)
            assert not errors
            eps.append(Endpoint(f"127.0.0.{10 + i}", 9080, pod=name, namespace="default", node=f"node-{i}", labels=labels))
        pods = {("default", ep.pod or ""): Pod("default", ep.pod or "", ep.address, ready=True, ips=(ep.address,)) for ep in eps}
        plane.publish_model(Model(services={svc.key: svc}, endpoints={("default", "reviews", "http"): tuple(eps)}, pods=pods))
        return _get(admin, "/debug/dashboard/data")

    yield make
    for plane, admin in made:
        admin.__exit__(None, None, None)
        plane.stop()


def _upstreams(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u["pod"]: u for u in next(s for s in data["services"] if s["name"] == "reviews")["upstreams"]}


def test_lb_gives_the_effective_weight_default_included(data_with: Callable[..., dict[str, Any]]) -> None:
    data = data_with(["lb"])
    assert data["upstream_columns"] == [{"name": "weight", "title": "weight"}]
    ups = _upstreams(data)
    # Labeled 20 and 0 as labeled (0: the pod is left out of Envoy's endpoints); unlabeled: the default 100.
    assert {pod: u["weight"] for pod, u in ups.items()} == {"reviews-0": 20, "reviews-1": 0, "reviews-2": 100}


def test_without_lb_no_weight_the_core_names_no_column(data_with: Callable[..., dict[str, Any]]) -> None:
    data = data_with(["fault"])
    assert data["upstream_columns"] == []
    assert [set(u) for u in _upstreams(data).values()] == [{"pod", "address", "rps", "error_rate"}] * 3


def test_a_plugin_column_shows_and_bad_columns_are_left_out(data_with: Callable[..., dict[str, Any]],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trafficmgr.core.telemetry.columns")
    data = data_with(["lb"], extra=[("zones", Zones())])
    # In plugin call order (a plugin given with extra= is called before the built-in ones).
    assert data["upstream_columns"] == [{"name": "zone", "title": "zone"}, {"name": "long", "title": "x" * 40},
                                        {"name": "weight", "title": "weight"}]
    ups = _upstreams(data)
    assert [(u["weight"], u["zone"], len(u["long"])) for u in ups.values()] == [(20, "node-0", 200), (0, "node-1", 200),
                                                                                 (100, "node-2", 200)]
    for u in ups.values():  # the core's keys kept their values; nothing of the bad columns got in
        assert u["rps"] is None and not {"short", "Bad-Name", "objects"} & set(u)
    logged = caplog.text
    for name in ("'rps'", "'short'", "'Bad-Name'", "'objects'"):
        assert f"dashboard column {name} left out" in logged, name
    assert "already an earlier plugin's column" in logged and "one of the core's keys" in logged


def test_a_failing_plugin_loses_only_its_own_columns(data_with: Callable[..., dict[str, Any]]) -> None:
    labels = {"plugin": "broken", "hook": "trafficmgr_dashboard_endpoint_columns"}
    before = metrics.REGISTRY.get_sample_value("trafficmgr_plugin_errors_total", labels) or 0.0
    data = data_with(["lb"], extra=[("broken", Broken())])
    assert data["upstream_columns"] == [{"name": "weight", "title": "weight"}]
    assert _upstreams(data)["reviews-2"]["weight"] == 100
    assert (metrics.REGISTRY.get_sample_value("trafficmgr_plugin_errors_total", labels) or 0.0) == before + 1
