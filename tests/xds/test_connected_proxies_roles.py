"""``trafficmgr_xds_connected_proxies{role,mode}`` has a bounded ``role`` label (review of issue 21).

Each distinct ``traffic.scope`` makes its own sidecar view (``sidecar~<id>``): hundreds of them in a
cluster whose users label many namespaces. The gauge once used the view name as its ``role`` value, one
Prometheus series per scope, driven by users' labels. Here 50 real gRPC ADS streams on 50 scoped views
(named by :func:`trafficmgr.core.translate.scopes.view_name`, as the control plane names them), plus the
full sidecar view, a gateway and an unknown node, leave the gauge with only the fixed values of
``metrics.PROXY_ROLES``; the views themselves stay visible per stream in proxy-status.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from xds_client import AdsClient
from xds_resources import web_snapshot

from trafficmgr.core import cache, metrics
from trafficmgr.core.model import GATEWAY, SIDECAR
from trafficmgr.core.translate.scopes import Scope, consumer_view_name, view_name
from trafficmgr.testing import ControlPlane, wait_for

SCOPES = 50
METRIC = "trafficmgr_xds_connected_proxies"


def _series() -> dict[tuple[str, str], float]:
    """``(role, mode) -> value`` of every series of the gauge."""
    out = {}
    for family in metrics.REGISTRY.collect():
        if family.name == METRIC:
            for s in family.samples:
                out[(s.labels["role"], s.labels["mode"])] = s.value
    return out


@pytest.fixture
def clients() -> Iterator[list[AdsClient]]:
    made: list[AdsClient] = []
    yield made
    for c in made:
        c.close()


def test_fifty_scopes_keep_the_role_label_bounded(xds_server: ControlPlane, clients: list[AdsClient]) -> None:
    before = _series()
    views = {f"web-{i}.team-{i}": view_name(tuple(sorted({f"team-{i}", "shared"}))) for i in range(SCOPES)}
    views["front-1.shop"] = consumer_view_name("shop", Scope(("shop",)))  # a consumer view is scoped too
    views["plain-1.default"] = SIDECAR
    views["traffic-ingress"] = GATEWAY
    assert len(set(views.values())) == SCOPES + 3
    for node, view in views.items():
        xds_server.nodes[node] = view
        if xds_server.cache.get(view) is None:
            xds_server.cache.set_view(view, web_snapshot(10000, {"a": [("127.0.0.1", 1001, 100)]}))
    for node in [*views, "nobody.nowhere"]:  # the last one is not known: its stream waits
        c = AdsClient(xds_server.port, delta=True, node_id=node)
        clients.append(c)
        c.send(type_url=cache.CLUSTER)
    for c in clients[:-1]:
        c.recv(10)
    wait_for(lambda: len(xds_server.status()) == len(clients), 10, message="not every stream is open")
    wait_for(lambda: _series().get(("unknown", "delta"), 0.0) > before.get(("unknown", "delta"), 0.0), 10,
             message="the unknown node's stream is not counted")

    after = _series()
    roles = {role for role, _mode in after}
    assert roles <= set(metrics.PROXY_ROLES), f"role values beyond the fixed set: {sorted(roles - set(metrics.PROXY_ROLES))[:5]}"

    def added(role: str) -> float:
        return after.get((role, "delta"), 0.0) - before.get((role, "delta"), 0.0)
    assert (added("sidecar-scoped"), added("sidecar"), added("gateway"), added("unknown")) == (SCOPES + 1, 1, 1, 1)
    # The per-view detail is where it belongs: each stream's row in proxy-status.
    by_node = {row["node_id"]: row["view"] for row in xds_server.status()}
    assert {n: by_node[n] for n in views} == views

    for c in clients:
        c.close()
    wait_for(lambda: not xds_server.status(), 10, message="streams did not close")
    wait_for(lambda: _series().get(("sidecar-scoped", "delta"), 0.0) == before.get(("sidecar-scoped", "delta"), 0.0), 5,
             message="the gauge did not go back down")


@pytest.mark.parametrize("view, role", [
    (None, "unknown"), (SIDECAR, "sidecar"), (GATEWAY, "gateway"), (view_name(("a", "b")), "sidecar-scoped"),
    (consumer_view_name("shop", None), "sidecar-scoped"), ("sidecarish", "other"), ("my-plugin-view", "other"),
])
def test_proxy_role_values(view: str | None, role: str) -> None:
    assert metrics.proxy_role(view) == role and role in metrics.PROXY_ROLES
