"""The example third-party plugin (examples/trafficmgr-served-by), installed with
``pip install ./examples/trafficmgr-served-by``: discovered through its entry point, its label listed,
and its header seen on a real request through Envoy."""

from __future__ import annotations

import argparse
import http.client
import json
from collections.abc import Callable
from importlib import metadata
from typing import Any

import pytest

from trafficmgr.cli import main
from trafficmgr.core.model import Endpoint, Model, ObjectRef, Service, ServicePort
from trafficmgr.core.plugins import PluginHost, available
from trafficmgr.core.translate.builder import Builder
from trafficmgr.testing import ControlPlane, EnvoyProcess, HttpBackend, free_port
from trafficmgr.testing.prereq import missing

DIST = "trafficmgr-served-by"
LABEL = "traffic.served-by"


@pytest.fixture(autouse=True)
def _installed() -> None:
    if "served_by" not in available():
        missing(f"{DIST} is not installed: pip install ./examples/{DIST}")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_discovered_through_its_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "plugins", "list", "--json")
    assert code == 0
    row = {p["name"]: p for p in json.loads(out)}["served_by"]
    assert row == {
        "name": "served_by",
        "version": metadata.version(DIST),
        "distribution": DIST,
        "source": "third-party",
        "module": "trafficmgr_served_by",
        "loaded": True,
        "hooks": ["trafficmgr_labels", "trafficmgr_virtual_host"],
        "depends": [],
    }
    code, out, _ = run_cli(capsys, "plugins", "list")
    line = next(ln for ln in out.splitlines() if ln.startswith("served_by "))
    assert line.split() == ["served_by", metadata.version(DIST), DIST, "third-party", "-", "2"]


def test_label_listed(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "labels")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith(LABEL + " "))
    assert "Service" in line and "served_by" in line and "x-served-by" in line
    code, out, _ = run_cli(capsys, "labels", "--json", "--plugins", "lb")
    assert LABEL not in {row["label"] for row in json.loads(out)}  # not selected -> not loaded


def _model(port: int, backend: HttpBackend, host: PluginHost, labels: dict[str, str]) -> Model:
    ref = ObjectRef("Service", "default", "shop")
    parsed, errors = host.labels.parse(ref, {f"traffic.port.{port}": "http", **labels})
    assert not errors
    svc = Service(
        "default", "shop",
        ports=(ServicePort("http", port, backend.port, protocol="http"),),
        cluster_ip="127.0.0.1",  # the sidecar listener's own address: original_dst keeps it (no iptables)
        labels=parsed,
    )
    return Model(
        services={svc.key: svc},
        endpoints={("default", "shop", "http"): (Endpoint("127.0.0.1", backend.port, pod="shop-1", namespace="default"),)},
    )


def _get(port: int) -> tuple[int, dict[str, str], dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/hello")
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(body) if resp.status == 200 else {}
    finally:
        conn.close()


def test_header_added_through_real_envoy(
    xds_server: ControlPlane,
    envoy_factory: Callable[..., EnvoyProcess],
    backend_factory: Callable[..., HttpBackend],
) -> None:
    host = PluginHost.load(["served_by"])
    backend = backend_factory("shop")
    port = free_port()
    builder = Builder(host, argparse.Namespace(sidecar_address="127.0.0.1", sidecar_port=port))
    xds_server.cache.set_view("sidecar", builder.build(_model(port, backend, host, {LABEL: "shop-v2"}))["sidecar"])
    xds_server.nodes["client-1.default"] = "sidecar"
    envoy = envoy_factory("client-1.default")

    status, headers, body = envoy.wait_for(lambda: (r := _get(port))[0] == 200 and r, message="no 200 through Envoy")
    assert body["backend"] == "shop"
    assert headers["x-served-by"] == "shop-v2"

    # Without the label the plugin does nothing: the header goes away after the next push.
    xds_server.cache.set_view("sidecar", builder.build(_model(port, backend, host, {}))["sidecar"])
    envoy.wait_for(lambda: "x-served-by" not in _get(port)[1], message="x-served-by still present without the label")
    assert backend.hits >= 2


def test_invalid_value_is_rejected_by_the_label_registry() -> None:
    host = PluginHost.load(["served_by"])
    parsed, errors = host.labels.parse(ObjectRef("Service", "default", "shop"), {LABEL: "has space"})
    assert LABEL not in parsed and errors and "token" in errors[0].message
    _, errors = host.labels.parse(ObjectRef("Pod", "default", "shop-1"), {LABEL: "ok"})
    assert "not used on a Pod" in errors[0].message


def test_absent_label_changes_nothing() -> None:
    """Same snapshot bytes with and without the plugin loaded when no service carries the label."""
    backend = HttpBackend("x")  # not started: only its port number is used
    with_plugin, without = PluginHost.load(["served_by"]), PluginHost.load([])
    options = argparse.Namespace(sidecar_address="127.0.0.1", sidecar_port=15001)
    a = Builder(with_plugin, options).build(_model(15001, backend, with_plugin, {}))["sidecar"]
    b = Builder(without, options).build(_model(15001, backend, without, {}))["sidecar"]
    assert {t: ts.version for t, ts in a.types.items()} == {t: ts.version for t, ts in b.types.items()}

