"""Gateway API consumer routes (GAMMA: a mesh route in namespace C whose parent Service is in namespace P)
in the builder: the sidecars of C get a view of their own (their scope's or the full view plus C's virtual
hosts for the Services those routes name), where the consumer route wins over the producer route; every
other view is unchanged byte for byte, and a consumer view shares every other resource object with the
view it is made from. Traffic through real Envoy sidecars: tests/plugins/test_gateway_api_mesh.py."""

from __future__ import annotations

import argparse
import random
from typing import Any

import attrs
import pytest
import yaml

from tests.test_scopes import NAMESPACES, edit, random_model
from trafficmgr.apiserver.crds import GATEWAY_API_CRDS
from trafficmgr.apiserver.crds import load_manifests as load_crds
from trafficmgr.core import cache
from trafficmgr.core.contrib import ServiceRoutes
from trafficmgr.core.model import SIDECAR, Model
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder
from trafficmgr.core.translate.explicit_proxy import PROXY_ROUTE
from trafficmgr.core.translate.scopes import Scope, consumer_view_name, scope_of, view_name
from trafficmgr.core.translate.sidecar_outbound import OUTBOUND_LISTENER
from trafficmgr.plugin import hookimpl
from trafficmgr.testing.golden import build_from_manifests

BASE = """
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: payments, labels: {traffic.port.8080: http}}
spec: {selector: {app: pay}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: pay-v2, namespace: payments, labels: {traffic.port.8080: http}}
spec: {selector: {app: pay-v2}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: pay-canary, namespace: shop, labels: {traffic.port.8080: http}}
spec: {selector: {app: pay-canary}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {traffic.port.8080: http}}
spec: {selector: {app: web}, ports: [{name: http, port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: payments}
spec:
  parentRefs: [{group: "", kind: Service, name: pay, port: 8080}]
  rules: [{backendRefs: [{name: pay-v2, port: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c, image: c}]}
status: {podIP: 10.244.0.9, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: scoped, namespace: shop, labels: {app: client, traffic.scope: namespace, traffic.scope.namespaces: payments}}
spec: {nodeName: node-1, containers: [{name: c, image: c}]}
status: {podIP: 10.244.0.10, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: other, labels: {app: other}}
spec: {nodeName: node-1, containers: [{name: c, image: c}]}
status: {podIP: 10.244.0.11, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other-scoped, namespace: other, labels: {app: other, traffic.scope: namespace, traffic.scope.namespaces: payments}}
spec: {nodeName: node-1, containers: [{name: c, image: c}]}
status: {podIP: 10.244.0.12, conditions: [{type: Ready, status: "True"}]}
"""

CONSUMER = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: pay, namespace: payments, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.com, statusCode: 302}}]
  - backendRefs: [{name: pay-canary, port: 8080}]
"""

FULL_C = consumer_view_name("shop", None)
SCOPED_C = consumer_view_name("shop", Scope(("payments", "shop")))


def _build(with_consumer: bool, explicit_proxy: bool = False) -> dict[str, cache.Snapshot]:
    docs = [*load_crds(GATEWAY_API_CRDS), *(d for d in yaml.safe_load_all(BASE + ("---" + CONSUMER if with_consumer else "")) if d)]
    options = argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0", explicit_proxy=explicit_proxy,
                                 sidecar_inbound_port=15006)
    snaps, warnings = build_from_manifests(docs, PluginHost.load(["ingress", "gateway_api"]), options)
    assert warnings == []
    return snaps


def _vhost(snap: cache.Snapshot, name: str, rc: str = "outbound|8080") -> Any:
    return next(vh for vh in snap.types[cache.ROUTE].resources[rc].message().virtual_hosts if vh.name == name)


def _clusters(vh: Any) -> list[str]:
    return [r.route.cluster or ",".join(w.name for w in r.route.weighted_clusters.clusters)
            or ("redirect" if r.HasField("redirect") else "?") for r in vh.routes]


@pytest.mark.parametrize("explicit_proxy", [False, True])
def test_consumer_route_wins_for_its_namespace_only(explicit_proxy: bool) -> None:
    snaps = _build(True, explicit_proxy)
    assert FULL_C in snaps and SCOPED_C in snaps and FULL_C != SCOPED_C
    for view, snap in snaps.items():
        assert snap.errors() == [], view
    # Every other caller: the producer route (pay -> pay-v2).
    assert _clusters(_vhost(snaps[SIDECAR], "pay.payments:8080")) == ["8080|payments|pay-v2.outbound"]
    other = view_name(("other", "payments"))
    assert _clusters(_vhost(snaps[other], "pay.payments:8080")) == ["8080|payments|pay-v2.outbound"]
    # shop's callers: the consumer route (GEP-1294: consumer routes win for their namespace), in both views.
    for view in (FULL_C, SCOPED_C):
        vh = _vhost(snaps[view], "pay.payments:8080")
        assert _clusters(vh) == ["redirect", "8080|shop|pay-canary.outbound"], view
        assert list(vh.domains) == list(_vhost(snaps[SIDECAR], "pay.payments:8080").domains)
        if explicit_proxy:
            proxy = _vhost(snaps[view], "pay.payments:8080", PROXY_ROUTE)
            assert proxy.routes[0].match.HasField("connect_matcher") and _clusters(proxy)[1:] == _clusters(vh)
    # The scoped consumer view reaches the consumer route's backend (and no longer the producer's).
    scoped_clusters = {n for n in snaps[SCOPED_C].types[cache.CLUSTER].resources if n.endswith(".outbound")}
    assert "8080|shop|pay-canary.outbound" in scoped_clusters
    # A consumer view made from the full view shares every other resource object with it.
    full, mine = snaps[SIDECAR], snaps[FULL_C]
    for t in (cache.CLUSTER, cache.ENDPOINT):
        assert mine.types[t] is full.types[t], t
    own = {PROXY_ROUTE, "outbound|8080"} if explicit_proxy else {"outbound|8080"}
    for t in cache.TYPE_ORDER:
        assert set(mine.types[t].resources) == set(full.types[t].resources), t
        for name, res in full.types[t].resources.items():
            if t != cache.ROUTE or name not in own:
                assert mine.types[t].resources[name] is res, (t, name)
    # The scoped consumer view shares its scope's listener object.
    scope = snaps[view_name(("payments", "shop"))]
    assert (snaps[SCOPED_C].types[cache.LISTENER].resources[OUTBOUND_LISTENER]
            is scope.types[cache.LISTENER].resources[OUTBOUND_LISTENER])


def test_views_of_unaffected_pods_are_unchanged_byte_for_byte() -> None:
    """Adding a consumer route changes no view but the consumer namespace's (which are new views)."""
    without, with_ = _build(False), _build(True)
    assert set(with_) - set(without) == {FULL_C, SCOPED_C}
    for view in without:
        for t in cache.TYPE_ORDER:
            a, b = without[view].types[t], with_[view].types[t]
            assert {n: r.body for n, r in a.resources.items()} == {n: r.body for n, r in b.resources.items()}, (view, t)


def test_resolve_moves_the_namespaces_pods_only() -> None:
    from trafficmgr.core.model import Labels, Namespace, Pod
    from trafficmgr.core.translate.scopes import view_of

    namespaces = {"shop": Namespace("shop", Labels({}))}
    plain = Pod("shop", "a", labels=Labels({}))
    scoped = Pod("shop", "b", labels=Labels({"traffic.scope": "namespace", "traffic.scope.namespaces": ("payments",)}))
    elsewhere = Pod("other", "c", labels=Labels({}))
    consumers = frozenset({"shop"})
    assert view_of(plain, namespaces, consumers) == FULL_C
    assert view_of(scoped, namespaces, consumers) == SCOPED_C
    assert view_of(elsewhere, namespaces, consumers) == SIDECAR
    assert view_of(plain, namespaces) == SIDECAR and view_of(scoped, namespaces) == view_name(("payments", "shop"))


# -- property: incremental == fresh, and only the consumer namespaces' pods change views ---------------

class _Routes:
    """A plugin giving ``items`` (set by the test) as its service routes; ``producer_only`` leaves out the
    caller-restricted ones (the baseline)."""

    def __init__(self, producer_only: bool = False) -> None:
        self.items: list[Any] = []
        self.producer_only = producer_only

    @hookimpl
    def trafficmgr_service_routes(self, role: str) -> list[Any]:
        if role != SIDECAR:
            return []
        return [i for i in self.items if not (self.producer_only and i.caller_namespace is not None)]


def _random_items(rng: random.Random, model: Model) -> list[Any]:
    from envoy.config.route.v3 import route_components_pb2

    services = sorted(model.services.values(), key=lambda s: s.key)
    items = []
    for _ in range(rng.randint(0, 4)):
        parent, backend = rng.choice(services), rng.choice(services)
        r = route_components_pb2.Route()
        r.match.prefix = rng.choice(("/", "/a"))
        r.route.cluster = backend.cluster_name(backend.ports[0])
        caller = rng.choice((None, *NAMESPACES))
        items.append(ServiceRoutes(parent.namespace, parent.name, parent.ports[0].port, (r,), caller))
    return items


@pytest.mark.parametrize("seed", range(10))
def test_consumer_views_incremental_equal_fresh_and_bystanders_unchanged(seed: int) -> None:
    rng = random.Random(seed)
    plugin, baseline = _Routes(), _Routes(producer_only=True)
    host = PluginHost.load([], extra=[("routes", plugin)])
    base_host = PluginHost.load([], extra=[("routes", baseline)])
    builder = Builder(host)
    model = random_model(rng)
    for step in range(8):
        if step == 0 or rng.random() < 0.6:
            plugin.items = baseline.items = _random_items(rng, model)
        snaps = builder.build(model)
        fresh = Builder(host).build(attrs.evolve(model, delta=None))
        assert sorted(fresh) == sorted(snaps)
        for view in fresh:
            assert fresh[view].version == snaps[view].version, (seed, step, view)
            assert snaps[view].errors() == [], view
        callers = {i.caller_namespace for i in plugin.items} - {None}
        want = {consumer_view_name(p.namespace, scope_of(p, model.namespaces))
                for p in model.pods.values() if p.namespace in callers}
        plain = Builder(base_host).build(attrs.evolve(model, delta=None))
        assert set(snaps) == set(plain) | want, (seed, step)
        for view in plain:  # every view that is not a consumer view: byte for byte as without consumer routes
            assert snaps[view].version == plain[view].version, (seed, step, view)
        assert builder.scoped.consumer_namespaces == frozenset(callers)
        index = builder.scoped.index  # the per-namespace scope counts kept incrementally equal a recount
        recount: dict[str, dict[Any, int]] = {}
        for p in model.pods.values():
            counts = recount.setdefault(p.namespace, {})
            s = scope_of(p, model.namespaces)
            counts[s] = counts.get(s, 0) + 1
        assert index.ns_scopes == recount
        model = edit(rng, model)


def test_a_callers_virtual_hosts_are_made_once_per_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """shop has two consumer views (its full and its scoped one): its routes' virtual hosts are looked up
    once per build for both (the old code did it once per view)."""
    from trafficmgr.core.translate.scopes import ScopedViews

    calls: list[str] = []
    real = ScopedViews._subst

    def counted(self: ScopedViews, caller: str, *args: Any) -> Any:
        calls.append(caller)
        return real(self, caller, *args)

    monkeypatch.setattr(ScopedViews, "_subst", counted)
    snaps = _build(True)
    assert FULL_C in snaps and SCOPED_C in snaps
    assert calls == ["shop"]
