"""Tiny Envoy resource constructors for xDS tests (the real builder lives in trafficmgr.core.translate)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ep
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from trafficmgr.core import cache
from trafficmgr.core.cache import Resource, Snapshot
from trafficmgr.core.protos import ads_config_source, duration_ms, pack, socket_address, uint32

#: (host, port, weight)
Endpoint = tuple[str, int, int]


def eds_cluster(name: str) -> Resource:
    msg = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_config_source(), service_name=name),
        connect_timeout=duration_ms(1000),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    return Resource.from_message(msg, name, refs=[(cache.ENDPOINT, name)])


def bad_cluster(name: str) -> Resource:
    """A cluster Envoy 1.40 rejects: CLUSTER_PROVIDED load balancing on a STATIC cluster."""
    msg = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_ms(1000),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name),
    )
    return Resource.from_message(msg, name)


def load_assignment(name: str, endpoints: Iterable[Endpoint]) -> Resource:
    msg = endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            ep.LocalityLbEndpoints(
                locality=base_pb2.Locality(region="local", zone="local"),
                lb_endpoints=[
                    ep.LbEndpoint(
                        endpoint=ep.Endpoint(address=socket_address(host, port)),
                        load_balancing_weight=uint32(weight),
                    )
                    for host, port, weight in endpoints
                ],
            )
        ],
    )
    return Resource.from_message(msg, name)


def route_config(name: str, routes: Sequence[tuple[str, str]]) -> Resource:
    """``routes``: (path prefix, cluster), first match wins."""
    msg = route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            rc.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    rc.Route(match=rc.RouteMatch(prefix=prefix), route=rc.RouteAction(cluster=cluster))
                    for prefix, cluster in routes
                ],
            )
        ],
    )
    return Resource.from_message(msg, name, refs=[(cache.CLUSTER, c) for _, c in routes])


def http_listener(name: str, port: int, route_name: str, host: str = "127.0.0.1", stat_prefix: str = "ingress") -> Resource:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        rds=hcm_pb2.Rds(config_source=ads_config_source(), route_config_name=route_name),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))],
    )
    msg = listener_pb2.Listener(
        name=name,
        address=socket_address(host, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm)
                    )
                ]
            )
        ],
    )
    return Resource.from_message(msg, name, refs=[(cache.ROUTE, route_name)])


def web_snapshot(
    listener_port: int,
    clusters: Mapping[str, Iterable[Endpoint]],
    routes: Sequence[tuple[str, str]] | None = None,
    extra: Iterable[Resource] = (),
    previous: Snapshot | None = None,
) -> Snapshot:
    """One listener on ``listener_port`` -> route config ``web`` -> the clusters (EDS, one CLA each).

    Without ``routes``, ``/`` goes to the first cluster and ``/<name>`` to each cluster.
    """
    if routes is None:
        names = list(clusters)
        routes = [(f"/{n}", n) for n in names] + [("/", names[0])]
    resources: dict[str, list[Resource]] = {t: [] for t in cache.TYPE_ORDER}
    for name, endpoints in clusters.items():
        resources[cache.CLUSTER].append(eds_cluster(name))
        resources[cache.ENDPOINT].append(load_assignment(name, endpoints))
    resources[cache.LISTENER].append(http_listener("web", listener_port, "web"))
    resources[cache.ROUTE].append(route_config("web", routes))
    for r in extra:
        resources[r.type_url].append(r)
    return Snapshot.build(resources, previous)
