"""Plugin isolation and NACK handling, end to end: builder -> cache -> xDS -> a real Envoy -> proxy-status."""

from __future__ import annotations

import argparse
import io
import urllib.request
from contextlib import redirect_stdout

import pytest

from trafficmgr import cli, hookimpl
from trafficmgr.core import metrics
from trafficmgr.core.admin import AdminServer
from trafficmgr.core.bootstrap import bootstrap
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.model import Endpoint, Labels, Model, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.xds.server import XdsServerThread
from trafficmgr.testing.envoy import EnvoyProcess, free_port, wait_for
from trafficmgr.testing.kit import NackingPlugin

BREAK = "traffic.test.break"


class Boom:
    """Test-only plugin that half-mutates a cluster and then raises, for services named ``boom``."""

    @hookimpl
    def trafficmgr_cluster(self, cluster, service, port, ctx) -> None:  # type: ignore[no-untyped-def]
        cluster.connect_timeout.FromMilliseconds(1234)
        if service.name == "boom":
            raise RuntimeError("boom")


def _model(port: int, backends: dict[str, list[tuple[str, int, int]]], labels: dict[str, dict[str, object]]) -> Model:
    services, endpoints = {}, {}
    for i, (name, eps) in enumerate(sorted(backends.items())):
        svc = Service("default", name, (ServicePort("http", port, port, "http"),), cluster_ip=f"127.0.0.{1 + i}",
                      labels=Labels(labels.get(name, {})))
        services[svc.key] = svc
        endpoints[("default", name, "http")] = tuple(
            Endpoint(addr, p, labels=Labels({"traffic.endpoint.weight": w})) for addr, p, w in eps
        )
    return Model(services=services, endpoints=endpoints)


@pytest.fixture
def rig(envoy_binary: str, tmp_path, backend_factory):  # type: ignore[no-untyped-def]
    port = free_port()
    plugins = PluginHost.load(["lb"], extra=[("breaker", NackingPlugin(BREAK)), ("boom", Boom())])
    cp = ControlPlane(plugins, argparse.Namespace(sidecar_address="127.0.0.1", sidecar_port=port))
    cp.resolve = lambda node_id, cluster, peer="": "sidecar"  # type: ignore[method-assign]
    cp.cache.resolver = cp.resolve
    xds = XdsServerThread(cp.cache, "127.0.0.1", 0).start()
    cp.xds = xds
    admin = AdminServer(cp, "127.0.0.1", 0)
    admin.start()
    a = backend_factory("a", "127.0.0.11", 0)
    envoy = None
    try:
        cp.publish_model(_model(port, {"good": [(a.host, a.port, 100)], "other": [(a.host, a.port, 100)]}, {}))
        envoy = EnvoyProcess(bootstrap("client.default", "sidecar", "127.0.0.1", xds.port, admin_port=0), tmp_path / "envoy").start()
        yield {"cp": cp, "envoy": envoy, "admin": admin, "port": port, "a": a, "backend_factory": backend_factory}
    finally:
        if envoy is not None:
            envoy.stop()
        admin.stop()
        xds.stop(0.5)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:  # type: ignore[attr-defined]
        return e.code


def test_nack_is_shown_not_resent_and_cleared(rig) -> None:  # type: ignore[no-untyped-def]
    cp, envoy, port, a = rig["cp"], rig["envoy"], rig["port"], rig["a"]
    url = f"http://127.0.0.1:{port}/x"
    assert _get(url) == 200
    before = metrics.REGISTRY.get_sample_value("trafficmgr_xds_responses_sent_total", {"type": "clusters", "mode": "sotw"}) or 0

    cp.publish_model(_model(port, {"good": [(a.host, a.port, 100)], "other": [(a.host, a.port, 100)]}, {"other": {BREAK: True}}))
    status = wait_for(lambda: [s for s in cp.proxy_status() if s["clusters"]["last_nack"]], 10, message="no NACK recorded")
    nack = status[0]["clusters"]["last_nack"]
    # Envoy 1.40's rejection of exactly the broken cluster, and nothing about the good one.
    broken, good = f"{port}|default|other.outbound", f"{port}|default|good.outbound"
    assert nack["error"].startswith(f"Error adding/updating cluster(s) {broken}: "), nack["error"]
    assert f"cluster provided LB specified but cluster '{broken}' did not provide one" in nack["error"], nack["error"]
    assert good not in nack["error"]
    # The rejected response: its nonce, the version sent (not the one Envoy still runs) and its clusters.
    assert nack["nonce"] and nack["version"] and nack["version"] != status[0]["clusters"]["acked"]
    assert {broken, good} <= set(nack["resources"])

    # proxy-status through the CLI shows it, as a user would see it.
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["proxy-status", "--server", rig["admin"].url]) == 0
    assert "NACK" in out.getvalue() and "client.default" in out.getvalue()

    # Not resent in a loop: over the next seconds at most the one rejected response went out.
    sent_after_nack = metrics.REGISTRY.get_sample_value("trafficmgr_xds_responses_sent_total", {"type": "clusters", "mode": "sotw"})
    import time

    time.sleep(2)
    assert metrics.REGISTRY.get_sample_value("trafficmgr_xds_responses_sent_total", {"type": "clusters", "mode": "sotw"}) == sent_after_nack
    assert sent_after_nack - before <= 2

    # Other resources keep updating: a new backend for "good" (endpoints) reaches Envoy meanwhile.
    b = rig["backend_factory"]("b", "127.0.0.12", 0)
    cp.publish_model(_model(port, {"good": [(b.host, b.port, 100)], "other": [(a.host, a.port, 100)]}, {"other": {BREAK: True}}))
    wait_for(lambda: _get(url) == 200 and b.hits > 0, 10, message="endpoint update did not reach Envoy")

    # Fixing the input clears the NACK.
    cp.publish_model(_model(port, {"good": [(b.host, b.port, 100)], "other": [(a.host, a.port, 100)]}, {}))
    wait_for(lambda: all(s["clusters"]["last_nack"] is None for s in cp.proxy_status()), 10, message="NACK not cleared")
    clusters = {c["name"]: c for c in envoy.dynamic("clusters")}
    assert clusters[f"{port}|default|other.outbound"].get("lb_policy") != "CLUSTER_PROVIDED"


def test_raising_plugin_is_isolated_and_counted(rig) -> None:  # type: ignore[no-untyped-def]
    cp, port, a = rig["cp"], rig["port"], rig["a"]
    before = metrics.REGISTRY.get_sample_value("trafficmgr_plugin_errors_total", {"plugin": "boom", "hook": "trafficmgr_cluster"}) or 0
    cp.publish_model(_model(port, {"good": [(a.host, a.port, 100)], "boom": [(a.host, a.port, 100)]}, {}))
    after = metrics.REGISTRY.get_sample_value("trafficmgr_plugin_errors_total", {"plugin": "boom", "hook": "trafficmgr_cluster"})
    assert after == before + 1
    snap = cp.cache.get("sidecar")
    assert snap is not None
    clusters = {name: r.message() for name, r in snap.types["type.googleapis.com/envoy.config.cluster.v3.Cluster"].resources.items()}
    # The raising plugin's half-made change was undone for "boom"; it applied for "good".
    assert clusters[f"{port}|default|boom.outbound"].connect_timeout.ToMilliseconds() == 60000
    assert clusters[f"{port}|default|good.outbound"].connect_timeout.ToMilliseconds() == 1234

    # Envoy accepted both clusters as built (the update is asynchronous: wait until it is applied) ...
    def applied() -> dict[str, str]:
        timeouts = {c["name"]: c.get("connect_timeout") for c in rig["envoy"].dynamic("clusters")}
        return timeouts if timeouts.get(f"{port}|default|good.outbound") == "1.234s" and f"{port}|default|boom.outbound" in timeouts else {}

    timeouts = rig["envoy"].wait_for(applied, 10, message="the update with the isolated plugin did not reach Envoy")
    assert timeouts[f"{port}|default|boom.outbound"] == "60s"
    assert not [s for s in cp.proxy_status() if s["clusters"]["last_nack"]]
    # ... and serving continued: requests still answer through Envoy.
    rig["envoy"].wait_for(lambda: _get(f"http://127.0.0.1:{port}/x") == 200, 10, message="Envoy stopped serving")
    assert all(_get(f"http://127.0.0.1:{port}/x") == 200 for _ in range(5))
