"""gateway_api at scale, incrementally: the real assembler (every built-in plugin's watch kinds) and
the real builder over random edit batches of Gateway API objects and Services; after every batch the
incremental build (the model's delta, the plan's fast path, the per-resource and per-route memos) equals
a fresh build of the same model by a new builder, resource for resource and byte for byte. And the cost
contract: one route change re-serializes exactly its route configuration; a change of a Service no route
names re-serializes nothing of the plugin's and keeps the plan object."""

from __future__ import annotations

import argparse
import copy
import random
from typing import Any

import attrs
import pytest

from benchmarks.bench_gateway_api import objects
from trafficmgr.core import cache
from trafficmgr.core.kube import assemble
from trafficmgr.core.kube.assemble import Assembler
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import Builder, default_options
from trafficmgr.plugins.gateway_api import plan


def _options() -> argparse.Namespace:
    opts = default_options()
    opts.gateway_address = "127.0.0.1"
    return opts


class Rig:
    def __init__(self, routes: int, mesh: int) -> None:
        self.plugins = PluginHost.load()
        self.extra = self.plugins.collect("trafficmgr_watch_kinds")
        self.kinds = {k.plural: [x for x in (*assemble.CORE_KINDS, *self.extra) if x.plural == k.plural]
                      for k in (*assemble.CORE_KINDS, *self.extra)}
        self.assembler = Assembler(self.plugins.labels, self.extra)
        self.objects = objects(routes, mesh)
        for plural, kinds in self.kinds.items():
            for kind in kinds:
                self.assembler.apply("RELIST", kind, self.objects.get(plural, []))
        self.options = _options()
        self.builder = Builder(self.plugins, self.options)
        self.version = 1000

    def apply(self, plural: str, obj: dict[str, Any], deleted: bool = False) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        for kind in self.kinds[plural]:
            self.assembler.apply("DELETED" if deleted else "MODIFIED", kind, copy.deepcopy(obj))

    def build(self) -> tuple[dict[str, cache.Snapshot], dict[str, cache.Snapshot]]:
        """(incremental, fresh) snapshots of the same model."""
        model = self.assembler.model()
        incremental = self.builder.build(model)
        # The fresh build must not see the incremental path's module-level memos (plans, route matches).
        kept = (list(plan._memo), dict(plan._route_memo))
        plan._memo.clear()
        plan._route_memo.clear()
        try:
            fresh = Builder(self.plugins, _options()).build(attrs.evolve(model, delta=None))
        finally:
            plan._memo[:] = kept[0]
            plan._route_memo.clear()
            plan._route_memo.update(kept[1])
        return incremental, fresh


def _bodies(snaps: dict[str, cache.Snapshot]) -> dict[str, dict[str, dict[str, bytes]]]:
    return {view: {t: {n: r.body for n, r in ts.resources.items()} for t, ts in s.types.items()}
            for view, s in snaps.items() if view in ("gateway", "sidecar")}


def _edit(rng: random.Random, rig: Rig, grpc: bool = True) -> None:
    routes = rig.objects["httproutes"]
    r = rng.choice(routes)
    what = rng.randrange(8)
    while what == 6 and not grpc or what == 7 and not grpc and rng.random() < 0.7:
        what = rng.randrange(8)  # without GRPCRoutes, Gateway changes are rarer: most batches plan only routes again
    if what == 0:  # a weight
        r["spec"]["rules"][0]["backendRefs"][0]["weight"] = rng.randrange(0, 5)
    elif what == 1:  # a path
        r["spec"]["rules"][0].setdefault("matches", [{"path": {"type": "PathPrefix", "value": "/api"}}])[0]["path"]["value"] = \
            rng.choice(["/api", "/v2", "/x"])
    elif what == 2 and "hostnames" in r["spec"]:  # a hostname, sometimes one another route has
        r["spec"]["hostnames"] = [rng.choice([f"h{rng.randrange(len(routes))}.example.com", "*.example.com"])]
    elif what == 3:  # a backend that may not exist
        r["spec"]["rules"][-1]["backendRefs"][0]["name"] = rng.choice(["svc-1", "svc-2", "missing"])
    elif what == 4:  # a Service label (route policies) or its removal and return
        svc = rng.choice(rig.objects["services"][:20])
        if rng.random() < 0.3:
            rig.apply("services", svc, deleted=True)
        svc["metadata"]["labels"] = {"traffic.retries.5xx": str(rng.randrange(1, 4))}
        rig.apply("services", svc)
        return
    elif what == 5:  # delete and recreate a route
        rig.apply("httproutes", r, deleted=True)
        if rng.random() < 0.5:
            return
    elif what == 6:  # a GRPCRoute on a mesh route's Service port, or away
        mesh = [x for x in routes if x["spec"]["parentRefs"][0].get("kind") == "Service"]
        if mesh:
            m = rng.choice(mesh)
            g = {"apiVersion": plan.GROUP + "/v1", "kind": "GRPCRoute", "metadata": dict(m["metadata"], name="g-" + m["metadata"]["name"]),
                 "spec": {"parentRefs": m["spec"]["parentRefs"], "rules": [{"backendRefs": [{"name": "svc-3", "port": 80}]}]}}
            for kind in rig.kinds["grpcroutes"]:
                rig.version += 1
                g["metadata"]["resourceVersion"] = str(rig.version)
                rig.assembler.apply("DELETED" if rng.random() < 0.3 else "MODIFIED", kind, g)
        return
    else:  # a listener hostname
        gw = rig.objects["gateways"][0]
        gw["spec"]["listeners"][1]["hostname"] = rng.choice(["h10.example.com", "*.example.com", "other.test"])
        rig.apply("gateways", gw)
        return
    rig.apply("httproutes", r)


@pytest.mark.parametrize(("seed", "grpc"), [(1, True), (2, True), (3, True), (4, False), (5, False), (6, False)])
def test_incremental_builds_equal_fresh_builds_over_random_edit_batches(seed: int, grpc: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also the plan's route-only path (no GRPCRoutes: only the changed routes are planned again): its
    plans equal full builds', and it is taken in most batches."""
    from trafficmgr.plugins.gateway_api import status

    rebuilds: list[int] = []
    real = plan._rebuild
    monkeypatch.setattr(plan, "_rebuild", lambda *a: rebuilds.append(len(a[3])) or real(*a))
    rng = random.Random(seed)
    rig = Rig(routes=60, mesh=10)
    incremental, fresh = rig.build()
    assert _bodies(incremental) == _bodies(fresh)
    for batch in range(25):
        for _ in range(rng.randrange(1, 4)):
            _edit(rng, rig, grpc)
        incremental, fresh = rig.build()
        assert _bodies(incremental) == _bodies(fresh), f"seed {seed} batch {batch}"
        # The plan (statuses, protocols, mesh table) too, not only what reaches Envoy.
        model = rig.assembler.model()
        got = plan.plan(model, rig.options)
        kept = (list(plan._memo), dict(plan._route_memo))
        plan._memo.clear()
        plan._route_memo.clear()
        try:
            want = plan.build(attrs.evolve(model, delta=None), rig.options)
        finally:
            plan._memo[:] = kept[0]
            plan._route_memo.clear()
            plan._route_memo.update(kept[1])
        assert (got.table, got.gateways, got.protocols, got.mesh, got.classes) == \
            (want.table, want.gateways, want.protocols, want.mesh, want.classes), f"seed {seed} batch {batch}"
        assert [(r.ref, p) for r, p in got.routes] == [(r.ref, p) for r, p in want.routes], f"seed {seed} batch {batch}"
        assert [(s.path, s.status) for s in status.statuses(got, model, rig.options)] == \
            [(s.path, s.status) for s in status.statuses(want, model, rig.options)]
    if not grpc:
        assert len(rebuilds) >= 10, rebuilds


def test_one_route_change_reserializes_one_resource_and_unrelated_changes_keep_the_plan() -> None:
    rig = Rig(routes=200, mesh=20)
    rig.build()
    before = plan.table(rig.assembler.model(), rig.options)  # an empty delta: the last plan stands
    route = rig.objects["httproutes"][101]  # on the HTTP listener
    route["spec"]["rules"][0]["matches"][0]["path"]["value"] = "/changed"
    rig.apply("httproutes", route)
    rig.builder.build(rig.assembler.model())
    assert rig.builder.stats.serialized == {"routes": 1}, rig.builder.stats.serialized
    # A Service no route names: the plan object stays (no walk over the routes), nothing is serialized.
    table = plan.table(rig.assembler.model(), rig.options)
    rig.apply("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "unrelated", "namespace": "ns-1"},
                           "spec": {"clusterIP": "10.97.0.1", "ports": [{"name": "http", "port": 80}]}})
    model = rig.assembler.model()
    assert plan.table(model, rig.options) is table and table is not before
    snaps = rig.builder.build(model)
    assert not any(k in rig.builder.stats.serialized for k in ("routes", "listeners", "secrets"))
    assert "gateway_api|8080|http" in snaps["gateway"].types[cache.ROUTE].resources


def test_route_status_recomputed_only_for_the_changed_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """After one route change the status hook builds one route's status (JSON and all), not every
    route's; its answer equals one computed from scratch."""
    from trafficmgr.plugins.gateway_api import status

    rig = Rig(routes=100, mesh=10)
    model = rig.assembler.model()
    rig.builder.build(model)
    status.statuses(plan.plan(model, rig.options), model, rig.options)
    route = rig.objects["httproutes"][42]
    route["spec"]["rules"][0]["backendRefs"][0]["name"] = "missing"  # ResolvedRefs False: a new status
    rig.apply("httproutes", route)
    model = rig.assembler.model()
    rig.builder.build(model)
    emitted: list[str] = []
    real = status._emit
    monkeypatch.setattr(status, "_emit", lambda path, *a: emitted.append(path) or real(path, *a))
    got = status.statuses(plan.plan(model, rig.options), model, rig.options)
    assert [p for p in emitted if "/httproutes/" in p] == ["/apis/gateway.networking.k8s.io/v1/namespaces/ns-2/httproutes/r-42"]
    mine = next(s for s in got if s.path.endswith("/httproutes/r-42"))
    conds = {c["type"]: c["reason"] for c in mine.status["parents"][0]["conditions"]}
    assert conds["ResolvedRefs"] == "BackendNotFound"
    monkeypatch.setattr(status, "_route_answers", {})
    fresh = status.statuses(plan.plan(model, rig.options), model, rig.options)
    assert [(s.path, s.status) for s in fresh] == [(s.path, s.status) for s in got]


def test_a_failed_plan_does_not_leave_a_stale_plan_for_the_next_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's hooks fail while a route change is built (the core isolates them and builds the rest);
    the next model's delta names only an unrelated Service: the plan must still show the route change."""
    rig = Rig(routes=20, mesh=0)
    rig.build()
    route = rig.objects["httproutes"][5]
    route["spec"]["rules"][0]["matches"][0]["path"]["value"] = "/after-failure"
    rig.apply("httproutes", route)
    real = plan.build

    def broken(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("injected plan failure")

    monkeypatch.setattr(plan, "build", broken)
    with pytest.raises(RuntimeError):
        plan.plan(rig.assembler.model(), rig.options)
    monkeypatch.setattr(plan, "build", real)
    rig.apply("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "unrelated", "namespace": "ns-1"},
                           "spec": {"clusterIP": "10.97.0.1", "ports": [{"name": "http", "port": 80}]}})
    table = plan.table(rig.assembler.model(), rig.options)
    paths = {r.match.path for sp in table.ports for ch in sp.chains for vh in ch.virtual_hosts for r in vh.routes}
    assert "/after-failure" in paths
