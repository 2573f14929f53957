"""Scoped sidecar views (``traffic.scope``): golden files for two scopes, the unscoped view unchanged,
bad label values, the property "a scoped view is the full view restricted to its scope" over random
meshes and edits (incremental builds equal fresh ones), and the control plane's node -> view mapping.
Traffic through a real Envoy: tests/e2e/test_scopes_e2e.py."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import attrs
import pytest

from trafficmgr.core import cache
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.assemble import CORE_KINDS
from trafficmgr.core.model import SIDECAR, Endpoint, Labels, Model, ModelDelta, Namespace, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder
from trafficmgr.core.translate.scopes import Scope, route_clusters, scope_of, view_name
from trafficmgr.core.translate.sidecar_outbound import BLOCKED_BODY, OUTBOUND_LISTENER
from trafficmgr.testing.golden import build_from_manifests, check_golden, load_manifests, render

HERE = Path(__file__).parent / "golden" / "scopes"
SHOP = view_name(("payments", "shop"))
SEARCH = view_name(("search",))


def test_golden_two_scopes(update_golden: bool) -> None:
    snaps, warnings = build_from_manifests(load_manifests(HERE / "mesh.in.yaml"), PluginHost.load([]))
    assert warnings == []
    assert sorted(snaps) == sorted(["gateway", SIDECAR, SHOP, SEARCH])
    for view, snap in snaps.items():
        assert snap.errors() == [], view
    check_golden(render(snaps, views=[SHOP]), HERE / "shop_payments.out.yaml", update_golden)
    check_golden(render(snaps, views=[SEARCH]), HERE / "search.out.yaml", update_golden)


def _without_scope_labels(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = copy.deepcopy(manifests)
    for obj in out:
        labels = obj["metadata"].get("labels") or {}
        for key in [k for k in labels if k.startswith("traffic.scope")]:
            del labels[key]
    return out


def test_unscoped_views_unchanged_byte_for_byte() -> None:
    manifests = load_manifests(HERE / "mesh.in.yaml")
    scoped, _ = build_from_manifests(manifests, PluginHost.load([]))
    plain, _ = build_from_manifests(_without_scope_labels(manifests), PluginHost.load([]))
    assert sorted(plain) == ["gateway", SIDECAR]
    for view in plain:
        for t in cache.TYPE_ORDER:
            a, b = scoped[view].types[t], plain[view].types[t]
            assert {n: r.body for n, r in a.resources.items()} == {n: r.body for n, r in b.resources.items()}, (view, t)


def test_out_of_scope_blocked_body_names_the_scope() -> None:
    snaps, _ = build_from_manifests(load_manifests(HERE / "mesh.in.yaml"), PluginHost.load([]))
    lst = snaps[SHOP].types[cache.LISTENER].resources[OUTBOUND_LISTENER].message()
    blocked = [c for c in lst.filter_chains if c.name.startswith("blocked")]
    assert [c.name for c in blocked] == ["blocked|8080", "blocked"]
    text = str(blocked[0])
    assert "not in this sidecar\\'s traffic.scope (namespaces: payments, shop)" in text
    full = snaps[SIDECAR].types[cache.LISTENER].resources[OUTBOUND_LISTENER].message()
    assert BLOCKED_BODY.strip() in str([c for c in full.filter_chains if c.name == "blocked"][0]).replace("\\n", "")


@pytest.mark.parametrize(("kind", "labels", "expected"), [
    ("Pod", {"traffic.scope": "everything"}, "traffic.scope"),
    ("Pod", {"traffic.scope": "namespace", "traffic.scope.namespaces": "Shop_x"}, "traffic.scope.namespaces"),
    ("Namespace", {"traffic.scope.namespaces": "a__b"}, "traffic.scope.namespaces"),
    ("Service", {"traffic.scope": "namespace"}, "not used on a Service"),
])
def test_bad_scope_labels_are_reported(kind: str, labels: dict[str, str], expected: str) -> None:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "x", "labels": labels}}
    if kind != "Namespace":
        obj["metadata"]["namespace"] = "default"
    if kind == "Service":
        obj["spec"] = {"ports": [{"port": 80}]}
    if kind == "Pod":
        obj["spec"] = {"containers": [{"name": "c", "image": "c"}]}
    _, warnings = build_from_manifests([obj], PluginHost.load([]))
    assert any("InvalidTrafficLabel" in w and expected in w for w in warnings), warnings


def test_scope_of_pod_label_wins_and_namespaces_parse() -> None:
    ns = {"shop": Namespace("shop", Labels({"traffic.scope": "namespace", "traffic.scope.namespaces": ("payments",)}))}
    pod = Pod("shop", "web-1")
    assert scope_of(pod, ns) == Scope(("payments", "shop"))
    assert scope_of(attrs.evolve(pod, labels=Labels({"traffic.scope": "mesh"})), ns) is None
    assert scope_of(attrs.evolve(pod, labels=Labels({"traffic.scope.namespaces": ("a", "b")})), ns) == Scope(("a", "b", "shop"))
    assert scope_of(Pod("other", "p"), ns) is None
    from trafficmgr.core.corelabels import parse_namespaces

    assert parse_namespaces("b_a_b") == ("a", "b")
    for bad in ("", "a_", "A", "a.b", "-a"):
        with pytest.raises(ValueError):
            parse_namespaces(bad)


# -- property: a scoped view is the full view restricted to its scope -----------------------------

NAMESPACES = ("a", "b", "c", "d")


def random_model(rng: random.Random, n_services: int = 14) -> Model:
    services: dict[tuple[str, str], Service] = {}
    endpoints: dict[tuple[str, str, str], tuple[Endpoint, ...]] = {}
    for i in range(n_services):
        ns = rng.choice(NAMESPACES)
        name = f"s{i}"
        port = rng.choice((8080, 9090, 5432))
        proto = rng.choice(("http", "http", "grpc", "tcp", None))
        svc = Service(ns, name, (ServicePort("p", port, port, proto),), cluster_ip=f"10.96.0.{i + 1}")
        services[svc.key] = svc
        endpoints[(ns, name, "p")] = tuple(Endpoint(f"10.244.{i}.{j + 1}", port) for j in range(rng.randint(0, 2)))
    pods: dict[tuple[str, str], Pod] = {}
    for i in range(6):
        ns = rng.choice(NAMESPACES)
        labels: dict[str, Any] = {}
        if rng.random() < 0.7:
            labels["traffic.scope"] = "namespace"
            if rng.random() < 0.5:
                labels["traffic.scope.namespaces"] = tuple(sorted(set(rng.sample(NAMESPACES, rng.randint(1, 2)))))
        pod = Pod(ns, f"p{i}", ip=f"10.244.200.{i + 1}", labels=Labels(labels))
        pods[pod.key] = pod
    namespaces = {ns: Namespace(ns, Labels({"traffic.scope": "namespace"} if rng.random() < 0.3 else {})) for ns in NAMESPACES}
    return Model(services=services, endpoints=endpoints, pods=pods, port_pods={}, namespaces=namespaces)


def edit(rng: random.Random, model: Model) -> Model:
    services, endpoints, pods = dict(model.services), dict(model.endpoints), dict(model.pods)
    namespaces = dict(model.namespaces)
    for _ in range(rng.randint(1, 3)):
        what = rng.random()
        key = rng.choice(sorted(services))
        if what < 0.3:  # endpoints change
            endpoints[(*key, "p")] = tuple(Endpoint(f"10.244.{rng.randint(0, 99)}.{j + 1}", 80) for j in range(rng.randint(0, 3)))
        elif what < 0.45:  # a service leaves
            del services[key]
            endpoints.pop((*key, "p"), None)
        elif what < 0.6:  # a service arrives
            n = len(services) + rng.randint(100, 999)
            svc = Service(rng.choice(NAMESPACES), f"n{n}", (ServicePort("p", 8080, 8080, "http"),), cluster_ip=f"10.97.{n % 250}.{n % 200 + 1}")
            services[svc.key] = svc
        elif what < 0.8:  # a pod changes scope
            pk = rng.choice(sorted(pods))
            labels = {} if rng.random() < 0.3 else {"traffic.scope": "namespace",
                                                       "traffic.scope.namespaces": (rng.choice(NAMESPACES),)}
            pods[pk] = attrs.evolve(pods[pk], labels=Labels(labels))
        else:  # a namespace changes its default
            ns = rng.choice(NAMESPACES)
            namespaces[ns] = Namespace(ns, Labels({} if namespaces[ns].labels else {"traffic.scope": "namespace"}))
    def changed(a: Any, b: Any) -> frozenset[Any]:
        return frozenset(k for k in set(a) | set(b) if a.get(k) != b.get(k))

    touched = changed(model.services, services) | {k[:2] for k in changed(model.endpoints, endpoints)}
    delta = ModelDelta(services=frozenset(touched), pods=changed(model.pods, pods), namespaces=changed(model.namespaces, namespaces))
    return Model(services=services, endpoints=endpoints, pods=pods, port_pods={}, namespaces=namespaces, delta=delta)


def resources(snap: cache.Snapshot, t: str) -> dict[str, cache.Resource]:
    return dict(snap.types[t].resources)


def check_restricted(snaps: dict[str, cache.Snapshot], model: Model) -> None:
    """Every scoped view equals the full sidecar view restricted to its scope."""
    full = snaps[SIDECAR]
    full_listener = full.types[cache.LISTENER].resources[OUTBOUND_LISTENER].message()
    full_chains = {c.name: c for c in full_listener.filter_chains}
    full_vhosts = {vh.name: (rc, vh) for rc in full.types[cache.ROUTE].resources.values() for vh in rc.message().virtual_hosts}
    scopes = {scope_of(p, model.namespaces) for p in model.pods.values()} - {None}
    assert sorted(v for v in snaps if v.startswith("sidecar~")) == sorted(s.view for s in scopes if s is not None)
    for scope in scopes:
        assert scope is not None
        snap = snaps[scope.view]
        assert snap.errors() == []
        lst = snap.types[cache.LISTENER].resources[OUTBOUND_LISTENER].message()
        chains = [c for c in lst.filter_chains if not c.name.startswith("blocked")]
        in_scope = [n for n in full_chains if not n.startswith("blocked") and n.split("|")[1] in scope.namespaces]
        assert [c.name for c in chains] == in_scope  # the same order as the full listener
        for c in chains:
            assert c == full_chains[c.name]
        for c in lst.filter_chains:
            if c.name.startswith("blocked"):
                assert scope.describe() in str(c)
        reached: set[str] = {n for n in in_scope}
        for rc in snap.types[cache.ROUTE].resources.values():
            for vh in rc.message().virtual_hosts:
                full_rc, full_vh = full_vhosts[vh.name]
                assert vh == full_vh and rc.name == full_rc.name
                reached |= route_clusters(vh)
        expected_vhosts = {n for n, (_, vh) in full_vhosts.items() if n.rsplit(":", 1)[0].split(".")[1] in scope.namespaces}
        assert {vh.name for rc in snap.types[cache.ROUTE].resources.values() for vh in rc.message().virtual_hosts} == expected_vhosts
        outbound = {n for n in resources(full, cache.CLUSTER) if n.endswith(".outbound")}
        for t in (cache.CLUSTER, cache.ENDPOINT):
            mine, theirs = resources(snap, t), resources(full, t)
            want = {n for n in theirs if n not in outbound or n in reached}
            assert set(mine) == want, (scope, t)
            for n, r in mine.items():
                assert r is theirs[n]  # the very Resource objects: serialized once for every view
        others = {t: {n: r.body for n, r in resources(full, t).items()} for t in (cache.SECRET,)}
        assert others == {t: {n: r.body for n, r in resources(snap, t).items()} for t in (cache.SECRET,)}
        assert {n for n in resources(snap, cache.LISTENER)} == {n for n in resources(full, cache.LISTENER)}


@pytest.mark.parametrize("seed", range(12))
def test_scoped_view_is_full_view_restricted_incrementally(seed: int) -> None:
    rng = random.Random(seed)
    plugins = PluginHost.load([])
    builder = Builder(plugins)
    model = random_model(rng)
    for _ in range(8):
        snaps = builder.build(model)
        check_restricted(snaps, model)
        fresh = Builder(plugins).build(attrs.evolve(model, delta=None))
        assert sorted(fresh) == sorted(snaps)
        for view in fresh:  # incremental equals fresh, view by view
            assert fresh[view].version == snaps[view].version, view
        model = edit(rng, model)


def test_endpoint_change_rederives_only_scopes_holding_it() -> None:
    svc_a = Service("a", "web", (ServicePort("p", 8080, 8080, "http"),), cluster_ip="10.96.0.1")
    svc_b = Service("b", "web", (ServicePort("p", 8080, 8080, "http"),), cluster_ip="10.96.0.2")
    pods = {("a", "p"): Pod("a", "p", labels=Labels({"traffic.scope": "namespace"})),
            ("b", "p"): Pod("b", "p", labels=Labels({"traffic.scope": "namespace"}))}
    eps = {("a", "web", "p"): (Endpoint("10.244.0.1", 8080),), ("b", "web", "p"): (Endpoint("10.244.0.2", 8080),)}
    builder = Builder(PluginHost.load([]))
    first = builder.build(Model(services={svc_a.key: svc_a, svc_b.key: svc_b}, endpoints=eps, pods=pods))
    eps2 = {**eps, ("a", "web", "p"): (Endpoint("10.244.0.9", 8080),)}
    delta = ModelDelta(services=frozenset({("a", "web")}))
    second = builder.build(Model(services={svc_a.key: svc_a, svc_b.key: svc_b}, endpoints=eps2, pods=pods, delta=delta))
    va, vb = view_name(("a",)), view_name(("b",))
    assert second[vb] is first[vb]  # untouched: the same snapshot object
    assert second[va] is not first[va]
    assert second[va].types[cache.LISTENER] is first[va].types[cache.LISTENER]
    assert builder.stats.serialized == {"endpoints": 1}  # one assignment, shared by every view that has it


# -- the control plane: node -> view, views dropped when unused ------------------------------------

def _objects(scope_label: str | None, version: int, ns_labels: dict[str, str] | None = None) -> dict[str, list[dict[str, Any]]]:
    labels = {"app": "web"} | ({"traffic.scope": scope_label} if scope_label else {})
    return {
        "Namespace": [{"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "shop", "uid": "n1", "labels": ns_labels or {}, "resourceVersion": str(version)}}],
        "Service": [{"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "web", "namespace": "shop", "uid": "s1", "labels": {"traffic.port.8080": "http"}},
                     "spec": {"clusterIP": "10.96.0.5", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 8080}]}}],
        "Pod": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop", "uid": "p1", "labels": labels,
                                                          "resourceVersion": str(scope_label)},
                 "spec": {"nodeName": "n"}, "status": {"phase": "Running", "podIP": "10.244.0.5"}}],
    }


def test_control_plane_resolves_scoped_pods_and_drops_unused_views() -> None:
    cp = ControlPlane(PluginHost.load([]))
    kinds = {k.kind: k for k in CORE_KINDS}

    versions = iter(range(1, 100))

    def relist(scope_label: str | None, ns_labels: dict[str, str] | None = None) -> None:
        for kind, items in _objects(scope_label, next(versions), ns_labels).items():
            cp.assembler.apply("RELIST", kinds[kind], items)
        cp.publish_model(cp.assembler.model())

    relist(None)
    assert cp.resolve("web-1.shop", "") == SIDECAR
    relist("namespace")
    view = view_name(("shop",))
    assert cp.resolve("web-1.shop", "") == view
    assert cp.cache.get(view) is not None
    assert cp.config_dump("web-1.shop") is not None
    relist("mesh")  # the label moves the pod back: its view goes with it
    assert cp.resolve("web-1.shop", "") == SIDECAR
    assert cp.cache.get(view) is None
    assert cp.resolve("nope.shop", "") is None
    # The Namespace's labels are the default of its pods (only a Namespace change: the pod is not touched).
    relist("mesh", {"traffic.scope": "namespace", "traffic.scope.namespaces": "payments"})
    assert cp.resolve("web-1.shop", "") == SIDECAR  # the pod's own label wins
    relist(None)
    relist(None, {"traffic.scope": "namespace", "traffic.scope.namespaces": "payments"})
    both = view_name(("payments", "shop"))
    assert cp.resolve("web-1.shop", "") == both and cp.cache.get(both) is not None
    relist(None, {})
    assert cp.resolve("web-1.shop", "") == SIDECAR and cp.cache.get(both) is None


# -- mesh routes: their backends come with the in-scope Service; the explicit proxy -----------------

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: payments}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {traffic.port.8080: http}}
spec: {selector: {app: web}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: payments, labels: {traffic.port.8080: http}}
spec: {selector: {app: pay}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: pay-canary, namespace: payments, labels: {traffic.port.8080: http}}
spec: {selector: {app: pay-canary}, ports: [{name: http, port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-shop, namespace: payments}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /pay}}]
    backendRefs: [{name: pay-canary, namespace: payments, port: 8080}]
  - backendRefs: [{name: web, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client, traffic.scope: namespace}}
spec: {nodeName: node-1, containers: [{name: c, image: c}]}
status: {podIP: 10.244.0.9, conditions: [{type: Ready, status: "True"}]}
"""


@pytest.mark.parametrize("explicit_proxy", [False, True])
def test_mesh_route_backends_are_in_scope(explicit_proxy: bool) -> None:
    import argparse

    import yaml

    from trafficmgr.apiserver.crds import GATEWAY_API_CRDS
    from trafficmgr.apiserver.crds import load_manifests as load_crds
    from trafficmgr.core.translate.explicit_proxy import PROXY_ROUTE

    docs = [*load_crds(GATEWAY_API_CRDS), *(d for d in yaml.safe_load_all(MESH) if d)]
    options = argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0", explicit_proxy=explicit_proxy,
                                 sidecar_inbound_port=15006)
    snaps, _ = build_from_manifests(docs, PluginHost.load(["ingress", "gateway_api"]), options)
    view = view_name(("shop",))
    snap = snaps[view]
    assert snap.errors() == []
    clusters = {n for n in snap.types[cache.CLUSTER].resources if n.endswith(".outbound")}
    # The route's backend in another namespace comes with it; the namespace's other Service does not.
    assert clusters == {"8080|shop|web.outbound", "8080|payments|pay-canary.outbound"}
    assert snaps[SIDECAR].types[cache.CLUSTER].resources["8080|payments|pay.outbound"]
    vhosts = [vh.name for rc in snap.types[cache.ROUTE].resources.values() for vh in rc.message().virtual_hosts]
    if explicit_proxy:
        proxy = snap.types[cache.ROUTE].resources[PROXY_ROUTE].message()
        assert [vh.name for vh in proxy.virtual_hosts] == ["web.shop:8080", "blocked"]
        assert "traffic.scope (namespaces: shop)" in proxy.virtual_hosts[-1].routes[0].direct_response.body.inline_string
        full = snaps[SIDECAR].types[cache.ROUTE].resources[PROXY_ROUTE].message()
        assert proxy.virtual_hosts[0] == next(vh for vh in full.virtual_hosts if vh.name == "web.shop:8080")
    else:
        assert vhosts == ["web.shop:8080"]


def test_a_new_service_rebuilds_only_the_scopes_holding_it() -> None:
    def svc(ns: str, name: str, ip: str) -> Service:
        return Service(ns, name, (ServicePort("p", 8080, 8080, "http"),), cluster_ip=ip)

    services = {s.key: s for s in (svc("a", "web", "10.96.0.1"), svc("b", "web", "10.96.0.2"), svc("c", "db", "10.96.0.3"))}
    pods = {(ns, "p"): Pod(ns, "p", labels=Labels({"traffic.scope": "namespace"})) for ns in ("a", "b", "c")}
    builder = Builder(PluginHost.load([]))
    first = builder.build(Model(services=services, pods=pods))
    added = svc("a", "api", "10.96.0.4")
    second = builder.build(Model(services={**services, added.key: added}, pods=pods,
                                 delta=ModelDelta(services=frozenset({added.key}))))
    va, vb, vc = (view_name((ns,)) for ns in ("a", "b", "c"))
    assert second[vb] is first[vb] and second[vc] is first[vc]
    assert "8080|a|api.outbound" in second[va].types[cache.CLUSTER].resources
    assert second[SIDECAR] is not first[SIDECAR]


class _CountingEntries(tuple):  # type: ignore[type-arg]
    """An out's entries that count how many of them were iterated (the scoped views' walks)."""

    visited = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for e in tuple.__iter__(self):
            _CountingEntries.visited += 1
            yield e


def test_a_service_change_does_not_walk_every_outbound_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed Service re-groups only its own destination for the scoped views: none of the full view's
    outbound entries is walked (the old ``_regroup`` walked all of them on every Service change), and the
    views still equal a fresh build's."""
    from trafficmgr.core.translate.sidecar_outbound import OutboundTranslator

    real = OutboundTranslator.translate

    def counted(self: OutboundTranslator, plan: Any, ctx: Any) -> Any:
        out = real(self, plan, ctx)
        if not isinstance(out.entries, _CountingEntries):
            object.__setattr__(out, "entries", _CountingEntries(out.entries))  # in-process only
        return out

    monkeypatch.setattr(OutboundTranslator, "translate", counted)
    n = 200
    services = {}
    for i in range(n):
        svc = Service(f"ns-{i % 20}", f"svc-{i}", (ServicePort("http", 8080, 8080, "http"),), cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}")
        services[svc.key] = svc
    pods = {(f"ns-{i}", "p"): Pod(f"ns-{i}", "p", labels=Labels({"traffic.scope": "namespace"})) for i in range(20)}
    builder = Builder(PluginHost.load([]))
    model = Model(services=services, pods=pods)
    builder.build(model)  # the first build walks every entry once: nothing to be incremental from
    changed = attrs.evolve(services[("ns-3", "svc-3")], labels=Labels({"app": "new"}))  # a new chain and virtual host
    added = Service("ns-4", "api", (ServicePort("http", 8080, 8080, "http"),), cluster_ip="10.96.9.9")
    for edit in ({changed.key: changed}, {added.key: added}):
        services = {**services, **edit}
        model = Model(services=services, pods=pods, delta=ModelDelta(services=frozenset(edit)))
        _CountingEntries.visited = 0
        snaps = builder.build(model)
        assert _CountingEntries.visited == 0  # the old code: 3 walks of all n entries per change
        fresh = Builder(PluginHost.load([])).build(attrs.evolve(model, delta=None))
        assert {v: s.version for v, s in snaps.items()} == {v: s.version for v, s in fresh.items()}
    check_restricted(snaps, model)
