"""Scoped sidecar views: a sidecar whose pod (or workload, or Namespace) is labelled
``traffic.scope=namespace`` gets only the destinations of its own namespace and of the namespaces
``traffic.scope.namespaces`` names, plus the backends the mesh routes of those destinations send to.

Contracts:
- A :class:`Scope` is a value computed per pod from its labels and its Namespace's (the pod's or its
  workload's label wins over the Namespace's, each label separately). Equal scopes share one view,
  named ``sidecar~<16 hex digits>`` (a 64-bit hash of the namespaces: stable across processes and replicas,
  and two scopes sharing a name, which would give one of them the other's view, is as unlikely as a 64-bit collision).
  Pods without a scope keep the view ``sidecar``, which is built exactly as before.
- A scoped view is the full sidecar view restricted to its scope: the outbound listener's chains and
  the route configurations' virtual hosts of the in-scope destinations (the very protobuf objects of the
  full view: no hook runs again per scope, except the listener hook on each scoped listener), the
  clusters and assignments they reference (the same :class:`~trafficmgr.core.cache.Resource` objects),
  and everything else of the sidecar view (inbound side, plugin resources) unchanged. Anything out of
  scope reaches the blocked chains, whose 404 names the scope.
- Work per build: none while nothing in a scope changed; a changed Service re-derives only the scopes
  whose namespaces (or route backends) hold it. Views no pod uses any more are dropped.
- A scope limits the configuration a sidecar holds (its size, and the destinations its Envoy routes
  to); it is not an authorization boundary: a pod may still connect to out-of-scope addresses the
  sidecar does not intercept, and the destination's own policy (mtls ``traffic.allow.*``) decides.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from envoy.config.route.v3 import route_components_pb2

from trafficmgr.core import cache
from trafficmgr.core.corelabels import MESH, NAMESPACE, SCOPE, SCOPE_NAMESPACES
from trafficmgr.core.model import EMPTY_LABELS, SIDECAR, Model, Namespace, Pod
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.core.translate.memo import Memo

#: Scoped views are named ``sidecar~<id>``.
VIEW_PREFIX = SIDECAR + "~"


@attrs.frozen(slots=True)
class Scope:
    """What a scoped sidecar sees: the destinations of ``namespaces`` (sorted, the pod's own included)
    and the backends their routes name."""

    namespaces: tuple[str, ...]

    @property
    def view(self) -> str:
        """The shared view of every sidecar with this scope."""
        return view_name(self.namespaces)

    def describe(self) -> str:
        return "namespaces: " + ", ".join(self.namespaces)

    def blocked_body(self) -> str:
        """The blocked 404's body in this scope's view."""
        return (f"trafficmgr: not in this sidecar's traffic.scope ({self.describe()}), or the port is not enabled "
                "(label the service with traffic.port.<port>=http|http2|grpc|tcp|direct)\n")


@functools.lru_cache(maxsize=4096)
def view_name(namespaces: tuple[str, ...]) -> str:
    digest = hashlib.blake2b("\n".join(namespaces).encode(), digest_size=8).hexdigest()
    return VIEW_PREFIX + digest


def is_sidecar_view(view: str | None) -> bool:
    """True for ``sidecar`` and every scoped sidecar view."""
    return view == SIDECAR or (view is not None and view.startswith(VIEW_PREFIX))


@functools.lru_cache(maxsize=4096)
def _scope(namespace: str, mode: str, extra: tuple[str, ...]) -> Scope | None:
    if mode != NAMESPACE:
        return None
    return Scope(tuple(sorted({namespace, *extra})))


def scope_of(pod: Pod, namespaces: Mapping[str, Namespace]) -> Scope | None:
    """The pod's scope, None for the full view (the default). The pod's (or its workload's) label wins
    over its Namespace's, for each of the two labels."""
    ns = namespaces.get(pod.namespace)
    ns_labels = ns.labels if ns is not None else EMPTY_LABELS
    own = pod.labels
    mode = own.value(SCOPE) or ns_labels.value(SCOPE) or MESH
    if mode == MESH:
        return None
    extra = own.value(SCOPE_NAMESPACES) or ns_labels.value(SCOPE_NAMESPACES) or ()
    return _scope(pod.namespace, mode, extra)


def view_of(pod: Pod, namespaces: Mapping[str, Namespace]) -> str:
    """The view name a sidecar of ``pod`` gets."""
    scope = scope_of(pod, namespaces)
    return SIDECAR if scope is None else scope.view


class ScopeIndex:
    """The scope of every pod that has one, kept up to date from :attr:`Model.delta` (O(changed pods,
    plus the pods of a Namespace whose labels changed)); a ``None`` delta, and the first update of an
    index, recompute from every pod."""

    def __init__(self) -> None:
        self.by_pod: dict[tuple[str, str], Scope] = {}
        self.users: dict[Scope, int] = {}
        #: Bumped whenever the set of scopes in use changes.
        self.generation = 0
        self._ns_pods: dict[str, set[tuple[str, str]]] = {}
        self._started = False

    def update(self, model: Model) -> None:
        delta = model.delta
        if delta is None or not self._started:  # unknown changes, or a new index (after a failed build)
            self._started = True
            self._rebuild(model)
            return
        touched = set(delta.pods)
        for ns in delta.namespaces:
            touched.update(self._ns_pods.get(ns, ()))
        for key in touched:
            self._set(key, model.pods.get(key), model.namespaces)

    def _rebuild(self, model: Model) -> None:
        """Every pod afresh (one pass, no per-pod call but :func:`scope_of`)."""
        self.generation += 1
        by_pod: dict[tuple[str, str], Scope] = {}
        users: dict[Scope, int] = {}
        ns_pods: dict[str, set[tuple[str, str]]] = {}
        namespaces = model.namespaces
        for key, pod in model.pods.items():
            keys = ns_pods.get(key[0])
            if keys is None:
                keys = ns_pods[key[0]] = set()
            keys.add(key)
            scope = scope_of(pod, namespaces)
            if scope is not None:
                by_pod[key] = scope
                users[scope] = users.get(scope, 0) + 1
        self.by_pod, self.users, self._ns_pods = by_pod, users, ns_pods

    def _set(self, key: tuple[str, str], pod: Pod | None, namespaces: Mapping[str, Namespace]) -> None:
        if pod is None:
            pods = self._ns_pods.get(key[0])
            if pods is not None:
                pods.discard(key)
                if not pods:
                    del self._ns_pods[key[0]]
        else:
            self._ns_pods.setdefault(key[0], set()).add(key)
        old = self.by_pod.pop(key, None)
        if old is not None:
            left = self.users[old] - 1
            if left:
                self.users[old] = left
            else:
                del self.users[old]
                self.generation += 1
        new = scope_of(pod, namespaces) if pod is not None else None
        if new is not None:
            self.by_pod[key] = new
            count = self.users.get(new, 0)
            self.users[new] = count + 1
            if not count:
                self.generation += 1


def route_clusters(vh: route_components_pb2.VirtualHost) -> frozenset[str]:
    """Every cluster the routes of ``vh`` send to (route, weighted and mirror clusters)."""
    names: set[str] = set()
    for r in vh.routes:
        if not r.HasField("route"):
            continue
        action = r.route
        if action.cluster:
            names.add(action.cluster)
        names.update(w.name for w in action.weighted_clusters.clusters)
        names.update(m.cluster for m in action.request_mirror_policies)
    return frozenset(names)


@attrs.define
class ViewState:
    """What one scoped view was built from last, and its products."""

    scope: Scope
    groups: tuple[object, ...] = ()
    listener: cache.Resource | None = None
    routes: tuple[cache.Resource, ...] = ()
    proxy_route: cache.Resource | None = None
    #: The shared cluster (and assignment) names the view's listener and routes reach; and the names
    #: its cluster and endpoint sets were last restricted to.
    names: frozenset[str] = frozenset()
    names_used: frozenset[str] = frozenset()
    #: This view's own products (blocked chains, route configurations, listener) by what they are.
    memo: Memo[object, Any] = attrs.field(factory=lambda: Memo("scoped view"))
    shared: dict[str, cache.TypeSet] = attrs.field(factory=dict)
    scoped: dict[str, cache.TypeSet] = attrs.field(factory=dict)
    snapshot: cache.Snapshot | None = None



Resources = dict[str, Any]  # type URL -> list of Resource, or a TypeSet (what the builder assembles per view)
ResourceFactory = Callable[[str], Callable[..., cache.Resource]]


class ScopedViews:
    """Builds one snapshot per distinct :class:`Scope` in use from the full sidecar view's products."""

    def __init__(self, outbound: Any, explicit_proxy: bool) -> None:
        self.outbound = outbound  # sidecar_outbound.OutboundTranslator
        self.explicit_proxy = explicit_proxy
        self.index = ScopeIndex()
        self.states: dict[str, ViewState] = {}
        self._out: Any = None
        self._groups: Memo[str, tuple[Any, ...]] = Memo("scope groups")
        self._route_clusters: Memo[tuple[str, str, str], frozenset[str]] = Memo("route clusters")
        self._connect: Memo[tuple[str, str, str], route_components_pb2.VirtualHost] = Memo("CONNECT virtual hosts")
        self._extras: Memo[tuple[str, str], cache.TypeSet] = Memo("scoped extras")
        self._base_key: tuple[object, ...] = ()
        self._live: tuple[int, dict[str, Scope]] = (-1, {})
        self._shared: tuple[cache.TypeSet | None, cache.TypeSet | None] = (None, None)

    def build(self, model: Model, out: Any, base: Resources, shared: Mapping[str, cache.TypeSet],
              extras: Mapping[str, Mapping[str, cache.Resource]], context: Callable[[str], BuildContext]) -> dict[str, cache.Snapshot]:
        """Snapshots of every scoped view some pod uses. ``out``: the sidecar's ``OutboundOut``; ``base``: the
        full sidecar view's resources; ``shared``: the cluster and endpoint sets every view shares;
        ``extras``: the sidecar view's own resources of those types; ``context(view)``: a sidecar build
        context whose resources are kept per view."""
        self.index.update(model)
        if self._live[0] != self.index.generation:
            self._live = (self.index.generation, dict(sorted((scope.view, scope) for scope in self.index.users)))
        live = self._live[1]
        gone = [v for v in self.states if v not in live]
        for view in gone:
            del self.states[view]
        if gone:
            self._extras.keep_only(lambda key: key[0] in live)
        if not live:
            self._out = None
            return {}
        regrouped = out is not self._out
        if regrouped:
            self._regroup(out)
        # Everything of the full view a scoped view takes as is: while it is the same objects, a scope whose
        # destinations and clusters did not change keeps its snapshot (the usual case: O(1) per scope).
        from trafficmgr.core.translate.sidecar_outbound import OUTBOUND_LISTENER

        full_routes = {r.name for r in out.routes}
        if self.explicit_proxy:  # each scoped view has its own
            from trafficmgr.core.translate.explicit_proxy import PROXY_ROUTE

            full_routes.add(PROXY_ROUTE)
        base_key = (tuple(r for r in base[cache.LISTENER] if r.name != OUTBOUND_LISTENER),
                    tuple(r for r in base[cache.ROUTE] if r.name not in full_routes), tuple(base[cache.SECRET]),
                    tuple((t, tuple(e.items())) for t, e in sorted(extras.items())))
        base_same = base_key == self._base_key
        self._base_key = base_key
        clusters, endpoints = shared[cache.CLUSTER], shared[cache.ENDPOINT]
        prev_clusters, prev_endpoints = self._shared
        self._shared = (clusters, endpoints)
        changed_clusters = clusters.changed_since(prev_clusters) if prev_clusters is not None else None
        changed_endpoints = endpoints.changed_since(prev_endpoints) if prev_endpoints is not None else None
        snapshots: dict[str, cache.Snapshot] = {}
        states = self.states
        for view, scope in live.items():
            state = states.get(view)
            if state is None:
                state = states[view] = ViewState(scope)
            elif (base_same and changed_clusters is not None and changed_endpoints is not None
                  and state.snapshot is not None):
                held = state.shared
                if ((not regrouped or tuple(self._groups.peek(ns) or () for ns in scope.namespaces) == state.groups)
                        and held.get(cache.CLUSTER) is prev_clusters and held.get(cache.ENDPOINT) is prev_endpoints
                        and changed_clusters.isdisjoint(state.names_used) and changed_endpoints.isdisjoint(state.names_used)):
                    held[cache.CLUSTER], held[cache.ENDPOINT] = clusters, endpoints
                    snapshots[view] = state.snapshot
                    continue
            snapshots[view] = self._view(view, state, out, base, shared, extras, context)
        return snapshots

    def _regroup(self, out: Any) -> None:
        """The full view's entries by namespace; a namespace whose entries are unchanged keeps its tuple."""
        self._out = out
        by_ns: dict[str, list[Any]] = {}
        for e in out.entries:
            by_ns.setdefault(e.dest.service.namespace, []).append(e)
        for ns, entries in by_ns.items():
            group = tuple(entries)
            self._groups.get(ns, group, lambda g=group: g)
        self._groups.keep_only(by_ns.__contains__)
        live = {e.dest.key for e in out.entries if e.vhost is not None}
        self._route_clusters.keep_only(live.__contains__)
        self._connect.keep_only(live.__contains__)

    def _view(self, view: str, state: ViewState, out: Any, base: Resources, shared: Mapping[str, cache.TypeSet],
              extras: Mapping[str, Mapping[str, cache.Resource]], context: Callable[[str], BuildContext]) -> cache.Snapshot:
        from trafficmgr.core.translate.sidecar_outbound import OUTBOUND_LISTENER

        groups = tuple(self._groups.peek(ns) or () for ns in state.scope.namespaces)
        if state.listener is None or groups != state.groups:
            self._outbound(view, state, groups, context(view))
        names = state.names
        scoped: dict[str, cache.TypeSet] = {}
        for type_url in (cache.CLUSTER, cache.ENDPOINT):
            own = self._restrict(state, type_url, shared[type_url], names, state.names_used)
            extra = extras.get(type_url)
            if extra:
                versions = {n: r.version for n, r in extra.items()}
                own = self._extras.get((view, type_url), (own, versions), own.derive, extra)
            scoped[type_url] = own
        state.names_used = names
        full_routes = {r.name for r in out.routes}
        resources: Resources = dict(base)
        resources[cache.LISTENER] = [state.listener if r.name == OUTBOUND_LISTENER else r for r in base[cache.LISTENER]]
        routes = [r for r in base[cache.ROUTE] if r.name not in full_routes]
        if state.proxy_route is not None:
            routes = [state.proxy_route if r.name == state.proxy_route.name else r for r in routes]
        resources[cache.ROUTE] = routes + list(state.routes)
        resources.update(scoped)
        previous = state.snapshot
        snap = cache.Snapshot.build(resources, previous)
        if previous is not None and all(snap.types[t] is previous.types[t] for t in cache.TYPE_ORDER):
            snap = previous
        state.snapshot = snap
        return snap

    def _outbound(self, view: str, state: ViewState, groups: tuple[Any, ...], ctx: BuildContext) -> None:
        """The scoped listener, route configurations (and explicit-proxy routes) of ``groups``, and the
        cluster names they reach."""
        from trafficmgr.core.translate.explicit_proxy import PROXY_ROUTE, with_connect
        from trafficmgr.core.translate.sidecar_outbound import (
            blocked_chain,
            blocked_virtual_host,
            route_config_name,
            route_configuration,
        )

        state.groups = groups
        # The full listener's order: Services by key, then pods' own ports (each group is in plan order).
        entries = sorted((e for g in groups for e in g), key=lambda e: (e.dest.service.kind == "Pod", e.dest.key[:2]))
        body = state.scope.blocked_body()
        chains = [e.chain for e in entries]
        by_port: dict[int, list[Any]] = {}
        names: set[str] = set()
        for e in entries:
            d = e.dest
            names.add(d.service.cluster_name(d.port))
            if e.vhost is not None:
                by_port.setdefault(d.port.port, []).append(e)
                names |= self._route_clusters.get(d.key, (e.vhost,), route_clusters, e.vhost)
        ports = {e.dest.port.port for e in entries}
        tcp_ports = tuple(sorted({e.dest.port.port for e in entries if not e.dest.http}))
        for p in sorted(ports - set(tcp_ports)):
            chains.append(state.memo.get(("blocked", p), (body,), blocked_chain, p, body))
        chains.append(state.memo.get(("blocked", None), (body,), blocked_chain, None, body))
        routes = []
        for p in sorted(by_port):
            vhosts = [e.vhost for e in by_port[p]]
            name = route_config_name(p)
            routes.append(state.memo.get(name, tuple(vhosts), route_configuration, name, vhosts, ctx))
        state.routes = tuple(routes)
        kept = {r.name for r in state.routes}
        state.memo.keep_only(lambda key: not isinstance(key, str) or not key.startswith("outbound|") or key in kept)
        state.listener = state.memo.get("listener", (*chains, tcp_ports), self.outbound.make_listener,
                                        chains, tcp_ports, state.routes, ctx)
        if self.explicit_proxy:
            connected = []
            for p in sorted(by_port):
                for e in by_port[p]:
                    cluster = e.dest.service.cluster_name(e.dest.port)
                    connected.append(self._connect.get(e.dest.key, (e.vhost, cluster), with_connect, e.vhost, cluster))
            blocked = state.memo.get("blocked-vh", (body,), blocked_virtual_host, body)
            vhosts = [*connected, blocked]
            state.proxy_route = state.memo.get(PROXY_ROUTE, tuple(vhosts), route_configuration, PROXY_ROUTE, vhosts, ctx)
        state.names = frozenset(names)

    @staticmethod
    def _restrict(state: ViewState, type_url: str, shared: cache.TypeSet, names: frozenset[str],
                  old_names: frozenset[str]) -> cache.TypeSet:
        """``shared`` restricted to ``names``: derived from the last one in O(changes) when ``shared`` was
        derived from the last build's in one step (a change elsewhere in the mesh costs a set intersection)."""
        old_shared, old = state.shared.get(type_url), state.scoped.get(type_url)
        state.shared[type_url] = shared
        changed = shared.changed_since(old_shared) if old_shared is not None and old is not None else None
        if changed is None:
            res = shared.resources
            out = cache.TypeSet(type_url, [res[n] for n in names if n in res])
        else:
            assert old is not None
            touched = (changed & names) | (names ^ old_names) if names is not old_names else changed & names
            if not touched:
                return old
            res = shared.resources
            out = old.derive({n: (res.get(n) if n in names else None) for n in touched})
        state.scoped[type_url] = out
        return out
