"""Load balancing: cluster lb policy, cookie/header hash affinity, endpoint weights."""

from __future__ import annotations

from trafficmgr.plugin import LabelSpec, hookimpl
from trafficmgr.plugin import labels as L

POLICY = "traffic.lb.policy"
COOKIE_NAME = "traffic.hash.cookie.name"
COOKIE_TTL = "traffic.hash.cookie.ttl"
HEADER_NAME = "traffic.hash.header.name"
WEIGHT = "traffic.endpoint.weight"
#: The weight of an endpoint whose pod (and workload) has no valid weight label.
DEFAULT_WEIGHT = 100
SVC = frozenset({L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(POLICY, SVC, L.choice("ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH", "RANDOM", "MAGLEV"), "ROUND_ROBIN",
                  "cluster load-balancing policy"),
        LabelSpec(COOKIE_NAME, SVC, L.token("a cookie name"), "", "hash requests on this cookie (RING_HASH / MAGLEV)"),
        LabelSpec(COOKIE_TTL, SVC, L.duration(), 0,
                  "when > 0 Envoy generates the cookie if absent, Max-Age = ttl/1000 s"),
        LabelSpec(HEADER_NAME, SVC, L.token("a header name"), "", "hash requests on this header"),
        LabelSpec(WEIGHT, L.POD_AND_WORKLOADS, L.integer(0, 128), DEFAULT_WEIGHT,
                  "endpoint load-balancing weight; 0 removes the pod from the endpoints"),
    ]


@hookimpl
def trafficmgr_cluster(cluster, service, port, ctx) -> None:  # type: ignore[no-untyped-def]
    """Set the lb policy on EDS clusters (ORIGINAL_DST and STATIC clusters keep theirs)."""
    policy = service.labels.value(POLICY)
    if policy is None or cluster.type != cluster.EDS:
        return
    cluster.lb_policy = cluster.LbPolicy.Value(policy)


@hookimpl
def trafficmgr_endpoints(assignment, pairs) -> None:  # type: ignore[no-untyped-def]
    """Weight every endpoint (default 100); weight 0 removes the endpoint."""
    removed = set()
    for pair in pairs:
        weight = pair.endpoint.labels.value(WEIGHT, DEFAULT_WEIGHT)
        if weight > 0:
            pair.lb_endpoint.load_balancing_weight.value = weight
        else:
            removed.add((pair.endpoint.address, pair.endpoint.port))
    if not removed:
        return
    for locality in assignment.endpoints:
        kept = []
        for lb in locality.lb_endpoints:
            sa = lb.endpoint.address.socket_address
            if (sa.address, sa.port_value) not in removed:
                copy = type(lb)()
                copy.CopyFrom(lb)  # a copy: the originals go with the cleared list
                kept.append(copy)
        del locality.lb_endpoints[:]
        locality.lb_endpoints.extend(kept)


@hookimpl
def trafficmgr_route(route, service, port, ctx) -> None:  # type: ignore[no-untyped-def]
    """Cookie and header hash policies (they take effect with RING_HASH / MAGLEV)."""
    cookie = service.labels.value(COOKIE_NAME)
    header = service.labels.value(HEADER_NAME)
    if not cookie and not header:
        return
    if header:
        route.route.hash_policy.add().header.header_name = header
    if cookie:
        policy = route.route.hash_policy.add().cookie
        policy.name = cookie
        ttl = service.labels.value(COOKIE_TTL, 0)
        if ttl > 0:
            policy.ttl.FromMilliseconds(ttl)


@hookimpl
def trafficmgr_dashboard_endpoint_columns(endpoints):  # type: ignore[no-untyped-def]
    """The dashboard's ``weight`` column: each endpoint's effective weight, as ``trafficmgr_endpoints``
    gives it to Envoy (its label, else the default; 0: the endpoint is not sent at all)."""
    return [{"name": "weight", "title": "weight",
             "values": [ep.labels.value(WEIGHT, DEFAULT_WEIGHT) for ep in endpoints]}]
