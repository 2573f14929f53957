"""The sidecar's outbound side: listener ``outbound``, one RouteConfiguration per HTTP port, blocked ports.

Connections the agent redirected (nat OUTPUT) keep their original destination: a filter chain per
planned destination IP:port sends HTTP through a connection manager (routes ``outbound|<port>``, one
virtual host per service port) and TCP/direct to the cluster. Anything else is blocked: HTTP gets a 404
explaining why, other TCP is closed.

A virtual host's routes are one default route to the Service port's cluster, unless a plugin's
``trafficmgr_service_routes`` gives that Service port its own routes (Gateway API mesh routes): they
replace the default route. They are compared serialized with the previous build's, so only virtual
hosts whose routes changed are rebuilt. Items restricted to one caller namespace (``caller_namespace``:
Gateway API consumer routes) are not part of this view: they are kept in :attr:`OutboundTranslator.consumer`
and :meth:`OutboundTranslator.consumer_vhost` makes their virtual hosts for the views of that namespace's
sidecars (:mod:`~trafficmgr.core.translate.scopes`).
"""

from __future__ import annotations

import argparse
import logging
import weakref
from collections.abc import Mapping

import attrs
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from trafficmgr.core import cache
from trafficmgr.core.model import ObjectRef
from trafficmgr.core.protos import HCM_FILTER, TCP_PROXY_FILTER, duration_ms, pack, socket_address
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.core.translate.hooks import Hooks
from trafficmgr.core.translate.http import ROUTER_FILTER, Filters, HttpFilters
from trafficmgr.core.translate.memo import Memo
from trafficmgr.core.translate.plan import REASON_CONFLICT, Destination, SidecarPlan

log = logging.getLogger(__name__)

OUTBOUND_LISTENER = "outbound"
BLOCKED_BODY = "trafficmgr: port not enabled (label the service with traffic.port.<port>=http|http2|grpc|tcp|direct)\n"


def route_config_name(port: int) -> str:
    """The sidecar RouteConfiguration for every HTTP service on ``port``."""
    return f"outbound|{port}"


def blocked_virtual_host(body: str = BLOCKED_BODY) -> route_components_pb2.VirtualHost:
    """A catch-all virtual host answering the blocked 404 with ``body`` (a scoped view names its scope)."""
    vh = route_components_pb2.VirtualHost(name="blocked", domains=["*"])
    r = vh.routes.add()
    r.match.prefix = "/"
    r.direct_response.status = 404
    r.direct_response.body.inline_string = body
    return vh


def any_port(ports: tuple[int, ...]) -> listener_components_pb2.ListenerFilterChainMatchPredicate:
    """A listener-filter predicate matching a connection to any of ``ports`` (non-empty). A MatchSet
    needs two or more rules, so one port is a plain rule."""
    predicate = listener_components_pb2.ListenerFilterChainMatchPredicate()
    if len(ports) == 1:
        predicate.destination_port_range.start, predicate.destination_port_range.end = ports[0], ports[0] + 1
        return predicate
    for p in ports:
        rule = predicate.or_match.rules.add().destination_port_range
        rule.start, rule.end = p, p + 1
    return predicate


@attrs.frozen(slots=True)
class OutboundEntry:
    """One planned destination as the full sidecar view serves it: its filter chain and (HTTP) its final
    virtual host (the objects in the full view; scoped views reuse them). Equal while those are the same
    objects (compared by identity first)."""

    dest: Destination
    chain: listener_components_pb2.FilterChain
    vhost: route_components_pb2.VirtualHost | None


@attrs.frozen(slots=True, eq=False)
class OutboundOut:
    listener: cache.Resource
    routes: tuple[cache.Resource, ...]
    #: The virtual hosts of each HTTP port, in route order (the explicit proxy serves them all).
    vhosts: tuple[route_components_pb2.VirtualHost, ...]
    #: The Service port cluster of each of ``vhosts`` (where the explicit proxy's CONNECT tunnels go).
    clusters: tuple[str, ...] = ()
    #: Every planned destination in plan order (see :class:`OutboundEntry`), for the scoped views; an
    #: entry whose destination, chain and virtual host are unchanged is the previous out's entry object.
    entries: tuple[OutboundEntry, ...] = ()
    #: ``entries`` by destination key (read-only).
    by_key: Mapping[tuple[str, str, str], OutboundEntry] = attrs.field(factory=dict)
    #: The out this one was made right after (by the same translator) and the keys whose entry differs
    #: from it (added, replaced or gone): see :meth:`changed_since`.
    _base: weakref.ref[OutboundOut] | None = None
    _changed: frozenset[tuple[str, str, str]] = frozenset()

    def changed_since(self, base: OutboundOut) -> frozenset[tuple[str, str, str]] | None:
        """The destination keys whose entry differs from ``base``'s when this out was made right after
        ``base`` (``frozenset()`` when it is ``base``); None when unknown (compare yourself). Found while
        the entries are made (that walk exists anyway), so a consumer works in O(changed keys)."""
        if base is self:
            return frozenset()
        if self._base is not None and self._base() is base:
            return self._changed
        return None


class OutboundTranslator:
    def __init__(self, hooks: Hooks, filters: HttpFilters, options: argparse.Namespace) -> None:
        self.hooks = hooks
        self.filters = filters
        self.options = options
        self._out: Memo[str, OutboundOut] = Memo("outbound")
        self._chains: Memo[tuple[str, str, str], listener_components_pb2.FilterChain] = Memo("outbound chains")
        self._vhosts: Memo[tuple[str, str, str], route_components_pb2.VirtualHost] = Memo("virtual hosts")
        self._routes: Memo[str, cache.Resource] = Memo("route configurations")
        self._unique: Memo[tuple[str, str, str], route_components_pb2.VirtualHost] = Memo("unambiguous virtual hosts")
        self._shared: Memo[int, frozenset[str]] = Memo("shared domains")
        self._listener: Memo[str, cache.Resource] = Memo("outbound listener")
        self._blocked: Memo[int | None, listener_components_pb2.FilterChain] = Memo("blocked chains")
        #: Plugin routes by (caller namespace or "", namespace, service, port): the tuple last returned and
        #: its serialization.
        self._serialized: dict[tuple[str, str, str, int], tuple[tuple[object, ...], bytes]] = {}
        #: This build's caller-restricted plugin routes: caller namespace -> (namespace, service, port) ->
        #: (serialization, routes). Not in the full view.
        self.consumer: dict[str, dict[tuple[str, str, int], tuple[bytes, tuple[object, ...]]]] = {}
        self._consumer_vhosts: Memo[tuple[str, tuple[str, str, str]], route_components_pb2.VirtualHost] = Memo("consumer virtual hosts")
        #: The last out made and its entries by key (what the next one's entries are compared with).
        self._last: tuple[OutboundOut | None, dict[tuple[str, str, str], OutboundEntry]] = (None, {})

    def translate(self, plan: SidecarPlan, ctx: BuildContext) -> OutboundOut:
        filters = self.filters.for_role(ctx)
        overrides = self._service_routes(ctx)
        changed = tuple((k, v[0]) for k, v in overrides.items())  # bytes: equal when unchanged
        return self._out.get(OUTBOUND_LISTENER, (plan, filters, changed), self._translate, plan, filters, overrides, ctx)

    def _translate(self, plan: SidecarPlan, filters: Filters,
                   overrides: dict[tuple[str, str, int], tuple[bytes, tuple[object, ...]]], ctx: BuildContext) -> OutboundOut:
        for c in plan.conflicts:
            ctx.report(c.ref, c.message, REASON_CONFLICT)
        chains = [self._chains.get(d.key, (d, filters), self._chain, d, filters, ctx) for d in plan.destinations]
        by_port: dict[int, list[tuple[Destination, route_components_pb2.VirtualHost]]] = {}
        for d in plan.destinations:
            if d.http:
                svc = d.service
                data, routes = overrides.get((svc.namespace, svc.name, d.port.port), (b"", None))
                # A headless Service's virtual host names its pods' addresses: they are inputs too; plugin
                # routes by their serialization (equal bytes: the virtual host is reused).
                vh = self._vhosts.get(d.key, (d.service, d.port, d.ips if d.service.headless else (), data),
                                      self._vhost, d, routes, ctx)
                by_port.setdefault(d.port.port, []).append((d, vh))
        vhosts_by_port = {p: self._unique_domains(p, pairs, ctx) for p, pairs in by_port.items()}
        live = {d.key for d in plan.destinations}
        self._chains.keep_only(live.__contains__)
        http_live = {d.key for d in plan.destinations if d.http}
        self._vhosts.keep_only(http_live.__contains__)
        self._unique.keep_only(http_live.__contains__)
        self._shared.keep_only(by_port.__contains__)
        routes = tuple(self._routes.get(route_config_name(p), tuple(vhosts_by_port[p]), route_configuration,
                                        route_config_name(p), vhosts_by_port[p], ctx)
                       for p in sorted(vhosts_by_port))
        self._routes.keep_only({r.name for r in routes}.__contains__)
        chains += [self._blocked.get(p, (), _blocked_chain, p) for p in plan.blocked_ports]
        chains.append(self._blocked.get(None, (), _blocked_chain, None))
        tcp_ports = plan.tcp_ports
        listener = self._listener.get(OUTBOUND_LISTENER, (*chains, tcp_ports), self._make_listener, chains, tcp_ports, routes, ctx)
        vhosts = tuple(vh for p in sorted(vhosts_by_port) for vh in vhosts_by_port[p])
        clusters = tuple(d.service.cluster_name(d.port) for p in sorted(by_port) for d, _ in by_port[p])
        final = {d.key: vh for p, pairs in by_port.items() for (d, _), vh in zip(pairs, vhosts_by_port[p], strict=True)}
        # The previous out's entry object while its three parts are unchanged; the keys of the others.
        prev_out, prev = self._last
        by_key: dict[tuple[str, str, str], OutboundEntry] = {}
        changed: set[tuple[str, str, str]] = set()
        entries: list[OutboundEntry] = []
        for d, chain in zip(plan.destinations, chains, strict=False):  # chains: then the blocked ones
            vh = final.get(d.key)
            entry = prev.get(d.key)
            if entry is None or entry.chain is not chain or entry.vhost is not vh or (entry.dest is not d and entry.dest != d):
                entry = OutboundEntry(d, chain, vh)
                changed.add(d.key)
            by_key[d.key] = entry
            entries.append(entry)
        changed.update(prev.keys() - by_key.keys())
        out = OutboundOut(listener, routes, vhosts, clusters, tuple(entries), by_key,
                          None if prev_out is None else weakref.ref(prev_out), frozenset(changed))
        self._last = (out, by_key)
        return out

    def make_listener(self, chains: list[listener_components_pb2.FilterChain], tcp_ports: tuple[int, ...],
                      routes: tuple[cache.Resource, ...], ctx: BuildContext) -> cache.Resource:
        """The outbound listener of ``chains`` (a scoped view's: its own chains and blocked chains), made
        exactly as the full view's, listener hooks included."""
        return self._make_listener(chains, tcp_ports, routes, ctx)

    def _service_routes(self, ctx: BuildContext) -> dict[tuple[str, str, int], tuple[bytes, tuple[object, ...]]]:
        """Every plugin's ``trafficmgr_service_routes`` by (namespace, service, port): (serialization, routes).
        A tuple returned again (the same object) keeps its serialization; others are serialized (routes
        are small next to a rebuilt virtual host, and only changed bytes rebuild one)."""
        out: dict[tuple[str, str, int], tuple[bytes, tuple[object, ...]]] = {}
        consumer: dict[str, dict[tuple[str, str, int], tuple[bytes, tuple[object, ...]]]] = {}
        kept: dict[tuple[str, str, str, int], tuple[tuple[object, ...], bytes]] = {}
        for item in self.hooks.service_routes(ctx):
            key = (item.namespace, item.name, item.port)
            caller = item.caller_namespace
            target = out if caller is None else consumer.setdefault(caller, {})
            if key in target:
                log.error("two plugins (or items) give routes to %s/%s port %d%s: the first is used", *key,
                          "" if caller is None else f" for callers in namespace {caller}")
                continue
            skey = (caller or "", *key)
            old = self._serialized.get(skey)
            if old is not None and old[0] is item.routes:
                data = old[1]
            else:
                parts = [r.SerializeToString(deterministic=True) for r in item.routes]
                data = b"".join(len(p).to_bytes(4, "big") + p for p in parts) or b"\0"
            kept[skey] = (item.routes, data)
            target[key] = (data, item.routes)
        self._serialized = kept
        self.consumer = consumer
        self._consumer_vhosts.keep_only(lambda k: k[0] in consumer)
        return out

    def consumer_vhost(self, caller: str, entry: OutboundEntry, data: bytes, routes: tuple[object, ...],
                       ctx: BuildContext) -> route_components_pb2.VirtualHost:
        """The virtual host of ``entry``'s Service port for the sidecars of namespace ``caller``, whose
        routes (``data`` their serialization) replace the full view's: made as the full view makes one
        with plugin routes (``trafficmgr_virtual_host`` runs), with the domains of the full view's final
        virtual host (the same short names left out). The same object while its inputs are unchanged."""
        d = entry.dest
        return self._consumer_vhosts.get((caller, d.key), (entry.vhost, d.service, d.port, data),
                                         self._consumer_vhost, entry, routes, ctx)

    def _consumer_vhost(self, entry: OutboundEntry, routes: tuple[object, ...], ctx: BuildContext) -> route_components_pb2.VirtualHost:
        assert entry.vhost is not None
        vh = self._vhost(entry.dest, routes, ctx)
        del vh.domains[:]
        vh.domains.extend(entry.vhost.domains)
        return vh

    def _chain(self, d: Destination, filters: Filters, ctx: BuildContext) -> listener_components_pb2.FilterChain:
        svc, port = d.service, d.port
        chain = listener_components_pb2.FilterChain(name=svc.cluster_name(port))
        match = chain.filter_chain_match
        match.destination_port.value = port.port
        for ip in d.ips:
            match.prefix_ranges.add(address_prefix=ip).prefix_len.value = 128 if ":" in ip else 32
        if d.http:
            hcm = self.filters.hcm(ctx, f"outbound_{port.port}", filters, route_config_name(port.port),
                                   OUTBOUND_LISTENER, svc, port)
            chain.filters.add(name=HCM_FILTER, typed_config=pack(hcm))
        else:
            tcp = tcp_proxy_pb2.TcpProxy(stat_prefix=f"outbound_tcp_{port.port}", cluster=svc.cluster_name(port))
            chain.filters.add(name=TCP_PROXY_FILTER, typed_config=pack(tcp))
        return chain

    def _vhost(self, d: Destination, routes: tuple[object, ...] | None, ctx: BuildContext) -> route_components_pb2.VirtualHost:
        svc, port = d.service, d.port
        vh = route_components_pb2.VirtualHost(name=f"{svc.name}.{svc.namespace}:{port.port}")
        domains: list[str] = []
        hosts = list(svc.hostnames())
        if svc.cluster_ip and not svc.headless and svc.kind == "Service":
            hosts.append(svc.cluster_ip)
        if svc.headless and svc.kind == "Service":
            # Clients of a headless Service address one pod: by its DNS name (<pod>.<service>..., a
            # StatefulSet's pods) or by its address; ORIGINAL_DST then takes the request to that pod.
            hosts += [f"*.{h}" for h in svc.hostnames()] + list(d.ips)
        for h in hosts:
            domains.append(f"{h}:{port.port}")
            if port.port == 80:
                domains.append(h)
        vh.domains.extend(dict.fromkeys(domains or ["*"]))
        if routes is not None:
            # A plugin's routes replace the default one; they are final (its route policies already applied).
            vh.routes.extend(routes)
            self.hooks.virtual_host(vh, svc, port, ctx)
            return vh
        route = vh.routes.add()
        route.match.prefix = "/"
        route.route.cluster = svc.cluster_name(port)
        self.hooks.virtual_host(vh, svc, port, ctx)
        # The route hooks get the route as it is in the virtual host now: a virtual host plugin that rebuilt
        # the routes, or one that failed and had its change undone (a plugin that removed the route and
        # raised: the route is put back as a new object), would leave `route` detached, and every route
        # plugin's change would be lost silently.
        if not any(r is route for r in vh.routes):  # upb hands out the same object for an element still there
            route = next((r for r in vh.routes if r.route.cluster == svc.cluster_name(port)), route)
        self.hooks.route(route, svc, port, ctx)
        return vh

    def _unique_domains(self, port: int, pairs: list[tuple[Destination, route_components_pb2.VirtualHost]],
                        ctx: BuildContext) -> list[route_components_pb2.VirtualHost]:
        """The virtual hosts of one port without the domains two of them share: Envoy rejects a route
        configuration with a duplicate domain, which would freeze routing on that port for every service.
        Only short names collide (``web:9080`` of Services ``web`` in two namespaces: the client's namespace
        decides which one it means, and the sidecar view is shared by all namespaces); such a name is left
        out of every virtual host that has it, and each Service gets a Warning naming the ones to use."""
        vhosts = tuple(vh for _, vh in pairs)
        # Recounted only when a virtual host of the port changed (memoized virtual hosts are the same objects).
        shared = self._shared.get(port, vhosts, _shared_domains, vhosts)
        out = []
        for d, vh in pairs:
            drop = tuple(x for x in vh.domains if x in shared)
            out.append(self._unique.get(d.key, (vh, drop), _without_domains, d, vh, drop, ctx) if drop else vh)
        return out

    def _make_listener(self, chains: list[listener_components_pb2.FilterChain], tcp_ports: tuple[int, ...],
                       routes: tuple[cache.Resource, ...], ctx: BuildContext) -> cache.Resource:
        lst = listener_pb2.Listener(name=OUTBOUND_LISTENER, stat_prefix=OUTBOUND_LISTENER)
        lst.address.CopyFrom(socket_address(self.options.sidecar_address, int(self.options.sidecar_port)))
        lst.traffic_direction = base_pb2.OUTBOUND
        if self.options.explicit_proxy:
            # Local mode: nothing is redirected without iptables, and every sidecar of the machine would
            # bind the same port; the listener still exists so both modes share one configuration.
            lst.bind_to_port.value = False
        lst.listener_filters.add(name="envoy.filters.listener.original_dst", typed_config=pack(original_dst_pb2.OriginalDst()))
        inspector = lst.listener_filters.add(name="envoy.filters.listener.http_inspector", typed_config=pack(http_inspector_pb2.HttpInspector()))
        if tcp_ports:
            # Server-first TCP protocols would wait for the inspector's timeout: skip it on TCP ports.
            inspector.filter_disabled.CopyFrom(any_port(tcp_ports))
        lst.listener_filters_timeout.CopyFrom(duration_ms(5000))
        lst.continue_on_listener_filters_timeout = False
        lst.filter_chains.extend(chains)
        self.hooks.listener(lst, OUTBOUND_LISTENER, ctx)
        return ctx.resource(lst, OUTBOUND_LISTENER, [(cache.ROUTE, r.name) for r in routes])


def route_configuration(name: str, vhosts: list[route_components_pb2.VirtualHost], ctx: BuildContext) -> cache.Resource:
    """A RouteConfiguration of ``vhosts`` (clusters are not validated: EDS clusters may still be warming)."""
    rc = route_pb2.RouteConfiguration(name=name)
    rc.virtual_hosts.extend(vhosts)
    rc.validate_clusters.value = False
    return ctx.resource(rc, name)


def _shared_domains(vhosts: tuple[route_components_pb2.VirtualHost, ...]) -> frozenset[str]:
    """The domains more than one of ``vhosts`` names."""
    seen: set[str] = set()
    shared: set[str] = set()
    for vh in vhosts:
        for domain in set(vh.domains):
            (shared if domain in seen else seen).add(domain)
    return frozenset(shared)


def _without_domains(d: Destination, vh: route_components_pb2.VirtualHost, drop: tuple[str, ...],
                     ctx: BuildContext) -> route_components_pb2.VirtualHost:
    """A copy of ``vh`` without the domains ``drop`` (shared with another Service), reported on ``d``'s Service."""
    out = route_components_pb2.VirtualHost()
    out.CopyFrom(vh)
    del out.domains[:]
    out.domains.extend(x for x in vh.domains if x not in drop)
    svc = d.service
    ctx.report(ObjectRef(svc.kind, svc.namespace, svc.name, svc.uid, ""),
               f"{', '.join(drop)} also name{'s' if len(drop) == 1 else ''} another Service on port {d.port.port} "
               f"(same name in another namespace): sidecars do not route by {'it' if len(drop) == 1 else 'them'}; "
               f"clients use {svc.name}.{svc.namespace}:{d.port.port} or the ClusterIP", REASON_CONFLICT)
    return out


def blocked_chain(port: int | None, body: str = BLOCKED_BODY) -> listener_components_pb2.FilterChain:
    """The blocked chain of ``port`` (None: the catch-all) answering ``body``."""
    return _blocked_chain(port, body)


def _blocked_chain(port: int | None, body: str = BLOCKED_BODY) -> listener_components_pb2.FilterChain:
    """HTTP to a destination no chain serves gets a 404 explaining why (``body``); other TCP is closed
    (``port`` None: every port without chains of its own)."""
    chain = listener_components_pb2.FilterChain(name="blocked" if port is None else f"blocked|{port}")
    if port is not None:
        chain.filter_chain_match.destination_port.value = port
    chain.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="outbound_blocked", codec_type=hcm_pb2.HttpConnectionManager.AUTO)
    hcm.http_filters.append(ROUTER_FILTER)
    hcm.route_config.name = "blocked"
    hcm.route_config.virtual_hosts.append(blocked_virtual_host(body))
    chain.filters.add(name=HCM_FILTER, typed_config=pack(hcm))
    return chain
