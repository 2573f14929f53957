"""Load balancing: cluster lb policy, cookie/header hash affinity, endpoint weights."""

from __future__ import annotations

from trafficmgr import hookimpl
from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelSpec

POLICY = "traffic.lb.policy"
COOKIE_NAME = "traffic.hash.cookie.name"
COOKIE_TTL = "traffic.hash.cookie.ttl"
HEADER_NAME = "traffic.hash.header.name"
WEIGHT = "traffic.endpoint.weight"
SVC = frozenset({L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(POLICY, SVC, L.choice("ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH", "RANDOM", "MAGLEV"), "ROUND_ROBIN",
                  "cluster load-balancing policy"),
        LabelSpec(COOKIE_NAME, SVC, L.token("a cookie name"), "", "hash requests on this cookie (RING_HASH / MAGLEV)"),
        LabelSpec(COOKIE_TTL, SVC, L.integer(0, unit="ms"), 0,
                  "when > 0 Envoy generates the cookie if absent, Max-Age = ttl/1000 s"),
        LabelSpec(HEADER_NAME, SVC, L.token("a header name"), "", "hash requests on this header"),
        LabelSpec(WEIGHT, L.POD_AND_WORKLOADS, L.integer(0, 128), 100,
                  "endpoint load-balancing weight; 0 removes the pod from the endpoints"),
    ]
