"""The gateway view's own variants of ``http`` clusters: HTTP/1.1 upstream, whatever the client spoke.

Shared ``http`` clusters use the client's protocol upstream, which is right for sidecars: an application
that speaks h2c to a service expects the service to speak it. At the gateway the client is a browser that
negotiated HTTP/2 with the gateway over TLS, which says nothing about the backend: most web backends speak
HTTP/1.1 only. So for every ``http`` cluster a gateway route targets, the gateway view gets a copy (same
name, same endpoints, same plugin changes) that always speaks HTTP/1.1. Only those clusters: the routes
are few, each route configuration is read once per version, each variant made once per cluster version.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2

from trafficmgr.core import cache
from trafficmgr.core.protos import http1_variant
from trafficmgr.core.translate.memo import Memo


def route_clusters(resource: cache.Resource) -> frozenset[str]:
    """The clusters a RouteConfiguration resource's routes target (plain and weighted)."""
    rc = route_pb2.RouteConfiguration()
    rc.ParseFromString(resource.body)
    names: set[str] = set()
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            if r.route.cluster:
                names.add(r.route.cluster)
            names.update(w.name for w in r.route.weighted_clusters.clusters)
    return frozenset(names)


def http1_cluster(base: cache.Resource) -> cache.Resource | None:
    """``base`` speaking HTTP/1.1 upstream, or None when it does not use the client's protocol."""
    c = cluster_pb2.Cluster()
    c.ParseFromString(base.body)
    if not http1_variant(c):
        return None
    return cache.Resource.from_message(c, base.name, base.refs)


class GatewayClusters:
    def __init__(self) -> None:
        self._targets: Memo[str, frozenset[str]] = Memo("gateway route targets")
        self._variants: Memo[str, cache.Resource | None] = Memo("gateway cluster variants")

    def overrides(self, routes: list[cache.Resource], clusters: cache.TypeSet) -> dict[str, cache.Resource]:
        """The variants the gateway view needs, by cluster name."""
        targets: set[str] = set()
        for r in routes:
            targets |= self._targets.get(r.name, (r,), route_clusters, r)
        self._targets.keep_only({r.name for r in routes}.__contains__)
        out: dict[str, cache.Resource] = {}
        for name in sorted(targets):
            base = clusters.resources.get(name)
            if base is None:
                continue
            variant = self._variants.get(name, (base,), http1_cluster, base)
            if variant is not None:
                out[name] = variant
        self._variants.keep_only(targets.__contains__)
        return out
