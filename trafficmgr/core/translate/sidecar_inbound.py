"""The sidecar's inbound side: listener ``inbound`` and its two fixed clusters (sidecar view only).

Connections to the pod that the agent redirected (nat PREROUTING) go on to the address the caller
dialled (``inbound|passthrough``). Ports that some service labels ``http`` (their endpoint ports) get an
HTTP connection manager, so the pod's side of a request is observable (plugins'
``trafficmgr_http_connection_manager`` with listener ``inbound`` and no service: tracing adds the server
span when the caller sampled), for connections the HTTP inspector recognises; everything else is plain
TCP, and on the other ports without waiting for client bytes (server-first protocols work). Shared by
every sidecar, so it changes only when that set of ports does, or what plugins contribute with
``trafficmgr_network_filters`` (role ``inbound``: e.g. the ``mtls`` plugin's authorization policies, put
before the chains' ``tcp_proxy``/connection manager, and its HTTP filters in the connection manager).
"""

from __future__ import annotations

import argparse
import logging

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from trafficmgr.core import cache
from trafficmgr.core.contrib import ALL_CHAINS, HttpFilter, NetworkFilter
from trafficmgr.core.protos import HCM_FILTER, TCP_PROXY_FILTER, duration_ms, pack, socket_address
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.core.translate.hooks import Hooks
from trafficmgr.core.translate.http import ROUTER_FILTER, HttpFilters, ordered
from trafficmgr.core.translate.memo import Memo
from trafficmgr.core.translate.services import Changes
from trafficmgr.core.translate.sidecar_outbound import any_port

log = logging.getLogger(__name__)

INBOUND_LISTENER = "inbound"
#: ORIGINAL_DST cluster the inbound listener forwards to: the pod's own address, as the caller dialled it.
INBOUND_CLUSTER = "inbound|passthrough"
#: A cluster without endpoints: connections made straight to the inbound port end there (see below).
BLACKHOLE_CLUSTER = "inbound|blackhole"


def inbound_port(options: argparse.Namespace) -> int:
    """The inbound listener's port; 0 when there is none (``--sidecar-inbound-port 0``, or local mode:
    nothing is redirected to it without iptables)."""
    if options.explicit_proxy:
        return 0
    return int(options.sidecar_inbound_port or 0)


class InboundTranslator:
    def __init__(self, hooks: Hooks, filters: HttpFilters, options: argparse.Namespace) -> None:
        self.hooks = hooks
        self.filters = filters
        self.options = options
        #: How many destinations use each pod port as ``http``, kept in O(changed services).
        self._http_port_counts: dict[int, int] = {}
        self._listener: Memo[str, cache.Resource] = Memo("inbound listener")
        self._clusters: Memo[str, dict[str, cache.Resource]] = Memo("inbound clusters")

    def count(self, changes: Changes) -> None:
        """Follow the HTTP target ports of the changed destinations (call on every build)."""
        counts = self._http_port_counts
        for old, new in changes.pairs():
            before = old.http_target_ports() if old is not None else frozenset()
            after = new.http_target_ports() if new is not None else frozenset()
            for p in before - after:
                counts[p] -= 1
                if not counts[p]:
                    del counts[p]
            for p in after - before:
                counts[p] = counts.get(p, 0) + 1

    def listener(self, ctx: BuildContext) -> cache.Resource:
        ports = tuple(sorted(self._http_port_counts))
        contributed = self.hooks.network_filters(INBOUND_LISTENER, ctx)
        network = ordered((f for f in contributed if isinstance(f, NetworkFilter)), "network")
        http = ordered((f for f in contributed if isinstance(f, HttpFilter)), "HTTP")
        # Keyed on the filters' content (attrs equality compares the configs as messages).
        return self._listener.get(INBOUND_LISTENER, (ports, network, http), self._make_listener, ports, network, http, ctx)

    def clusters(self, ctx: BuildContext) -> dict[str, cache.Resource]:
        """The listener's two fixed clusters, serialized once."""
        return self._clusters.get(INBOUND_CLUSTER, (), _clusters, ctx)

    def _make_listener(self, ports: tuple[int, ...], network: tuple[NetworkFilter, ...], http: tuple[HttpFilter, ...],
                       ctx: BuildContext) -> cache.Resource:
        port = inbound_port(self.options)
        routes = route_pb2.RouteConfiguration(name=INBOUND_LISTENER)
        route = routes.virtual_hosts.add(name=INBOUND_LISTENER, domains=["*"]).routes.add()
        route.match.prefix = "/"
        route.route.cluster = INBOUND_CLUSTER
        route.route.timeout.CopyFrom(duration_ms(0))  # the caller's route timeout applies, not a second one
        # The caller's sidecar already made the request id and the sampling decision: keep them.
        http_filters = [hcm_pb2.HttpFilter(name=f.name, typed_config=pack(f.config)) for f in http]
        packed_hcm = pack(self.filters.hcm(ctx, "inbound_http", [*http_filters, ROUTER_FILTER], routes, INBOUND_LISTENER,
                                           preserve_external_request_id=True))
        on_all = [listener_components_pb2.Filter(name=f.name, typed_config=pack(f.config)) for f in network if f.applies_to == ALL_CHAINS]
        on_tcp = [listener_components_pb2.Filter(name=f.name, typed_config=pack(f.config)) for f in network]
        lst = listener_pb2.Listener(name=INBOUND_LISTENER, stat_prefix=INBOUND_LISTENER)
        lst.address.CopyFrom(socket_address(self.options.sidecar_address, port))
        lst.traffic_direction = base_pb2.INBOUND
        lst.listener_filters.add(name="envoy.filters.listener.original_dst", typed_config=pack(original_dst_pb2.OriginalDst()))
        # A connection made straight to the inbound port (not redirected, so its original destination
        # is the listener itself: e.g. to 127.0.0.1:15006 inside the pod, or from a uid-1337 peer)
        # would be passed through to the same port again, and again: end it instead.
        loop = lst.filter_chains.add(name="inbound|loop")
        loop.filter_chain_match.destination_port.value = port
        loop.filters.add(name=TCP_PROXY_FILTER, typed_config=pack(
            tcp_proxy_pb2.TcpProxy(stat_prefix="inbound_loop", cluster=BLACKHOLE_CLUSTER)))
        http_ports = tuple(p for p in ports if p != port)
        if http_ports:
            # A port one service calls http may carry another protocol in other pods (8080 is common):
            # only what the inspector recognises as HTTP gets the connection manager, the rest passes
            # through. It waits for client bytes on these ports only, at most 1 s (then: pass through).
            inspector = lst.listener_filters.add(name="envoy.filters.listener.http_inspector",
                                                 typed_config=pack(http_inspector_pb2.HttpInspector()))
            inspector.filter_disabled.not_match.CopyFrom(any_port(http_ports))
            lst.listener_filters_timeout.CopyFrom(duration_ms(1000))
            lst.continue_on_listener_filters_timeout = True
        for p in http_ports:
            chain = lst.filter_chains.add(name=f"inbound|http|{p}")
            chain.filter_chain_match.destination_port.value = p
            chain.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
            chain.filters.extend(on_all)
            chain.filters.add(name=HCM_FILTER, typed_config=packed_hcm)
        tcp = tcp_proxy_pb2.TcpProxy(stat_prefix="inbound_tcp", cluster=INBOUND_CLUSTER)
        lst.default_filter_chain.name = "inbound|tcp"
        lst.default_filter_chain.filters.extend(on_tcp)
        lst.default_filter_chain.filters.add(name=TCP_PROXY_FILTER, typed_config=pack(tcp))
        self.hooks.listener(lst, INBOUND_LISTENER, ctx)
        return ctx.resource(lst, INBOUND_LISTENER, [(cache.CLUSTER, INBOUND_CLUSTER), (cache.CLUSTER, BLACKHOLE_CLUSTER)])


def _clusters(ctx: BuildContext) -> dict[str, cache.Resource]:
    c = cluster_pb2.Cluster(name=INBOUND_CLUSTER, type=cluster_pb2.Cluster.ORIGINAL_DST,
                            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    c.connect_timeout.CopyFrom(duration_ms(10000))
    # HTTP/2 (gRPC) arriving at the pod stays HTTP/2 to the application.
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.use_downstream_protocol_config.http_protocol_options.SetInParent()
    options.use_downstream_protocol_config.http2_protocol_options.SetInParent()
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(pack(options))
    hole = cluster_pb2.Cluster(name=BLACKHOLE_CLUSTER, type=cluster_pb2.Cluster.STATIC)
    hole.connect_timeout.CopyFrom(duration_ms(1000))
    hole.load_assignment.cluster_name = BLACKHOLE_CLUSTER
    return {INBOUND_CLUSTER: ctx.resource(c, INBOUND_CLUSTER), BLACKHOLE_CLUSTER: ctx.resource(hole, BLACKHOLE_CLUSTER)}
