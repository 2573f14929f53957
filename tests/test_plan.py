"""The sidecar plan (``trafficmgr/core/translate/plan.py``), without protobufs: which destination IP:port
goes to which service port, conflicts between destinations, the HTTP / TCP / blocked ports, headless
services following their endpoints, and the planner returning the same plan object while nothing it
depends on changed. ``Changes`` come from a real :class:`ServiceTable`, as in a build."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trafficmgr.core.model import Endpoint, Labels, Model, ObjectRef, Pod, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.builder import default_options
from trafficmgr.core.translate.plan import Conflict, Planner, SidecarPlan
from trafficmgr.core.translate.services import Changes, ServiceTable

PLUGINS = PluginHost.load([])


class Rig:
    """One ServiceTable and one Planner, as the Builder keeps them across builds."""

    def __init__(self) -> None:
        self.reports: list[tuple[ObjectRef, str, str]] = []
        self.table = ServiceTable(PLUGINS, default_options(), lambda ref, msg, reason: self.reports.append((ref, msg, reason)))
        self.planner = Planner()

    def changes(self, model: Model) -> Changes:
        return self.table.update(model)

    def plan(self, model: Model) -> SidecarPlan:
        return self.planner.plan(self.table.update(model))


def fresh_plan(model: Model) -> SidecarPlan:
    return Rig().plan(model)


def svc(name: str, *ports: ServicePort, ip: str | None = None, headless: bool = False, **kw: Any) -> Service:
    return Service("default", name, ports, cluster_ip=ip, headless=headless, uid=f"uid-{name}", **kw)


def http(port: int, name: str = "http") -> ServicePort:
    return ServicePort(name, port, port, "http")


def tcp(port: int, name: str = "tcp") -> ServicePort:
    return ServicePort(name, port, port, "tcp")


def eps(*hosts: int, port: int = 8080, ready: bool = True) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.244.0.{h}", port, ready=ready, namespace="default") for h in hosts)


def model(*services: Service, endpoints: dict[tuple[str, str, str], tuple[Endpoint, ...]] | None = None,
          pods: dict[tuple[str, str], Pod] | None = None) -> Model:
    return Model(services={s.key: s for s in services}, endpoints=endpoints or {}, pods=pods or {})


def summary(plan: SidecarPlan) -> list[tuple[str, int, str | None, tuple[str, ...]]]:
    """``(service, port, protocol, ips)`` per destination, in plan order."""
    return [(d.service.name, d.port.port, d.port.protocol, d.ips) for d in plan.destinations]


# -- conflicts ------------------------------------------------------------------------------------------


def test_two_services_on_the_same_ip_port_first_wins_the_second_is_a_conflict() -> None:
    a, b = svc("a", http(80), ip="10.96.0.1"), svc("b", http(80), ip="10.96.0.1")
    plan = fresh_plan(model(b, a))  # the order of the model's mapping does not matter: services sort by key
    assert summary(plan) == [("a", 80, "http", ("10.96.0.1",))]
    assert plan.conflicts == (Conflict(ObjectRef("Service", "default", "b", "uid-b"),
                                       "10.96.0.1:80 is already served by 80|default|a.outbound; ignored for 80|default|b.outbound"),)


def test_same_ip_on_different_ports_is_no_conflict() -> None:
    a, b = svc("a", http(80), ip="10.96.0.1"), svc("b", tcp(81), ip="10.96.0.1")
    plan = fresh_plan(model(a, b))
    assert summary(plan) == [("a", 80, "http", ("10.96.0.1",)), ("b", 81, "tcp", ("10.96.0.1",))]
    assert plan.conflicts == ()


def test_a_headless_service_keeps_the_addresses_nobody_else_serves() -> None:
    """Conflicts are per IP:port: a headless service whose endpoints include another destination's
    address keeps its other addresses."""
    a = svc("a", http(80), ip="10.244.0.2")  # a ClusterIP that is also one of b's pod IPs
    b = svc("b", http(80), headless=True)
    plan = fresh_plan(model(a, b, endpoints={("default", "b", "http"): eps(1, 2, 3)}))
    assert summary(plan) == [("a", 80, "http", ("10.244.0.2",)), ("b", 80, "http", ("10.244.0.1", "10.244.0.3"))]
    assert [c.ref.name for c in plan.conflicts] == ["b"]
    assert plan.conflicts[0].message.startswith("10.244.0.2:80 is already served by 80|default|a.outbound")


def test_the_loser_takes_over_when_the_winner_goes() -> None:
    rig = Rig()
    a, b = svc("a", http(80), ip="10.96.0.1"), svc("b", http(80), ip="10.96.0.1")
    assert summary(rig.plan(model(a, b))) == [("a", 80, "http", ("10.96.0.1",))]
    plan = rig.plan(model(b))
    assert summary(plan) == [("b", 80, "http", ("10.96.0.1",))] and plan.conflicts == ()


# -- ports ----------------------------------------------------------------------------------------------


def test_http_tcp_and_blocked_ports() -> None:
    web = svc("web", http(80), ServicePort("metrics", 9090, 9090, None), ip="10.96.0.1")  # 9090: unlabeled
    db = svc("db", tcp(5432), ip="10.96.0.2")
    cache_ = svc("cache", ServicePort("redis", 6379, 6379, "direct"), ip="10.96.0.3")
    # 8080 carries HTTP to one address and TCP to another.
    api = svc("api", http(8080), ip="10.96.0.4")
    raw = svc("raw", tcp(8080), ip="10.96.0.5")
    plan = fresh_plan(model(web, db, cache_, api, raw))
    assert sorted((d.service.name, d.port.port) for d in plan.destinations) == [
        ("api", 8080), ("cache", 6379), ("db", 5432), ("raw", 8080), ("web", 80)]
    assert {d.service.name: d.http for d in plan.destinations} == {
        "api": True, "cache": False, "db": False, "raw": False, "web": True}
    assert plan.http_ports == (80, 8080)
    assert plan.tcp_ports == (5432, 6379, 8080)
    # Blocked chains go where HTTP destinations are and the inspector runs: not on TCP ports.
    assert plan.blocked_ports == (80,)
    assert 9090 not in plan.http_ports + plan.tcp_ports + plan.blocked_ports


def test_a_service_without_cluster_ip_or_endpoints_has_no_destination() -> None:
    plan = fresh_plan(model(svc("noip", http(80)), svc("headless", http(81), headless=True)))
    assert plan.destinations == () and plan.http_ports == plan.tcp_ports == plan.blocked_ports == ()


def test_a_pod_with_its_own_port_labels_is_a_destination_at_its_ip() -> None:
    pod = Pod("default", "p1", ip="10.244.9.1", ready=True, labels=Labels({"traffic.port.9000": "tcp"}), uid="uid-p1")
    plan = fresh_plan(model(svc("web", http(80), ip="10.96.0.1"), pods={pod.key: pod}))
    assert summary(plan) == [("web", 80, "http", ("10.96.0.1",)), ("p1", 9000, "tcp", ("10.244.9.1",))]
    assert plan.destinations[1].service.kind == "Pod"


# -- headless services ---------------------------------------------------------------------------------


def test_a_headless_services_destinations_follow_its_endpoints() -> None:
    rig = Rig()
    h = svc("h", http(80), tcp(81), headless=True)
    key_http, key_tcp = ("default", "h", "http"), ("default", "h", "tcp")
    plan = rig.plan(model(h, endpoints={key_http: eps(2, 1, 2), key_tcp: eps(3, port=81)}))
    assert summary(plan) == [("h", 80, "http", ("10.244.0.1", "10.244.0.2")), ("h", 81, "tcp", ("10.244.0.3",))]
    plan = rig.plan(model(h, endpoints={key_http: eps(1, 4), key_tcp: eps(3, port=81)}))
    assert summary(plan) == [("h", 80, "http", ("10.244.0.1", "10.244.0.4")), ("h", 81, "tcp", ("10.244.0.3",))]
    plan = rig.plan(model(h, endpoints={key_tcp: eps(3, port=81)}))
    assert summary(plan) == [("h", 81, "tcp", ("10.244.0.3",))]
    assert plan == fresh_plan(model(h, endpoints={key_tcp: eps(3, port=81)}))


# -- the same plan object -------------------------------------------------------------------------------


def test_the_same_plan_while_nothing_relevant_changed() -> None:
    rig = Rig()
    web = svc("web", http(80), ip="10.96.0.1")
    h = svc("h", http(81), headless=True)
    endpoints = {("default", "web", "http"): eps(1), ("default", "h", "http"): eps(5)}
    first = rig.plan(model(web, h, endpoints=endpoints))

    # The same model again: no changes at all.
    changes = rig.changes(model(web, h, endpoints=endpoints))
    assert not changes.any
    assert rig.planner.plan(changes) is first

    # A ClusterIP service's endpoints changed: the table reports it, the plan does not depend on them.
    endpoints = {**endpoints, ("default", "web", "http"): eps(1, 2)}
    changes = rig.changes(model(web, h, endpoints=endpoints))
    assert [new.svc.name for _, new in changes.replaced] == ["web"]
    assert rig.planner.plan(changes) is first

    # An equal Service object (a relist): same destinations, same plan.
    assert rig.plan(model(attrs.evolve(web), h, endpoints=endpoints)) is first

    # A headless service's endpoint became not ready: its addresses are unchanged.
    endpoints = {**endpoints, ("default", "h", "http"): eps(5, ready=False)}
    assert rig.plan(model(web, h, endpoints=endpoints)) is first

    # Relevant changes make a new plan: a headless service's addresses, a new service, a removed one.
    endpoints = {**endpoints, ("default", "h", "http"): eps(5, 6)}
    second = rig.plan(model(web, h, endpoints=endpoints))
    assert second is not first and summary(second)[0] == ("h", 81, "http", ("10.244.0.5", "10.244.0.6"))
    third = rig.plan(model(web, h, svc("new", tcp(5432), ip="10.96.0.9"), endpoints=endpoints))
    assert third is not second and len(third.destinations) == 3
    fourth = rig.plan(model(web, h, endpoints=endpoints))
    assert fourth is not third and fourth == second


# -- incremental == fresh ---------------------------------------------------------------------------------

NAMES = ["a", "b", "c"]
edit = st.one_of(
    st.tuples(st.just("service"), st.sampled_from(NAMES), st.sampled_from(["http", "tcp", "direct", None]),
              st.booleans(), st.sampled_from(["10.96.0.1", "10.96.0.2", None]), st.sampled_from([80, 81])),
    st.tuples(st.just("remove"), st.sampled_from(NAMES)),
    st.tuples(st.just("endpoints"), st.sampled_from(NAMES), st.lists(st.integers(1, 4), max_size=3), st.booleans()),
)


def apply(m: Model, e: tuple[Any, ...]) -> Model:
    services, endpoints = dict(m.services), dict(m.endpoints)
    if e[0] == "service":
        _, name, proto, headless, ip, port = e
        services[("default", name)] = svc(name, ServicePort("p", port, 8080, proto), ip=None if headless else ip,
                                          headless=headless)
    elif e[0] == "remove":
        services.pop(("default", e[1]), None)
    else:
        _, name, hosts, ready = e
        endpoints[("default", name, "p")] = eps(*hosts, ready=ready)
    return attrs.evolve(m, services=services, endpoints=endpoints)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(edit, min_size=1, max_size=3), min_size=1, max_size=8))
def test_incremental_plans_equal_fresh_plans(batches: list[list[tuple[Any, ...]]]) -> None:
    """Services claim the same two addresses on two ports, headless ones share pod IPs: the planner kept
    across builds plans what a new one plans, conflicts included."""
    rig, m = Rig(), Model()
    previous = rig.plan(m)
    for batch in batches:
        for e in batch:
            m = apply(m, e)
        changes = rig.changes(m)
        plan = rig.planner.plan(changes)
        assert plan == fresh_plan(m), f"after {batch}"
        if not changes.any:
            assert plan is previous, f"a new plan without changes, after {batch}"
        previous = plan
