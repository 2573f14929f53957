"""The dashboard's routes table for Gateway API routes: the real control plane with the gateway_api
plugin, the project's CRDs installed in the local API server, a real gateway Envoy; the row's status is
what the controller wrote to the route (read back from the API), its matches and backends the route's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import trafficmgr.core.kube.watch as watch_module
from trafficmgr.apiserver.crds import GATEWAY_API_CRDS
from trafficmgr.core.plugins import PluginHost
from trafficmgr.plugins import gateway_api
from trafficmgr.testing import free_port
from trafficmgr.testing.cluster import GatewayCluster

CONTROLLER = "trafficmgr.io/gateway-controller"


@pytest.fixture
def gw(envoy_binary: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[GatewayCluster]:
    monkeypatch.setattr(watch_module, "NOT_SERVED_RETRY", 0.2)
    with GatewayCluster(plugins=PluginHost.load(["ingress"], extra=[("gateway_api", gateway_api)])) as c:
        c.kubectl("apply", "-f", str(GATEWAY_API_CRDS))
        yield c


def _rows(c: GatewayCluster) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in c.cp.dashboard_data()["routes"]}


def test_httproute_row_with_status(gw: GatewayCluster) -> None:
    port = free_port()
    gw.apply(f"""
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec: {{selector: {{app: reviews}}, ports: [{{name: http, port: 9080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: traffic}}
spec: {{controllerName: {CONTROLLER}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: traffic
  listeners: [{{name: http, port: {port}, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-split, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: [reviews.example.com]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /reviews}}, headers: [{{name: x-canary, value: "1"}}]}}]
    backendRefs: [{{name: reviews, port: 9080, weight: 90}}, {{name: missing, port: 9080, weight: 10}}]
""")
    deadline = time.monotonic() + 20
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = _rows(gw).get("reviews-split", {})
        if "gw:" in row.get("status", ""):
            break
        time.sleep(0.2)
    assert row.get("kind") == "HTTPRoute" and row["namespace"] == "default", row
    assert row["hosts"] == ["reviews.example.com"]
    assert row["matches"] == ["PathPrefix /reviews header x-canary=1"]
    assert row["backends"] == ["reviews:9080 (weight 90)", "missing:9080 (weight 10)"]
    # The controller accepted it and reports the missing backend Service (read back from the API).
    assert row["status"].startswith("gw: Accepted") and "refs not resolved (BackendNotFound)" in row["status"], row
