"""Scoped sidecar views through a real Envoy: the test API server, the real ControlPlane (watches, build,
resolve), a sidecar in a pod network namespace (iptables redirect) and backends in that network.

The client pod ``client.default`` starts unscoped (view ``sidecar``); labelling it ``traffic.scope=namespace``
moves it to its scope's view: ``web`` (its namespace) answers exactly as before, ``api.other`` and
``admin.other`` get the blocked 404 naming the scope; ``traffic.scope.namespaces=other`` moves it to a
second view where ``api.other`` answers again; removing the labels gives the full view back and the
unused scoped views are dropped.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from trafficmgr.core.model import SIDECAR
from trafficmgr.core.translate.scopes import view_name
from trafficmgr.testing.cluster import LocalCluster
from trafficmgr.testing.envoy import wait_for
from trafficmgr.testing.manifests import join, pod, service
from trafficmgr.testing.netns import require as _require_netns

PODS = {"web-1": ("default", "web", "10.244.0.11", 8080), "api-1": ("other", "api", "10.244.0.21", 8080),
        "admin-1": ("other", "admin", "10.244.0.22", 9090)}
NODE = "client.default"


@pytest.fixture(scope="module")
def cluster(envoy_binary: str) -> Iterator[LocalCluster]:
    _require_netns()
    with LocalCluster([ip for _, _, ip, _ in PODS.values()]) as c:
        c.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n")
        docs = []
        for name, (ns, app, ip, port) in PODS.items():
            docs += [service(app, port, namespace=ns), pod(name, ip, app, namespace=ns)]
            c.backend(name, ip, port)
        c.apply(join(*docs))
        c.wait_config(lambda: _get(c, "web", 8080)[0] == 200 and _get(c, "api.other", 8080)[0] == 200
                      and _get(c, "admin.other", 9090)[0] == 200, timeout=20, message="services not routed")
        yield c


def _get(c: LocalCluster, host: str, port: int) -> tuple[int, Any]:
    name, _, ns = host.partition(".")
    url = f"http://{c.cluster_ip(name, ns or 'default')}:{port}/x"

    def run() -> tuple[int, Any]:
        req = urllib.request.Request(url, headers={"Host": f"{host}:{port}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)

    assert c.pod is not None
    return c.pod.in_ns(run)  # type: ignore[no-any-return]


def _view(c: LocalCluster) -> str | None:
    return next((s.get("view") for s in c.cp.proxy_status() if s.get("node_id") == NODE), None)


def test_scope_limits_the_sidecar_and_moves_with_its_labels(cluster: LocalCluster) -> None:
    c = cluster
    before = {h: _get(c, h, p) for h, p in (("web", 8080), ("api.other", 8080), ("admin.other", 9090))}
    assert {h: r[0] for h, r in before.items()} == {"web": 200, "api.other": 200, "admin.other": 200}
    assert _view(c) == SIDECAR

    c.label("pod", "client", {"traffic.scope": "namespace"})
    own = view_name(("default",))
    wait_for(lambda: _view(c) == own, 10, message=f"client not moved to {own}: {_view(c)}")
    wait_for(lambda: _get(c, "api.other", 8080)[0] == 404, 10, message="api.other still reachable")
    status, body = _get(c, "api.other", 8080)
    assert "not in this sidecar's traffic.scope (namespaces: default)" in body
    status, body = _get(c, "admin.other", 9090)  # a port no in-scope Service has: the catch-all chain
    assert status == 404 and "traffic.scope (namespaces: default)" in body
    status, body = _get(c, "web", 8080)  # in scope: unchanged
    assert status == 200 and body["backend"] == before["web"][1]["backend"] == "web-1"
    assert body["path"] == before["web"][1]["path"]
    dump = c.cp.config_dump(NODE)
    assert dump is not None and sorted(r.name for r in dump["clusters"] if r.name.endswith(".outbound")) == ["8080|default|web.outbound"]

    c.label("pod", "client", {"traffic.scope.namespaces": "other"})
    both = view_name(("default", "other"))
    wait_for(lambda: _view(c) == both, 10, message=f"client not moved to {both}: {_view(c)}")
    wait_for(lambda: _get(c, "api.other", 8080)[0] == 200, 10, message="api.other not back in scope")
    assert _get(c, "admin.other", 9090)[1]["backend"] == "admin-1"
    assert c.cp.cache.get(own) is None  # no pod uses the first scope any more

    c.label("pod", "client", {"traffic.scope": None, "traffic.scope.namespaces": None})
    wait_for(lambda: _view(c) == SIDECAR, 10, message=f"client not back on the full view: {_view(c)}")
    assert c.cp.cache.get(both) is None
    assert {h: _get(c, h, p)[0] for h, p in (("web", 8080), ("api.other", 8080), ("admin.other", 9090))} == \
        {"web": 200, "api.other": 200, "admin.other": 200}
