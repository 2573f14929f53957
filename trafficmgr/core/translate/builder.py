"""IR -> Envoy resources. The core makes the base resources and lets plugin hooks mutate them.

Incremental by construction: every intermediate product (cluster, assignment, virtual host, filter chain,
route configuration, listener) is memoized on the identity of the IR objects it was made from, so a
change to one pod re-translates and re-serializes only the ClusterLoadAssignment it affects.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from trafficmgr.core import cache, metrics
from trafficmgr.core.translate.context import ORDER_ROUTER, BuildContext, HttpFilter
from trafficmgr.core.corelabels import PORT_PREFIX
from trafficmgr.core.protos import ads_config_source, duration_ms, pack, socket_address
from trafficmgr.core.model import (
    GATEWAY,
    Pod,
    SIDECAR,
    Endpoint,
    Model,
    ObjectRef,
    Service,
    ServicePort,
)
from trafficmgr.core.plugins import PluginHost

log = logging.getLogger(__name__)

HTTP, TCP, DIRECT = "http", "tcp", "direct"
OUTBOUND_LISTENER = "outbound"
#: Inbound side of sidecars: connections to the pod, redirected by the agent (nat PREROUTING).
INBOUND_LISTENER = "inbound"
#: ORIGINAL_DST cluster the inbound listener forwards to: the pod's own address, as the caller dialled it.
INBOUND_CLUSTER = "inbound|passthrough"
#: A cluster without endpoints: connections made straight to the inbound port end there (see below).
BLACKHOLE_CLUSTER = "inbound|blackhole"
#: ``--explicit-proxy``: the internal listener serving explicit HTTP proxy requests, and its routes.
PROXY_LISTENER = "outbound_proxy"
PROXY_ROUTE = "outbound|proxy"
BLOCKED_BODY = "trafficmgr: port not enabled (label the service with traffic.port.<port>=http|tcp|direct)\n"
DEFAULT_CONNECT_TIMEOUT_MS = 60000


def route_config_name(port: int) -> str:
    """The sidecar RouteConfiguration for every HTTP service on ``port``."""
    return f"outbound|{port}"


#: The terminal HTTP filter of every connection manager (immutable by convention: it is only copied).
ROUTER_FILTER = hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))


def _any_port(ports: Sequence[int]) -> listener_components_pb2.ListenerFilterChainMatchPredicate:
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


def default_options() -> argparse.Namespace:
    return argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0", explicit_proxy=False, sidecar_inbound_port=15006)


@attrs.define
class BuildStats:
    """What the last build did (for benchmarks, logs and ``/debug/build``)."""

    seconds: float = 0.0
    serialized: dict[str, int] = attrs.field(factory=dict)
    resources: int = 0
    bytes: int = 0

    @property
    def total_serialized(self) -> int:
        return sum(self.serialized.values())


class Builder:
    """Builds one :class:`~trafficmgr.core.cache.Snapshot` per role from a :class:`Model`.

    ``build(model)`` is cheap to call repeatedly: unchanged IR objects reuse their resources. Not
    thread-safe: call it from one thread at a time.
    """

    def __init__(
        self,
        plugins: PluginHost,
        options: argparse.Namespace | None = None,
        reporter: Callable[[ObjectRef, str, str], None] | None = None,
    ) -> None:
        self.plugins = plugins
        self.options = options or default_options()
        for key, value in vars(default_options()).items():
            if not hasattr(self.options, key):
                setattr(self.options, key, value)
        self.reporter = reporter or (lambda ref, msg, reason: log.warning("%s: %s", ref, msg))
        self.stats = BuildStats()
        self._resources: dict[tuple[str, str], cache.Resource] = {}
        self._clusters: dict[str, tuple[Service, ServicePort, cache.Resource]] = {}
        self._assignments: dict[str, tuple[Service, ServicePort, tuple[Endpoint, ...], cache.Resource]] = {}
        self._vhosts: dict[tuple[str, str, str, str], tuple[Service, ServicePort, route_components_pb2.VirtualHost]] = {}
        self._route_configs: dict[tuple[str, str], tuple[tuple[int, ...], cache.Resource]] = {}
        self._chains: dict[tuple[str, str, str], tuple[Any, listener_components_pb2.FilterChain]] = {}
        self._listeners: dict[str, tuple[tuple[int, ...], cache.Resource]] = {}
        self._implied: dict[tuple[str, str], tuple[Service, tuple[Any, ...], Service]] = {}
        self._memos: dict[str, dict[str, Any]] = {SIDECAR: {}, GATEWAY: {}}
        self._filters: dict[str, tuple[tuple[HttpFilter, ...], list[hcm_pb2.HttpFilter]]] = {}
        self._previous: dict[str, cache.Snapshot] = {}
        self._services: dict[tuple[str, str], _ServiceOut] = {}
        self._shared: dict[str, cache.TypeSet] | None = None
        self._listener_inputs: tuple[Any, ...] | None = None
        self._pod_services: dict[tuple[str, str], tuple[Pod, Service]] = {}
        self._blocked: dict[int | None, listener_components_pb2.FilterChain] = {}
        self._proxy: tuple[Any, ...] | None = None
        self._blocked_vh: route_components_pb2.VirtualHost | None = None
        self._inbound: tuple[Any, ...] | None = None
        self._sidecar_inputs_changed = True
        self._http_port_counts: dict[int, int] = {}
        self._extras_memo: dict[tuple[str, str], tuple[cache.TypeSet, dict[str, str], cache.TypeSet]] = {}
        self._inbound_cluster_resources: dict[str, cache.Resource] | None = None

    # -- public -------------------------------------------------------------------------------

    def build(self, model: Model) -> dict[str, cache.Snapshot]:
        """Snapshots by role (``sidecar``, ``gateway``); deterministic for equal inputs."""
        start = time.perf_counter()
        self.stats = BuildStats()
        services = self._effective_services(model)
        self._cluster_ctx = self._context(SIDECAR, model)
        outputs: list[_ServiceOut] = []
        changed = False
        replaced: list[tuple[_ServiceOut | None, _ServiceOut]] = []
        get_eps, previous = model.endpoints.get, self._services
        added = False
        for svc in services:
            out = previous.get((svc.namespace, svc.name))
            # Unchanged when the same Service object and equal endpoints (identity first, in C).
            if out is None or out.svc is not svc or tuple(map(get_eps, out.ep_keys)) != out.eps:
                eps = tuple(get_eps((svc.namespace, svc.name, p.name)) for p in svc.ports)
                added = added or out is None
                old_out = out
                out = self._service_out(model, svc, eps, out)
                replaced.append((old_out, out))
                changed = True
            outputs.append(out)
        removed: list[_ServiceOut] = []
        if added or len(outputs) != len(previous):
            live = {(o.svc.namespace, o.svc.name): o for o in outputs}
            removed = [o for k, o in previous.items() if k not in live]
            self._services = live
        else:  # the same services: update the replaced ones in place, O(changes)
            for _, new in replaced:
                previous[(new.svc.namespace, new.svc.name)] = new
        self._count_http_ports(replaced, removed)
        # Whether the sidecar listener's inputs may differ from the last build's (else it is reused).
        self._sidecar_inputs_changed = bool(removed) or any(
            old is None or new.sidecar is None or new.sidecar is not old.sidecar for old, new in replaced)
        shared = self._shared_types(outputs, changed or bool(removed), replaced, removed)
        snapshots: dict[str, cache.Snapshot] = {}
        for role in (SIDECAR, GATEWAY):
            ctx = self._context(role, model)
            resources: dict[str, Any] = {t: [] for t in cache.TYPE_ORDER}
            resources.update(shared)
            # Resources of a type shared between views (clusters, endpoints) that only this view has.
            extras: dict[str, dict[str, cache.Resource]] = {}
            if role == SIDECAR:
                listener, routes = self._sidecar_listener(ctx, outputs)
                resources[cache.LISTENER].append(listener)
                resources[cache.ROUTE].extend(routes)
                if self.options.explicit_proxy:
                    resources[cache.LISTENER].append(self._proxy_listener(ctx))
                elif self._inbound_port():
                    resources[cache.LISTENER].append(self._inbound_listener(ctx))
                    extras[cache.CLUSTER] = dict(self._inbound_clusters())
            for res in self.plugins.collect("trafficmgr_resources", what=f"{role} resources", ctx=ctx):
                if res.type_url == cache.SECRET and role != GATEWAY:
                    log.error("a plugin contributed secret %r to the %s view: dropped (secrets go to gateways only)", res.name, role)
                    continue
                if isinstance(resources[res.type_url], cache.TypeSet):
                    extras.setdefault(res.type_url, {})[res.name] = res
                else:
                    resources[res.type_url].append(res)
            for type_url, extra in extras.items():
                resources[type_url] = self._with_extras(role, resources[type_url], extra)
            snapshots[role] = cache.Snapshot.build(resources, self._previous.get(role))
        self._previous = snapshots
        self.stats.seconds = time.perf_counter() - start
        self.stats.resources = sum(s.resource_count() for s in snapshots.values())
        metrics.BUILD_DURATION.observe(self.stats.seconds)
        return snapshots

    def _service_out(self, model: Model, svc: Service, eps: tuple[Any, ...], old: _ServiceOut | None) -> _ServiceOut:
        """Clusters and assignments of one service (reusing per-port memos where inputs are unchanged)."""
        out = _ServiceOut(svc, eps, tuple((svc.namespace, svc.name, p.name) for p in svc.ports))
        if old is not None and old.svc is svc and not svc.headless:
            out.sidecar, out.filters = old.sidecar, old.filters  # they depend on endpoints only when headless
        for port in svc.ports:
            if port.protocol not in (HTTP, TCP, DIRECT):
                continue
            name = svc.cluster_name(port)
            out.names.append(name)
            out.clusters.append(self._cluster(svc, port, name))
            if self._is_eds(svc, port):
                out.assignments.append(self._assignment(model, svc, port, name))
        if old is not None:
            for stale in set(old.names) - set(out.names):
                self._clusters.pop(stale, None)
                self._assignments.pop(stale, None)
        return out

    def _shared_types(self, outputs: list[_ServiceOut], changed: bool, replaced: list[tuple[_ServiceOut | None, _ServiceOut]],
                      removed: list[_ServiceOut]) -> dict[str, cache.TypeSet]:
        """Cluster and endpoint TypeSets, shared by every view; derived from the previous ones in
        O(changed services), rebuilt from scratch only the first time."""
        if self._shared is not None and not changed:
            return self._shared
        live = {n for o in outputs for n in o.names} if removed or self._shared is None else None
        if live is not None:
            for memo in (self._clusters, self._assignments):
                for stale in memo.keys() - live:
                    del memo[stale]
        if self._shared is None:
            self._shared = {
                cache.CLUSTER: cache.TypeSet(cache.CLUSTER, [r for o in outputs for r in o.clusters]),
                cache.ENDPOINT: cache.TypeSet(cache.ENDPOINT, [r for o in outputs for r in o.assignments]),
            }
            return self._shared
        cluster_changes: dict[str, cache.Resource | None] = {}
        assignment_changes: dict[str, cache.Resource | None] = {}
        for old, new in [*replaced, *((o, None) for o in removed)]:
            for changes, attr in ((cluster_changes, "clusters"), (assignment_changes, "assignments")):
                before = {r.name: r for r in getattr(old, attr)} if old is not None else {}
                after = {r.name: r for r in getattr(new, attr)} if new is not None else {}
                for name, res in after.items():
                    if before.get(name) is not res:
                        changes[name] = res
                for name in before.keys() - after.keys():
                    changes.setdefault(name, None)
        self._shared = {
            cache.CLUSTER: self._shared[cache.CLUSTER].derive(cluster_changes),
            cache.ENDPOINT: self._shared[cache.ENDPOINT].derive(assignment_changes),
        }
        return self._shared

    # -- resources ----------------------------------------------------------------------------

    def resource(self, message: Message, name: str, refs: Iterable[tuple[str, str]] = ()) -> cache.Resource:
        """Serialize once; keep the previous Resource object when the bytes are unchanged."""
        res = cache.Resource.from_message(message, name, refs)
        type_short = cache.short_name(res.type_url)
        self.stats.serialized[type_short] = self.stats.serialized.get(type_short, 0) + 1
        metrics.RESOURCES_SERIALIZED.labels(type=type_short).inc()
        key = (res.type_url, name)
        old = self._resources.get(key)
        if old is not None and old.body == res.body and old.refs == res.refs:
            return old
        self._resources[key] = res
        return res

    def _context(self, role: str, model: Model) -> BuildContext:
        return BuildContext(role, model, self.options, self.resource, self._route_hooks, self.reporter, self._memos[role],
                            hcm_factory=self._plugin_hcm, listener_hooks=self._listener_hooks)

    def _route_hooks(self, route: Message, service: Service, port: ServicePort, ctx: BuildContext) -> None:
        self.plugins.mutate("trafficmgr_route", route, what=service.cluster_name(port), service=service, port=port, ctx=ctx)

    def _plugin_hcm(self, ctx: BuildContext, stat_prefix: str, rds: str) -> hcm_pb2.HttpConnectionManager:
        """``ctx.http_connection_manager``: an HCM with the role's filters, for listeners plugins build."""
        return self._hcm(ctx, stat_prefix, self._http_filters(ctx), rds)

    def _listener_hooks(self, listener: Message, ctx: BuildContext) -> None:
        self.plugins.mutate("trafficmgr_listener", listener, what=ctx.listener_name or listener.name, ctx=ctx)

    # -- model preparation --------------------------------------------------------------------

    def _effective_services(self, model: Model) -> list[Service]:
        """Services sorted by key, with protocols implied by plugins applied, plus pod destinations."""
        implied: dict[tuple[str, str], list[tuple[int | str, str]]] = {}
        for ns, name, port, proto in self.plugins.collect("trafficmgr_port_protocols", model=model, options=self.options):
            implied.setdefault((ns, name), []).append((port, proto))
        out: list[Service] = []
        for key in sorted(model.services):
            svc = model.services[key]
            if key in implied:
                extra = tuple(sorted(implied[key], key=str))
                prev = self._implied.get(key)
                if prev is not None and prev[0] is svc and prev[1] == extra:
                    svc = prev[2]
                else:
                    evolved = _apply_implied(svc, extra)
                    self._implied[key] = (model.services[key], extra, evolved)
                    svc = evolved
            out.append(svc)
        for stale in [k for k in self._implied if k not in implied or k not in model.services]:
            del self._implied[stale]
        out.extend(self._pod_destinations(model))
        return out

    def _pod_destinations(self, model: Model) -> list[Service]:
        """Service-like destinations for pods with their own ``traffic.port.<port>`` labels."""
        out: list[Service] = []
        memo: dict[tuple[str, str], tuple[Pod, Service]] = {}
        for key, pod in model.port_pods.items():
            prev = self._pod_services.get(key)
            if prev is not None and prev[0] is pod:
                svc = prev[1]
            else:
                ports = []
                for k, v in sorted(pod.labels.items()):
                    if k.startswith(PORT_PREFIX):
                        number = int(k[len(PORT_PREFIX):])
                        ports.append(ServicePort(f"pod-{number}", number, number, v))
                svc = Service(pod.namespace, pod.name, tuple(ports), cluster_ip=pod.ip, labels=pod.labels,
                              headless=True, uid=pod.uid, kind="Pod")
            if key in model.services:
                self.reporter(ObjectRef("Pod", pod.namespace, pod.name, pod.uid),
                              f"pod {pod.name} has traffic.port labels but a Service of the same name exists; "
                              "its own ports are ignored", "TrafficConfigConflict")
                continue
            memo[key] = (pod, svc)
            out.append(svc)
        self._pod_services = memo
        return sorted(out, key=lambda s: (s.namespace, s.name))

    @staticmethod
    def _is_eds(svc: Service, port: ServicePort) -> bool:
        return port.protocol in (HTTP, TCP) and not svc.headless

    # -- clusters and endpoints ---------------------------------------------------------------

    def _cluster(self, svc: Service, port: ServicePort, name: str) -> cache.Resource:
        memo = self._clusters.get(name)
        if memo is not None and memo[0] is svc and memo[1] is port:
            return memo[2]
        c = cluster_pb2.Cluster(name=name, connect_timeout=duration_ms(DEFAULT_CONNECT_TIMEOUT_MS))
        refs: list[tuple[str, str]] = []
        if port.protocol == DIRECT:
            c.type = cluster_pb2.Cluster.STATIC
            c.load_assignment.cluster_name = name
            if svc.cluster_ip:
                lb = c.load_assignment.endpoints.add().lb_endpoints.add()
                lb.endpoint.address.CopyFrom(socket_address(svc.cluster_ip, port.port))
        elif svc.headless:
            c.type = cluster_pb2.Cluster.ORIGINAL_DST
            c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
        else:
            c.type = cluster_pb2.Cluster.EDS
            c.eds_cluster_config.eds_config.CopyFrom(ads_config_source())
            refs.append((cache.ENDPOINT, name))
        self.plugins.mutate("trafficmgr_cluster", c, what=name, service=svc, port=port, ctx=self._cluster_ctx)
        res = self.resource(c, name, refs)
        self._clusters[name] = (svc, port, res)
        return res

    def _assignment(self, model: Model, svc: Service, port: ServicePort, name: str) -> cache.Resource:
        endpoints = model.endpoints_of(svc, port)
        memo = self._assignments.get(name)
        if memo is not None and memo[0] is svc and memo[1] is port and memo[2] is endpoints:
            return memo[3]
        ready = tuple(e for e in endpoints if e.ready)
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        loc = cla.endpoints.add()
        loc.locality.zone = "default"
        for ep in ready:
            lb = loc.lb_endpoints.add()
            lb.endpoint.address.CopyFrom(socket_address(ep.address, ep.port))
        self.plugins.mutate(
            "trafficmgr_endpoints", cla, what=name, service=svc, port=port, endpoints=ready, ctx=self._cluster_ctx
        )
        res = self.resource(cla, name)
        self._assignments[name] = (svc, port, endpoints, res)
        return res

    # -- sidecar listener and routes ----------------------------------------------------------

    def _http_filters(self, ctx: BuildContext) -> list[hcm_pb2.HttpFilter]:
        contributed: list[HttpFilter] = self.plugins.collect("trafficmgr_http_filters", what=f"{ctx.role} filters", ctx=ctx)
        names: set[str] = set()
        ordered: list[HttpFilter] = []
        for f in sorted(contributed, key=lambda f: (f.order, f.name)):
            if f.order >= ORDER_ROUTER:
                log.error("HTTP filter %r has order %d: orders from %d on are the router's; dropped", f.name, f.order, ORDER_ROUTER)
                continue
            if f.name in names:
                log.error("HTTP filter %r contributed twice: the second one was dropped", f.name)
                continue
            names.add(f.name)
            ordered.append(f)
        # The same contributions (attrs equality, configs compared as messages) keep the same list object,
        # which the listener and chain memos recognise; nothing is packed for an unchanged set.
        key = tuple(ordered)
        prev = self._filters.get(ctx.role)
        if prev is not None and prev[0] == key:
            return prev[1]
        filters = [hcm_pb2.HttpFilter(name=f.name, typed_config=pack(f.config)) for f in ordered]
        filters.append(ROUTER_FILTER)
        self._filters[ctx.role] = (key, filters)
        return filters

    def _hcm(self, ctx: BuildContext, stat_prefix: str, filters: list[hcm_pb2.HttpFilter],
             routes: str | route_pb2.RouteConfiguration | None, **fields: Any) -> hcm_pb2.HttpConnectionManager:
        """A connection manager with ``filters`` and its routes by RDS name (or inline), after the
        ``trafficmgr_http_connection_manager`` hooks."""
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix, codec_type=hcm_pb2.HttpConnectionManager.AUTO, **fields)
        hcm.http_filters.extend(filters)
        if isinstance(routes, str):
            hcm.rds.config_source.CopyFrom(ads_config_source())
            hcm.rds.route_config_name = routes
        elif routes is not None:
            hcm.route_config.CopyFrom(routes)
        self.plugins.mutate("trafficmgr_http_connection_manager", hcm, what=stat_prefix, ctx=ctx)
        return hcm

    def _vhost(self, ctx: BuildContext, svc: Service, port: ServicePort) -> route_components_pb2.VirtualHost:
        key = (ctx.role, svc.namespace, svc.name, port.name or str(port.port))
        memo = self._vhosts.get(key)
        if memo is not None and memo[0] is svc and memo[1] is port:
            return memo[2]
        name = svc.cluster_name(port)
        vh = route_components_pb2.VirtualHost(name=f"{svc.name}.{svc.namespace}:{port.port}")
        domains: list[str] = []
        hosts = list(svc.hostnames())
        if svc.cluster_ip and not svc.headless and svc.kind == "Service":
            hosts.append(svc.cluster_ip)
        for h in hosts:
            domains.append(f"{h}:{port.port}")
            if port.port == 80:
                domains.append(h)
        if not domains:
            domains = ["*"]
        vh.domains.extend(dict.fromkeys(domains))
        route = vh.routes.add()
        route.match.prefix = "/"
        route.route.cluster = name
        self.plugins.mutate("trafficmgr_virtual_host", vh, what=name, service=svc, port=port, ctx=ctx)
        self._route_hooks(route, svc, port, ctx)
        self._vhosts[key] = (svc, port, vh)
        return vh

    def _route_config(self, ctx: BuildContext, name: str, vhosts: list[route_components_pb2.VirtualHost]) -> cache.Resource:
        # Memo keys hold the objects themselves: tuple equality tries ``is`` first (C speed for the usual
        # unchanged case), and an id() of a freed object could be reused by a different one.
        ids = tuple(vhosts)
        memo = self._route_configs.get((ctx.role, name))
        if memo is not None and memo[0] == ids:
            return memo[1]
        rc = route_pb2.RouteConfiguration(name=name)
        rc.virtual_hosts.extend(vhosts)
        rc.validate_clusters.value = False
        res = self.resource(rc, name)
        self._route_configs[(ctx.role, name)] = (ids, res)
        return res

    def _chain(self, ctx: BuildContext, svc: Service, port: ServicePort, ips: tuple[str, ...], filters: list[hcm_pb2.HttpFilter]) -> listener_components_pb2.FilterChain:
        key = (svc.namespace, svc.name, port.name or str(port.port))
        inputs = (svc, port, ips, filters)
        memo = self._chains.get(key)
        if memo is not None and memo[0][0] is svc and memo[0][1] is port and memo[0][2] == ips and memo[0][3] is filters:
            return memo[1]
        chain = listener_components_pb2.FilterChain(name=svc.cluster_name(port))
        match = chain.filter_chain_match
        match.destination_port.value = port.port
        for ip in ips:
            match.prefix_ranges.add(address_prefix=ip).prefix_len.value = _host_prefix_len(ip)
        if port.protocol == HTTP:
            ctx.service, ctx.port = svc, port
            ctx.listener_name = OUTBOUND_LISTENER
            hcm = self._hcm(ctx, f"outbound_{port.port}", filters, route_config_name(port.port))
            ctx.service = ctx.port = None
            chain.filters.add(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))
        else:
            tcp = tcp_proxy_pb2.TcpProxy(stat_prefix=f"outbound_tcp_{port.port}", cluster=svc.cluster_name(port))
            chain.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=pack(tcp))
        self._chains[key] = (inputs, chain)
        return chain

    def _sidecar_listener(self, ctx: BuildContext, outputs: list[_ServiceOut]) -> tuple[cache.Resource, list[cache.Resource]]:
        ctx.service = ctx.port = None
        filters = self._http_filters(ctx)
        memo = self._listener_inputs
        if memo is not None and memo[1] is filters and not self._sidecar_inputs_changed:
            return memo[2], memo[3]
        for out in outputs:
            if out.sidecar is None or out.filters is not filters:
                out.sidecar = self._sidecar_parts(ctx, out, filters)
                out.filters = filters
        inputs = tuple(out.sidecar for out in outputs)
        if memo is not None and memo[0] == inputs and memo[1] is filters:
            return memo[2], memo[3]
        chains: list[listener_components_pb2.FilterChain] = []
        vhosts_by_port: dict[int, list[route_components_pb2.VirtualHost]] = {}
        tcp_ports: set[int] = set()
        used_chains: set[tuple[str, str, str]] = set()
        used_vhosts: set[tuple[str, str, str, str]] = set()
        seen_match: dict[tuple[str, int], str] = {}
        for out in outputs:
            for port, ips, chain, vhost, key in out.sidecar or ():
                ips = tuple(ip for ip in ips if _claim(seen_match, ip, port.port, chain.name, self.reporter, out.svc))
                if not ips:
                    continue
                if len(ips) != len(chain.filter_chain_match.prefix_ranges):
                    chain = self._chain(ctx, out.svc, port, ips, filters)
                chains.append(chain)
                used_chains.add(key)
                if vhost is not None:
                    vhosts_by_port.setdefault(port.port, []).append(vhost)
                    used_vhosts.add((ctx.role, *key))
                else:
                    tcp_ports.add(port.port)
        for stale in self._chains.keys() - used_chains:
            del self._chains[stale]
        for stale in [k for k in self._vhosts if k[0] == ctx.role and k not in used_vhosts]:
            del self._vhosts[stale]
        routes = [self._route_config(ctx, route_config_name(p), vhosts_by_port[p]) for p in sorted(vhosts_by_port)]
        if self.options.explicit_proxy:
            every = [vh for p in sorted(vhosts_by_port) for vh in vhosts_by_port[p]]
            routes.append(self._route_config(ctx, PROXY_ROUTE, [*every, self._blocked_vhost()]))
        live_routes = {(ctx.role, r.name) for r in routes}
        for stale in [k for k in self._route_configs if k[0] == ctx.role and k not in live_routes]:
            del self._route_configs[stale]
        for p in sorted({c.filter_chain_match.destination_port.value for c in chains} - tcp_ports):
            chains.append(self._blocked_chain(p))
        chains.append(self._blocked_chain(None))
        ids = (*chains, *sorted(tcp_ports))
        memo = self._listeners.get(OUTBOUND_LISTENER)
        if memo is not None and memo[0] == ids:
            self._listener_inputs = (inputs, filters, memo[1], routes)
            return memo[1], routes
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
            inspector.filter_disabled.CopyFrom(_any_port(sorted(tcp_ports)))
        lst.listener_filters_timeout.CopyFrom(duration_ms(5000))
        lst.continue_on_listener_filters_timeout = False
        lst.filter_chains.extend(chains)
        ctx.listener_name = OUTBOUND_LISTENER
        self.plugins.mutate("trafficmgr_listener", lst, what=OUTBOUND_LISTENER, ctx=ctx)
        refs = [(cache.ROUTE, r.name) for r in routes]
        res = self.resource(lst, OUTBOUND_LISTENER, refs)
        self._listeners[OUTBOUND_LISTENER] = (ids, res)
        self._listener_inputs = (inputs, filters, res, routes)
        return res, routes

    def _sidecar_parts(self, ctx: BuildContext, out: _ServiceOut, filters: list[hcm_pb2.HttpFilter]) -> list[tuple[Any, ...]]:
        """(port, destination IPs, filter chain, virtual host or None, key) for each enabled port."""
        svc = out.svc
        parts: list[tuple[Any, ...]] = []
        for port in svc.ports:
            if port.protocol not in (HTTP, TCP, DIRECT):
                continue
            if svc.kind == "Pod":
                ips = (svc.cluster_ip,) if svc.cluster_ip else ()
            elif svc.headless:
                ips = tuple(sorted({e.address for e in ctx.model.endpoints_of(svc, port)}))
            elif svc.cluster_ip:
                ips = (svc.cluster_ip,)
            else:
                ips = ()
            if not ips:
                continue
            key = (svc.namespace, svc.name, port.name or str(port.port))
            chain = self._chain(ctx, svc, port, ips, filters)
            vhost = self._vhost(ctx, svc, port) if port.protocol == HTTP else None
            parts.append((port, ips, chain, vhost, key))
        return parts

    def _blocked_vhost(self) -> route_components_pb2.VirtualHost:
        """Catch-all virtual host of the explicit proxy routes: the blocked chains' 404."""
        if self._blocked_vh is None:
            vh = route_components_pb2.VirtualHost(name="blocked", domains=["*"])
            r = vh.routes.add()
            r.match.prefix = "/"
            r.direct_response.status = 404
            r.direct_response.body.inline_string = BLOCKED_BODY
            self._blocked_vh = vh
        return self._blocked_vh

    def _proxy_listener(self, ctx: BuildContext) -> cache.Resource:
        """``--explicit-proxy`` (local mode, no iptables): internal listener ``outbound_proxy`` serving
        explicit HTTP proxy requests (``curl -x``) with the sidecar's filters and route configuration
        ``outbound|proxy`` (the virtual hosts of every HTTP port, then a catch-all answering the blocked
        404). It has no address: each sidecar's bootstrap forwards its own ``<pod IP>:15001`` to it (an
        Envoy internal listener), so one listener serves every sidecar of the shared view."""
        ctx.service = ctx.port = None
        filters = self._http_filters(ctx)
        if self._proxy is not None and self._proxy[0] is filters:
            return self._proxy[1]
        ctx.listener_name = PROXY_LISTENER
        hcm = self._hcm(ctx, PROXY_LISTENER, filters, PROXY_ROUTE)
        lst = listener_pb2.Listener(name=PROXY_LISTENER, stat_prefix=PROXY_LISTENER)
        lst.internal_listener.SetInParent()
        lst.traffic_direction = base_pb2.OUTBOUND
        lst.filter_chains.add(name="proxy").filters.add(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))
        self.plugins.mutate("trafficmgr_listener", lst, what=PROXY_LISTENER, ctx=ctx)
        res = self.resource(lst, PROXY_LISTENER, [(cache.ROUTE, PROXY_ROUTE)])
        self._proxy = (filters, res)
        return res

    def _inbound_port(self) -> int:
        """The inbound listener's port; 0 when there is none (``--sidecar-inbound-port 0``, or local mode:
        nothing is redirected to it without iptables)."""
        if self.options.explicit_proxy:
            return 0
        return int(self.options.sidecar_inbound_port or 0)

    def _inbound_clusters(self) -> dict[str, cache.Resource]:
        """The inbound listener's two fixed clusters (sidecars only), serialized once."""
        if self._inbound_cluster_resources is None:
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
            self._inbound_cluster_resources = {INBOUND_CLUSTER: self.resource(c, INBOUND_CLUSTER),
                                               BLACKHOLE_CLUSTER: self.resource(hole, BLACKHOLE_CLUSTER)}
        return self._inbound_cluster_resources

    def _with_extras(self, role: str, base: cache.TypeSet, extra: dict[str, cache.Resource]) -> cache.TypeSet:
        """``base`` (a TypeSet shared between views) plus this view's own resources of its type (the
        sidecar's inbound clusters, plugin resources), derived in
        O(extras) and reused while neither ``base`` nor the extras' versions change, so a plugin's
        resource (the tracing plugin's collector cluster) does not undo the O(changes) builds."""
        key = (role, base.type_url)
        versions = {name: r.version for name, r in extra.items()}
        memo = self._extras_memo.get(key)
        if memo is not None and memo[0] is base and memo[1] == versions:
            return memo[2]
        derived = base.derive(extra)
        self._extras_memo[key] = (base, versions, derived)
        return derived

    def _count_http_ports(self, replaced: list[tuple[_ServiceOut | None, _ServiceOut]], removed: list[_ServiceOut]) -> None:
        """Keep how many services use each pod port as ``http`` (the inbound listener's chains), in
        O(changed services)."""
        counts = self._http_port_counts
        for old, new in [*replaced, *((o, None) for o in removed)]:
            before = old.http_target_ports() if old is not None else frozenset()
            after = new.http_target_ports() if new is not None else frozenset()
            if before == after:
                continue
            for p in before - after:
                counts[p] -= 1
                if not counts[p]:
                    del counts[p]
            for p in after - before:
                counts[p] = counts.get(p, 0) + 1

    def _inbound_listener(self, ctx: BuildContext) -> cache.Resource:
        """Listener ``inbound``: connections to the pod that the agent redirected (nat PREROUTING).

        Every connection goes on to the address the caller dialled (``inbound|passthrough``). Ports that
        some service labels ``http`` (their endpoint ports) get an HTTP connection manager, so the pod's
        side of a request is observable (plugins' ``trafficmgr_http_connection_manager`` with
        ``ctx.listener_name == "inbound"`` and no service: tracing adds the server span when the caller
        sampled), for connections the HTTP inspector recognises; everything else is plain TCP, and on
        the other ports without waiting for client bytes (server-first protocols work). Shared by every
        sidecar, so it changes only when that set of ports does."""
        if self._inbound is not None and self._inbound[0] == self._http_port_counts.keys():
            return self._inbound[1]
        ports = tuple(sorted(self._http_port_counts))
        ctx.service = ctx.port = None
        ctx.listener_name = INBOUND_LISTENER
        inbound_port = self._inbound_port()
        routes = route_pb2.RouteConfiguration(name=INBOUND_LISTENER)
        route = routes.virtual_hosts.add(name=INBOUND_LISTENER, domains=["*"]).routes.add()
        route.match.prefix = "/"
        route.route.cluster = INBOUND_CLUSTER
        route.route.timeout.CopyFrom(duration_ms(0))  # the caller's route timeout applies, not a second one
        # The caller's sidecar already made the request id and the sampling decision: keep them.
        packed_hcm = pack(self._hcm(ctx, "inbound_http", [ROUTER_FILTER], routes, preserve_external_request_id=True))
        lst = listener_pb2.Listener(name=INBOUND_LISTENER, stat_prefix=INBOUND_LISTENER)
        lst.address.CopyFrom(socket_address(self.options.sidecar_address, inbound_port))
        lst.traffic_direction = base_pb2.INBOUND
        lst.listener_filters.add(name="envoy.filters.listener.original_dst", typed_config=pack(original_dst_pb2.OriginalDst()))
        # A connection made straight to the inbound port (not redirected, so its original destination
        # is the listener itself: e.g. to 127.0.0.1:15006 inside the pod, or from a uid-1337 peer)
        # would be passed through to the same port again, and again: end it instead.
        loop = lst.filter_chains.add(name="inbound|loop")
        loop.filter_chain_match.destination_port.value = inbound_port
        loop.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=pack(
            tcp_proxy_pb2.TcpProxy(stat_prefix="inbound_loop", cluster=BLACKHOLE_CLUSTER)))
        http_ports = [p for p in ports if p != inbound_port]
        if http_ports:
            # A port one service calls http may carry another protocol in other pods (8080 is common):
            # only what the inspector recognises as HTTP gets the connection manager, the rest passes
            # through. It waits for client bytes on these ports only, at most 1 s (then: pass through).
            inspector = lst.listener_filters.add(name="envoy.filters.listener.http_inspector",
                                                 typed_config=pack(http_inspector_pb2.HttpInspector()))
            inspector.filter_disabled.not_match.CopyFrom(_any_port(http_ports))
            lst.listener_filters_timeout.CopyFrom(duration_ms(1000))
            lst.continue_on_listener_filters_timeout = True
        for p in http_ports:
            chain = lst.filter_chains.add(name=f"inbound|http|{p}")
            chain.filter_chain_match.destination_port.value = p
            chain.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
            chain.filters.add(name="envoy.filters.network.http_connection_manager", typed_config=packed_hcm)
        tcp = tcp_proxy_pb2.TcpProxy(stat_prefix="inbound_tcp", cluster=INBOUND_CLUSTER)
        lst.default_filter_chain.name = "inbound|tcp"
        lst.default_filter_chain.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=pack(tcp))
        self.plugins.mutate("trafficmgr_listener", lst, what=INBOUND_LISTENER, ctx=ctx)
        res = self.resource(lst, INBOUND_LISTENER, [(cache.CLUSTER, INBOUND_CLUSTER), (cache.CLUSTER, BLACKHOLE_CLUSTER)])
        self._inbound = (set(ports), res)
        return res

    def _blocked_chain(self, port: int | None) -> listener_components_pb2.FilterChain:
        """HTTP to a destination no chain serves gets a 404 explaining why; other TCP is closed.

        Envoy matches the destination port before the IP and does not fall back to less specific ports,
        so every port that has chains gets its own blocked chain (``port`` None: every other port)."""
        chain = self._blocked.get(port)
        if chain is not None:
            return chain
        chain = listener_components_pb2.FilterChain(name="blocked" if port is None else f"blocked|{port}")
        if port is not None:
            chain.filter_chain_match.destination_port.value = port
        chain.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix="outbound_blocked", codec_type=hcm_pb2.HttpConnectionManager.AUTO)
        hcm.http_filters.append(ROUTER_FILTER)
        vh = hcm.route_config.virtual_hosts.add(name="blocked", domains=["*"])
        r = vh.routes.add()
        r.match.prefix = "/"
        r.direct_response.status = 404
        r.direct_response.body.inline_string = BLOCKED_BODY
        hcm.route_config.name = "blocked"
        chain.filters.add(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))
        self._blocked[port] = chain
        return chain


@attrs.define(eq=False)
class _ServiceOut:
    """Everything built for one service, reused while the service and its endpoints are unchanged."""

    svc: Service
    eps: tuple[Any, ...]
    ep_keys: tuple[tuple[str, str, str], ...]  # the model.endpoints keys ``eps`` came from
    names: list[str] = attrs.field(factory=list)
    clusters: list[cache.Resource] = attrs.field(factory=list)
    assignments: list[cache.Resource] = attrs.field(factory=list)
    sidecar: list[tuple[Any, ...]] | None = None
    filters: Any = None
    _http_ports: frozenset[int] | None = None

    def http_target_ports(self) -> frozenset[int]:
        """The pod ports behind this service's ``http`` ports (the inbound listener's HTTP chains)."""
        if self._http_ports is None:
            ports: set[int] = set()
            for port, eps in zip(self.svc.ports, self.eps):
                if port.protocol != HTTP:
                    continue
                if self.svc.kind == "Pod":  # a pod's own labeled port
                    ports.add(port.port)
                else:
                    ports.update(e.port for e in eps or ())
            self._http_ports = frozenset(ports)
        return self._http_ports


def _host_prefix_len(ip: str) -> int:
    return 128 if ":" in ip else 32


def _claim(seen: dict[tuple[str, int], str], ip: str, port: int, owner: str, report: Callable[..., None], svc: Service) -> bool:
    """Two services claiming the same IP:port would make Envoy reject the listener: first one wins."""
    key = (ip, port)
    if key in seen:
        report(ObjectRef("Service", svc.namespace, svc.name, svc.uid), f"{ip}:{port} is already served by {seen[key]}; ignored for {owner}", "TrafficConfigConflict")
        return False
    seen[key] = owner
    return True


def _apply_implied(svc: Service, implied: tuple[tuple[int | str, str], ...]) -> Service:
    ports = []
    for p in svc.ports:
        proto = p.protocol
        if proto is None:
            for which, implied_proto in implied:
                if which == p.port or (isinstance(which, str) and which == p.name):
                    proto = implied_proto
                    break
        ports.append(p if proto == p.protocol else attrs.evolve(p, protocol=proto))
    return attrs.evolve(svc, ports=tuple(ports))
