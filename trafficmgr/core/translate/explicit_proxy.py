"""``--explicit-proxy`` (local mode, no iptables): the internal listener ``outbound_proxy`` and its routes.

It serves explicit HTTP proxy requests (``curl -x``) with the sidecar's filters and route configuration
``outbound|proxy`` (the virtual hosts of every HTTP port, then a catch-all answering the blocked 404). It
has no address: each sidecar's bootstrap forwards its own ``<pod IP>:15001`` to it (an Envoy internal
listener), so one listener serves every sidecar of the shared view.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2

from trafficmgr.core import cache
from trafficmgr.core.protos import HCM_FILTER, pack
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.core.translate.hooks import Hooks
from trafficmgr.core.translate.http import Filters, HttpFilters
from trafficmgr.core.translate.memo import Memo
from trafficmgr.core.translate.sidecar_outbound import blocked_virtual_host, route_configuration

#: The internal listener's name; the bootstrap (``trafficmgr.core.bootstrap``) forwards to it by name.
PROXY_LISTENER = "outbound_proxy"
PROXY_ROUTE = "outbound|proxy"


class ExplicitProxyTranslator:
    def __init__(self, hooks: Hooks, filters: HttpFilters) -> None:
        self.hooks = hooks
        self.filters = filters
        self._memo: Memo[str, cache.Resource] = Memo("explicit proxy")
        self._blocked = blocked_virtual_host()

    def routes(self, vhosts: tuple[route_components_pb2.VirtualHost, ...], ctx: BuildContext,
               clusters: tuple[str, ...]) -> cache.Resource:
        """Every HTTP port's virtual hosts, each with a CONNECT route first (to ``clusters[i]``, that
        Service port's cluster), then the blocked catch-all."""
        return self._memo.get(PROXY_ROUTE, (*vhosts, *clusters), self._routes, vhosts, clusters, ctx)

    def _routes(self, vhosts: tuple[route_components_pb2.VirtualHost, ...], clusters: tuple[str, ...],
                ctx: BuildContext) -> cache.Resource:
        connected = [with_connect(vh, cluster) for vh, cluster in zip(vhosts, clusters, strict=True)]
        return route_configuration(PROXY_ROUTE, [*connected, self._blocked], ctx)

    def listener(self, ctx: BuildContext) -> cache.Resource:
        filters = self.filters.for_role(ctx)
        return self._memo.get(PROXY_LISTENER, (filters,), self._listener, filters, ctx)

    def _listener(self, filters: Filters, ctx: BuildContext) -> cache.Resource:
        hcm = self.filters.hcm(ctx, PROXY_LISTENER, filters, PROXY_ROUTE, PROXY_LISTENER)
        hcm.upgrade_configs.add(upgrade_type="CONNECT")
        lst = listener_pb2.Listener(name=PROXY_LISTENER, stat_prefix=PROXY_LISTENER)
        lst.internal_listener.SetInParent()
        lst.traffic_direction = base_pb2.OUTBOUND
        lst.filter_chains.add(name="proxy").filters.add(name=HCM_FILTER, typed_config=pack(hcm))
        self.hooks.listener(lst, PROXY_LISTENER, ctx)
        return ctx.resource(lst, PROXY_LISTENER, [(cache.ROUTE, PROXY_ROUTE)])


def with_connect(vhost: route_components_pb2.VirtualHost, cluster: str) -> route_components_pb2.VirtualHost:
    """A copy of ``vhost`` whose first route terminates ``CONNECT <service>:<port>`` (how grpcio and other
    clients use an HTTP proxy): the tunnel's bytes go to ``cluster`` (the service's) as a TCP stream, so
    one tunnel reaches one pod (no per-request balancing inside it, and no plugin routes: a tunnel
    carries no requests to route). The other routes are unchanged."""
    out = route_components_pb2.VirtualHost()
    out.CopyFrom(vhost)
    connect = route_components_pb2.Route()
    connect.match.connect_matcher.SetInParent()
    connect.route.cluster = cluster
    connect.route.timeout.FromSeconds(0)
    connect.route.upgrade_configs.add(upgrade_type="CONNECT").connect_config.SetInParent()
    del out.routes[:]
    out.routes.append(connect)
    out.routes.extend(vhost.routes)
    return out
