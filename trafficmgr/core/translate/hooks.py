"""Typed calls of the build hooks: every translator calls plugins through these, never by hook name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trafficmgr.core.contrib import HttpFilter, NetworkFilter, ServiceRoutes
from trafficmgr.core.model import GRPC, Endpoint, Service, ServicePort
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.context import EndpointPair

if TYPE_CHECKING:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
    from envoy.config.listener.v3.listener_pb2 import Listener
    from envoy.config.route.v3.route_components_pb2 import Route, VirtualHost
    from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
        HttpConnectionManager,
    )

    from trafficmgr.core.cache import Resource
    from trafficmgr.core.translate.context import BuildContext


def _address_key(lb: Any) -> tuple[str, int]:
    sa = lb.endpoint.address.socket_address
    return (sa.address, sa.port_value)


class Hooks:
    """The plugin host's build hooks, with the arguments each hook declares."""

    def __init__(self, plugins: PluginHost) -> None:
        self.plugins = plugins

    def cluster(self, cluster: Cluster, service: Service, port: ServicePort, ctx: BuildContext) -> None:
        self.plugins.mutate("trafficmgr_cluster", cluster, what=cluster.name, service=service, port=port,
                            role=ctx.role, ctx=ctx)

    def endpoints(self, cla: ClusterLoadAssignment, service: Service, port: ServicePort,
                  endpoints: Sequence[Endpoint], ctx: BuildContext) -> None:
        """Each implementation gets ``pairs`` for the assignment as the previous one left it. The core
        built ``lb_endpoints`` in the order of ``endpoints``; once a plugin changed the list (removed,
        or rebuilt it), an lb_endpoint is matched to its Endpoint by address, so removals by one plugin
        do not shift the mapping for the next."""
        ready = tuple(endpoints)
        made: list[tuple[EndpointPair, ...]] = []

        def pairs() -> tuple[EndpointPair, ...]:
            current = [lb for loc in cla.endpoints for lb in loc.lb_endpoints]
            # upb hands out the same Python object for an unchanged element: identity says "untouched".
            if made and len(made[0]) == len(current) and all(p.lb_endpoint is lb for p, lb in zip(made[0], current)):
                return made[0]
            if not made and len(current) == len(ready):  # as the core built it
                fresh = tuple(map(EndpointPair._make, zip(ready, current)))
            else:
                by_address = {(e.address, e.port): e for e in ready}
                fresh = tuple(EndpointPair(by_address[key], lb) for lb in current
                              if (key := _address_key(lb)) in by_address)
            made[:] = [fresh]
            return fresh

        self.plugins.mutate("trafficmgr_endpoints", cla, what=cla.cluster_name, service=service, port=port,
                            endpoints=ready, role=ctx.role, ctx=ctx, lazy={"pairs": pairs})

    def virtual_host(self, vhost: VirtualHost, service: Service, port: ServicePort, ctx: BuildContext) -> None:
        self.plugins.mutate("trafficmgr_virtual_host", vhost, what=vhost.name, service=service, port=port,
                            role=ctx.role, ctx=ctx)

    def route(self, route: Route, service: Service, port: ServicePort, ctx: BuildContext) -> None:
        """The core's route defaults, then every plugin's ``trafficmgr_route``.

        No route timeout unless a label sets one (Envoy's default, 15 s, would end server-sent events,
        long polls and gRPC streams); a request or stream that stays idle ends after the connection
        managers' ``stream_idle_timeout``. On grpc ports the client's grpc-timeout is honoured (uncapped)."""
        route.route.timeout.FromSeconds(0)
        if port.protocol == GRPC:
            route.route.max_stream_duration.grpc_timeout_header_max.FromSeconds(0)
        self.plugins.mutate("trafficmgr_route", route, what=service.cluster_name(port), service=service, port=port,
                            role=ctx.role, ctx=ctx)

    def http_connection_manager(self, hcm: HttpConnectionManager, listener_name: str, service: Service | None,
                                port: ServicePort | None, ctx: BuildContext) -> None:
        self.plugins.mutate("trafficmgr_http_connection_manager", hcm, what=hcm.stat_prefix, role=ctx.role,
                            listener_name=listener_name, service=service, port=port, ctx=ctx)

    def listener(self, listener: Listener, listener_name: str, ctx: BuildContext) -> None:
        self.plugins.mutate("trafficmgr_listener", listener, what=listener_name, role=ctx.role,
                            listener_name=listener_name, ctx=ctx)

    def http_filters(self, ctx: BuildContext) -> list[HttpFilter]:
        return self.plugins.collect("trafficmgr_http_filters", what=f"{ctx.role} filters", role=ctx.role, ctx=ctx)

    def network_filters(self, role: str, ctx: BuildContext) -> list[NetworkFilter | HttpFilter]:
        return self.plugins.collect("trafficmgr_network_filters", what=f"{role} network filters", role=role, ctx=ctx)

    def service_routes(self, ctx: BuildContext) -> list[ServiceRoutes]:
        return self.plugins.collect("trafficmgr_service_routes", what=f"{ctx.role} service routes", role=ctx.role,
                                    model=ctx.model, ctx=ctx)

    def resources(self, ctx: BuildContext) -> list[Resource]:
        return self.plugins.collect("trafficmgr_resources", what=f"{ctx.role} resources", role=ctx.role,
                                    model=ctx.model, ctx=ctx)
