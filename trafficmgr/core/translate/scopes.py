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
  whose namespaces (or route backends) hold it, and the full view's outbound entries are regrouped by
  namespace from the changed destinations only (:meth:`OutboundOut.changed_since`), never by walking
  them all. Views no pod uses any more are dropped.
- Consumer views (Gateway API consumer routes: ``ServiceRoutes.caller_namespace``): a pod in a namespace
  that has caller-restricted routes gets the view of its scope (or the full view) plus that namespace's
  virtual hosts for the Services those routes name, named ``sidecar~<16 hex digits>`` from the namespace
  and the scope (:func:`consumer_view_name`). Only the route configurations holding those virtual hosts
  (and, with the explicit proxy, its route configuration) are its own; everything else is the very
  resource objects of the view it is made from (a scoped one adds the clusters the routes reach). Pods of
  other namespaces keep their view names and snapshots unchanged.
- A scope limits the configuration a sidecar holds (its size, and the destinations its Envoy routes
  to); it is not an authorization boundary: a pod may still connect to out-of-scope addresses the
  sidecar does not intercept, and the destination's own policy (mtls ``traffic.allow.*``) decides.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Container, Mapping
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


@functools.lru_cache(maxsize=4096)
def consumer_view_name(namespace: str, scope: Scope | None) -> str:
    """The view of the sidecars of pods in ``namespace`` (which has caller-restricted routes) with
    ``scope`` (None: the full view). Never a :func:`view_name` (``:`` is in no namespace name)."""
    base = "*" if scope is None else "\n".join(scope.namespaces)
    digest = hashlib.blake2b(f"consumer:{namespace}\n{base}".encode(), digest_size=8).hexdigest()
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


def view_of(pod: Pod, namespaces: Mapping[str, Namespace], consumers: Container[str] = frozenset()) -> str:
    """The view name a sidecar of ``pod`` gets; ``consumers``: the namespaces with caller-restricted
    routes (the last build's :attr:`ScopedViews.consumer_namespaces`)."""
    scope = scope_of(pod, namespaces)
    if pod.namespace in consumers:
        return consumer_view_name(pod.namespace, scope)
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
        #: Per namespace: how many of its pods have each scope (None: no scope).
        self.ns_scopes: dict[str, dict[Scope | None, int]] = {}
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
        ns_scopes: dict[str, dict[Scope | None, int]] = {}
        namespaces = model.namespaces
        for key, pod in model.pods.items():
            keys = ns_pods.get(key[0])
            if keys is None:
                keys = ns_pods[key[0]] = set()
                ns_scopes[key[0]] = {}
            keys.add(key)
            scope = scope_of(pod, namespaces)
            counts = ns_scopes[key[0]]
            counts[scope] = counts.get(scope, 0) + 1
            if scope is not None:
                by_pod[key] = scope
                users[scope] = users.get(scope, 0) + 1
        self.by_pod, self.users, self._ns_pods, self.ns_scopes = by_pod, users, ns_pods, ns_scopes

    def _set(self, key: tuple[str, str], pod: Pod | None, namespaces: Mapping[str, Namespace]) -> None:
        present = key in self._ns_pods.get(key[0], ())
        if present:
            counts = self.ns_scopes[key[0]]
            was = self.by_pod.get(key)
            left = counts[was] - 1
            if left:
                counts[was] = left
            else:
                del counts[was]
                if not counts:
                    del self.ns_scopes[key[0]]
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
        if pod is not None:
            counts = self.ns_scopes.setdefault(key[0], {})
            counts[new] = counts.get(new, 0) + 1
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


def _plan_order(entry: Any) -> tuple[bool, str, int]:
    """Where an outbound entry of one namespace is in the plan: Services by name, then pods' own ports;
    a destination's ports in its order."""
    d = entry.dest
    return (d.service.kind == "Pod", d.service.name, d.service.ports.index(d.port))


@attrs.define
class ViewState:
    """What one scoped view was built from last, and its products."""

    scope: Scope
    #: A consumer view's caller namespace ("" for a plain scoped view), and the virtual hosts of that
    #: namespace's consumer routes it was last built with (by destination key, sorted).
    caller: str = ""
    subst: tuple[tuple[tuple[str, str, str], Any], ...] = ()
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



@attrs.define
class FullConsumerState:
    """A consumer view made from the full sidecar view: its own route configurations and what it was
    last built from."""

    caller: str
    memo: Memo[object, Any] = attrs.field(factory=lambda: Memo("consumer view"))
    key: tuple[object, ...] = ()
    snapshot: cache.Snapshot | None = None
    #: The full view's products and virtual hosts its own route configurations were made from, and those.
    made_from: tuple[object, tuple[tuple[tuple[str, str, str], Any], ...]] | None = None
    own: dict[str, cache.Resource] = attrs.field(factory=dict)


Subst = dict[tuple[str, str, str], route_components_pb2.VirtualHost]


def _same_subst(a: tuple[tuple[tuple[str, str, str], Any], ...], b: tuple[tuple[tuple[str, str, str], Any], ...]) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[1] is y[1] for x, y in zip(a, b, strict=True))


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
        #: The full view's entries by namespace (plan order), and by namespace then destination key.
        self._groups: dict[str, tuple[Any, ...]] = {}
        self._ns_entries: dict[str, dict[tuple[str, str, str], Any]] = {}
        self._route_clusters: Memo[tuple[str, str, str], frozenset[str]] = Memo("route clusters")
        self._connect: Memo[tuple[str, str, str], route_components_pb2.VirtualHost] = Memo("CONNECT virtual hosts")
        self._extras: Memo[tuple[str, str], cache.TypeSet] = Memo("scoped extras")
        self._base_key: tuple[object, ...] = ()
        self._live: tuple[int, dict[str, Scope]] = (-1, {})
        self._shared: tuple[cache.TypeSet | None, cache.TypeSet | None] = (None, None)
        #: The full view's HTTP entries of Services by namespace, then (namespace, Service, port).
        self._entry_of: dict[str, dict[tuple[str, str, int], Any]] = {}
        #: The full view's HTTP entries by port in the full view's order (made when a full consumer view
        #: asks, for the out it was made from).
        self._port_entries: tuple[Any, dict[int, list[Any]]] = (None, {})
        self.full_states: dict[str, FullConsumerState] = {}
        #: The namespaces with caller-restricted routes as of the last build (what ``resolve`` reads: a
        #: pod there gets :func:`consumer_view_name`); replaced whole, never mutated.
        self.consumer_namespaces: frozenset[str] = frozenset()

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
        # Consumer views: one per (namespace with caller-restricted routes, scope of a pod there).
        consumer = self.outbound.consumer
        consumer_live: dict[str, tuple[str, Scope | None]] = {}
        for caller in sorted(consumer):
            for scope in self.index.ns_scopes.get(caller, ()):
                consumer_live[consumer_view_name(caller, scope)] = (caller, scope)
        self.consumer_namespaces = frozenset(consumer) if consumer.keys() != self.consumer_namespaces else self.consumer_namespaces
        gone = [v for v in self.states if v not in live and v not in consumer_live]
        for view in gone:
            del self.states[view]
        for view in [v for v in self.full_states if v not in consumer_live]:
            del self.full_states[view]
        if gone:
            self._extras.keep_only(lambda key: key[0] in live or key[0] in consumer_live)
        if not live and not consumer_live:
            self._out, self._port_entries = None, (None, {})
            return {}
        regrouped = out is not self._out
        if regrouped:
            self._regroup(out)
        # Everything of the full view a scoped view takes as is: while it is the same objects, a scope whose
        # destinations and clusters did not change keeps its snapshot (the usual case: O(1) per scope).
        from trafficmgr.core.translate.explicit_proxy import PROXY_ROUTE
        from trafficmgr.core.translate.sidecar_outbound import OUTBOUND_LISTENER

        # The full view's route configurations but its outbound ones (once per build, for every view; the
        # explicit proxy's is replaced by each view's own).
        full_routes = {r.name for r in out.routes}
        kept_routes = [r for r in base[cache.ROUTE] if r.name not in full_routes]
        base_key = (tuple(r for r in base[cache.LISTENER] if r.name != OUTBOUND_LISTENER),
                    tuple(r for r in kept_routes if not (self.explicit_proxy and r.name == PROXY_ROUTE)),
                    tuple(base[cache.SECRET]), tuple((t, tuple(e.items())) for t, e in sorted(extras.items())))
        base_same = base_key == self._base_key
        self._base_key = base_key
        clusters, endpoints = shared[cache.CLUSTER], shared[cache.ENDPOINT]
        prev_clusters, prev_endpoints = self._shared
        self._shared = (clusters, endpoints)
        changed_clusters = clusters.changed_since(prev_clusters) if prev_clusters is not None else None
        changed_endpoints = endpoints.changed_since(prev_endpoints) if prev_endpoints is not None else None
        snapshots: dict[str, cache.Snapshot] = {}
        states = self.states
        todo: list[tuple[str, Scope, str, Subst]] = [(view, scope, "", {}) for view, scope in live.items()]
        substs: dict[str, Subst] = {}  # once per caller namespace, whatever the number of its scopes
        for view, (caller, cscope) in consumer_live.items():
            ctx = context(view)
            subst = substs.get(caller)
            if subst is None:
                subst = substs[caller] = self._subst(caller, consumer[caller], ctx)
            if cscope is None:
                fstate = self.full_states.get(view)
                if fstate is None:
                    fstate = self.full_states[view] = FullConsumerState(caller)
                snapshots[view] = self._full_consumer(fstate, subst, out, base, ctx)
            else:
                todo.append((view, cscope, caller, subst))
        for view, scope, caller, subst in todo:
            key = tuple(sorted(subst.items(), key=lambda kv: kv[0]))
            state = states.get(view)
            if state is None:
                state = states[view] = ViewState(scope, caller)
            elif (base_same and changed_clusters is not None and changed_endpoints is not None
                  and state.snapshot is not None and _same_subst(key, state.subst)):
                held = state.shared
                if ((not regrouped or tuple(self._groups.get(ns, ()) for ns in scope.namespaces) == state.groups)
                        and held.get(cache.CLUSTER) is prev_clusters and held.get(cache.ENDPOINT) is prev_endpoints
                        and changed_clusters.isdisjoint(state.names_used) and changed_endpoints.isdisjoint(state.names_used)):
                    held[cache.CLUSTER], held[cache.ENDPOINT] = clusters, endpoints
                    snapshots[view] = state.snapshot
                    continue
            snapshots[view] = self._view(view, state, base, kept_routes, shared, extras, context, subst, key)
        return snapshots

    def _subst(self, caller: str, overrides: Mapping[tuple[str, str, int], tuple[bytes, tuple[object, ...]]],
               ctx: BuildContext) -> Subst:
        """The virtual hosts namespace ``caller``'s routes give the Service ports of the full view, by
        destination key (routes for a Service port no sidecar serves over HTTP are left out)."""
        out: Subst = {}
        for key, (data, routes) in overrides.items():
            entry = self._entry_of.get(key[0], {}).get(key)
            if entry is not None:
                out[entry.dest.key] = self.outbound.consumer_vhost(caller, entry, data, routes, ctx)
        return out

    def _full_consumer(self, state: FullConsumerState, subst: Subst, out: Any, base: Resources, ctx: BuildContext) -> cache.Snapshot:
        """The full view with the route configurations holding ``subst``'s virtual hosts replaced (and the
        explicit proxy's); every other resource is the full view's object. Its own route configurations
        are made again only when the full view's outbound side or ``subst`` changed (O(1) otherwise)."""
        made_from = (out, tuple(sorted(subst.items(), key=lambda kv: kv[0])))
        if state.made_from is None or state.made_from[0] is not out or not _same_subst(made_from[1], state.made_from[1]):
            state.own = self._consumer_routes(state, subst, ctx)
            state.made_from = made_from
        own = state.own
        routes = base[cache.ROUTE]
        key = (*(base[t] for t in cache.TYPE_ORDER if t != cache.ROUTE), tuple(routes), tuple(own.values()))
        if state.snapshot is not None and len(key) == len(state.key) and all(a is b or a == b for a, b in zip(key, state.key, strict=True)):
            return state.snapshot
        resources: Resources = dict(base)
        resources[cache.ROUTE] = [own.get(r.name, r) for r in routes]
        previous = state.snapshot
        snap = cache.Snapshot.build(resources, previous)
        if previous is not None and all(snap.types[t] is previous.types[t] for t in cache.TYPE_ORDER):
            snap = previous
        state.snapshot, state.key = snap, key
        return snap

    def _consumer_routes(self, state: FullConsumerState, subst: Subst, ctx: BuildContext) -> dict[str, cache.Resource]:
        """The route configurations of the full view that hold a virtual host of ``subst``, with it (and
        the explicit proxy's, when there is one), by name."""
        from trafficmgr.core.translate.explicit_proxy import PROXY_ROUTE
        from trafficmgr.core.translate.sidecar_outbound import route_config_name, route_configuration

        own: dict[str, cache.Resource] = {}
        port_entries = self._full_port_entries()
        for p in sorted(port_entries):
            entries = port_entries[p]
            if not any(e.dest.key in subst for e in entries):
                continue
            name = route_config_name(p)
            vhosts = [subst.get(e.dest.key, e.vhost) for e in entries]
            own[name] = state.memo.get(name, tuple(vhosts), route_configuration, name, vhosts, ctx)
        if self.explicit_proxy and own:
            own[PROXY_ROUTE] = self._proxy_route(state.memo, port_entries, subst, None, ctx)
        state.memo.keep_only(lambda k: not isinstance(k, str) or k in own or k == "blocked-vh")
        return own

    def _proxy_route(self, memo: Memo[object, Any], by_port: Mapping[int, list[Any]], subst: Subst, body: str | None,
                     ctx: BuildContext) -> cache.Resource:
        """The explicit proxy's route configuration of a view: a CONNECT virtual host per entry of
        ``by_port`` (ports in order; ``subst``'s virtual host where it has one: made and kept in ``memo``,
        the view's own; else the full view's, shared by every view) and the blocked one answering ``body``
        (None: the full view's text)."""
        from trafficmgr.core.translate.explicit_proxy import PROXY_ROUTE, with_connect
        from trafficmgr.core.translate.sidecar_outbound import blocked_virtual_host, route_configuration

        connected = []
        for p in sorted(by_port):
            for e in by_port[p]:
                key = e.dest.key
                cluster = e.dest.service.cluster_name(e.dest.port)
                own = subst.get(key)
                if own is None:
                    connected.append(self._connect.get(key, (e.vhost, cluster), with_connect, e.vhost, cluster))
                else:
                    connected.append(memo.get(("connect", key), (own, cluster), with_connect, own, cluster))
        args = () if body is None else (body,)
        vhosts = [*connected, memo.get("blocked-vh", args, blocked_virtual_host, *args)]
        route: cache.Resource = memo.get(PROXY_ROUTE, tuple(vhosts), route_configuration, PROXY_ROUTE, vhosts, ctx)
        return route

    def _full_port_entries(self) -> dict[int, list[Any]]:
        """The full view's HTTP entries by port, in its order (O(mesh), made once per out: only a consumer
        view made from the full view, whose route configurations hold every virtual host, asks)."""
        made_from, by_port = self._port_entries
        if made_from is not self._out:
            by_port = {}
            for e in self._out.entries:
                if e.vhost is not None:
                    by_port.setdefault(e.dest.port.port, []).append(e)
            self._port_entries = (self._out, by_port)
        return by_port

    def _regroup(self, out: Any) -> None:
        """The full view's entries by namespace, from the entries of the destinations that changed since
        the last out (O(changed entries + the sizes of their namespaces)); every entry when that is
        unknown (the first build, or after a build this did not see). A namespace whose entries are
        unchanged keeps its tuple (views compare them first by identity)."""
        changed = out.changed_since(self._out) if self._out is not None else None
        self._out = out
        if changed is None:
            by_ns: dict[str, dict[tuple[str, str, str], Any]] = {}
            for e in out.entries:  # plan order
                by_ns.setdefault(e.dest.service.namespace, {})[e.dest.key] = e
            self._ns_entries = by_ns
            for ns in [ns for ns in self._groups if ns not in by_ns]:
                self._drop_namespace(ns)
            for ns, in_ns in by_ns.items():
                self._set_group(ns, tuple(in_ns.values()))
            live = {e.dest.key for e in out.entries if e.vhost is not None}
            self._route_clusters.keep_only(live.__contains__)
            self._connect.keep_only(live.__contains__)
            return
        touched: set[str] = set()
        for key in changed:
            ns = key[0]
            touched.add(ns)
            entry = out.by_key.get(key)
            entries: dict[tuple[str, str, str], Any] | None = self._ns_entries.get(ns)
            if entry is not None:
                if entries is None:
                    entries = self._ns_entries[ns] = {}
                entries[key] = entry
            elif entries is not None:
                entries.pop(key, None)
            if entry is None or entry.vhost is None:
                self._route_clusters.drop((key,))
                self._connect.drop((key,))
        for ns in sorted(touched):
            left = self._ns_entries.get(ns)
            if not left:
                self._ns_entries.pop(ns, None)
                self._drop_namespace(ns)
                continue
            # The plan's order: Services by name, then pods' own ports; a destination's ports in its order.
            self._set_group(ns, tuple(sorted(left.values(), key=_plan_order)))

    def _set_group(self, ns: str, group: tuple[Any, ...]) -> None:
        """Namespace ``ns``'s entries are ``group`` now (the old tuple is kept while equal)."""
        old = self._groups.get(ns)
        if old is not None and old == group:
            return
        self._groups[ns] = group
        index: dict[tuple[str, str, int], Any] = {}
        for e in group:
            d = e.dest
            if e.vhost is not None and d.service.kind == "Service":
                index[(ns, d.service.name, d.port.port)] = e
        if index:
            self._entry_of[ns] = index
        else:
            self._entry_of.pop(ns, None)

    def _drop_namespace(self, ns: str) -> None:
        self._groups.pop(ns, None)
        self._entry_of.pop(ns, None)

    def _view(self, view: str, state: ViewState, base: Resources, kept_routes: list[cache.Resource],
              shared: Mapping[str, cache.TypeSet], extras: Mapping[str, Mapping[str, cache.Resource]],
              context: Callable[[str], BuildContext], subst: Subst | None = None,
              subst_key: tuple[tuple[tuple[str, str, str], Any], ...] = ()) -> cache.Snapshot:
        """``kept_routes``: the full view's route configurations but its outbound ones."""
        from trafficmgr.core.translate.sidecar_outbound import OUTBOUND_LISTENER

        groups = tuple(self._groups.get(ns, ()) for ns in state.scope.namespaces)
        if state.listener is None or groups != state.groups or not _same_subst(subst_key, state.subst):
            # A consumer view shares its scope's listener (the same chains) when that view is built already.
            plain = self.states.get(state.scope.view) if state.caller else None
            self._outbound(view, state, groups, context(view), subst or {}, plain)
            state.subst = subst_key
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
        resources: Resources = dict(base)
        resources[cache.LISTENER] = [state.listener if r.name == OUTBOUND_LISTENER else r for r in base[cache.LISTENER]]
        routes = kept_routes
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

    def _outbound(self, view: str, state: ViewState, groups: tuple[Any, ...], ctx: BuildContext,
                  subst: Subst | None = None, plain: ViewState | None = None) -> None:
        """The scoped listener, route configurations (and explicit-proxy routes) of ``groups``, and the
        cluster names they reach; ``subst``: a consumer view's virtual hosts by destination key (instead
        of the full view's); ``plain``: the scope's own view, whose listener a consumer view reuses."""
        subst = subst or {}
        from trafficmgr.core.translate.sidecar_outbound import blocked_chain, route_config_name, route_configuration

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
                own = subst.get(d.key)
                names |= (self._route_clusters.get(d.key, (e.vhost,), route_clusters, e.vhost) if own is None
                          else route_clusters(own))
        ports = {e.dest.port.port for e in entries}
        tcp_ports = tuple(sorted({e.dest.port.port for e in entries if not e.dest.http}))
        for p in sorted(ports - set(tcp_ports)):
            chains.append(state.memo.get(("blocked", p), (body,), blocked_chain, p, body))
        chains.append(state.memo.get(("blocked", None), (body,), blocked_chain, None, body))
        routes = []
        for p in sorted(by_port):
            vhosts = [subst.get(e.dest.key, e.vhost) for e in by_port[p]]
            name = route_config_name(p)
            routes.append(state.memo.get(name, tuple(vhosts), route_configuration, name, vhosts, ctx))
        state.routes = tuple(routes)
        kept = {r.name for r in state.routes}
        state.memo.keep_only(lambda key: not isinstance(key, str) or not key.startswith("outbound|") or key in kept)
        if plain is not None and plain.listener is not None and plain.groups == groups:
            state.listener = plain.listener  # the same chains: the very object of the scope's view
        else:
            state.listener = state.memo.get("listener", (*chains, tcp_ports), self.outbound.make_listener,
                                            chains, tcp_ports, state.routes, ctx)
        if self.explicit_proxy:
            state.proxy_route = self._proxy_route(state.memo, by_port, subst, body, ctx)
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
