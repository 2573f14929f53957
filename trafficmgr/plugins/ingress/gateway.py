"""Ingresses -> the gateway listener and its RouteConfiguration.

Merging is deterministic: virtual hosts are ordered exact hosts, then wildcards (longest first), then the
catch-all; inside a virtual host, longest path first, ``Exact`` before prefixes of the same path. When two
Ingresses claim the same host + path, the oldest Ingress wins and the other gets a Warning Event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from trafficmgr.plugin import HCM_FILTER, Resource, Service, ServicePort, pack, socket_address
from trafficmgr.plugin import ROUTE as RDS
from trafficmgr.plugin import SECRET as SDS
from trafficmgr.plugins.ingress import edge, misdirected
from trafficmgr.plugins.ingress.ir import (
    EXACT,
    HOST_RE,
    IMPLEMENTATION_SPECIFIC,
    PATH_RE,
    PATH_TYPES,
    PREFIX,
    Backend,
    Ingress,
    option,
    selected_ingresses,
)

if TYPE_CHECKING:
    from trafficmgr.plugin import BuildContext

LISTENER = "ingress"
ROUTE_CONFIG = "ingress"
PLAIN_CHAIN = "http"
CATCH_ALL = "*"

REASON_CONFLICT = "IngressConflict"
REASON_BACKEND = "IngressBackendNotFound"
REASON_INVALID = "InvalidIngress"


@attrs.frozen(slots=True)
class PathEntry:
    """One served path: ``match`` is ``exact``, ``prefix`` (element-wise, Kubernetes ``Prefix``) or
    ``string`` (plain string prefix, ``ImplementationSpecific``)."""

    host: str
    path: str
    match: str
    ingress: Ingress
    backend: Backend
    service: Service | None
    port: ServicePort | None

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (-len(self.path), 0 if self.match == "exact" else 1, self.path)


@attrs.define
class Plan:
    """What the gateway serves: path entries by host (``*`` = any host), in serving order."""

    hosts: dict[str, list[PathEntry]] = attrs.field(factory=dict)
    default: PathEntry | None = None
    ingresses: list[Ingress] = attrs.field(factory=list)


def host_order(host: str) -> tuple[int, int, str]:
    """Exact hosts first, then wildcards by length (most specific first), the catch-all last."""
    if host == CATCH_ALL:
        return (2, 0, host)
    if host.startswith("*."):
        return (1, -len(host), host)
    return (0, 0, host)


def resolve(model: Any, namespace: str, backend: Backend) -> tuple[Service | None, ServicePort | None]:
    svc = model.services.get((namespace, backend.service))
    if svc is None:
        return None, None
    for p in svc.ports:
        if (isinstance(backend.port, int) and p.port == backend.port) or (isinstance(backend.port, str) and p.name == backend.port):
            return svc, p
    return svc, None


def _match_kind(path_type: str) -> str:
    return {EXACT: "exact", PREFIX: "prefix", IMPLEMENTATION_SPECIFIC: "string"}[path_type]


def plan(ctx: BuildContext) -> Plan:
    """The merged paths of every selected Ingress (reporting conflicts and invalid input)."""
    out = Plan(ingresses=served(ctx))
    claimed: dict[tuple[str, str, str], Ingress] = {}
    for ing in out.ingresses:
        for problem in ing.problems:
            ctx.report(ing.ref, problem, REASON_INVALID)

        def entry(host: str, path: str, path_type: str, backend: Backend, ing: Ingress = ing) -> PathEntry | None:
            if path_type not in PATH_TYPES:
                ctx.report(ing.ref, f"path {path!r}: unknown pathType {path_type!r}; path ignored", REASON_INVALID)
                return None
            if not PATH_RE.match(path):
                ctx.report(ing.ref, f"path {path!r} is not a valid URL path; path ignored", REASON_INVALID)
                return None
            match = _match_kind(path_type)
            if match == "prefix" and len(path) > 1:
                path = path.rstrip("/") or "/"
            # Prefix and ImplementationSpecific of one path serve the same requests (almost): one conflict key.
            key = (host, "exact" if match == "exact" else "prefix", path)
            owner = claimed.get(key)
            if owner is not None:
                if owner is not ing:
                    ctx.report(ing.ref, f"host {host or '*'!r} path {path!r} is already served by Ingress "
                               f"{owner.namespace}/{owner.name} (the older one wins); ignored here", REASON_CONFLICT)
                return None
            claimed[key] = ing
            svc, port = resolve(ctx.model, ing.namespace, backend)
            if port is None:
                what = f"service {backend.service!r}" if svc is None else f"port {backend.port!r} of service {backend.service!r}"
                ctx.report(ing.ref, f"{what} not found in namespace {ing.namespace}: {host or '*'}{path} answers 503", REASON_BACKEND)
            return PathEntry(host or CATCH_ALL, path, match, ing, backend, svc, port)

        if ing.default_backend is not None:
            e = entry("", "/", PREFIX, ing.default_backend)
            if e is not None:
                out.default = e
        for rule in ing.rules:
            if rule.host and not HOST_RE.match(rule.host):
                ctx.report(ing.ref, f"host {rule.host!r} is not a valid DNS name or wildcard; rule ignored", REASON_INVALID)
                continue
            for p in rule.paths:
                if p.backend is None:
                    continue
                e = entry(rule.host, p.path, p.path_type, p.backend)
                if e is not None:
                    out.hosts.setdefault(e.host, []).append(e)
    for entries in out.hosts.values():
        entries.sort(key=lambda e: e.sort_key)
    return out


def backends(model: Any, options: Any) -> list[tuple[str, str, int | str, str]]:
    """``(namespace, service, port, "http")`` for every backend of a selected Ingress."""
    return _backends(selected_ingresses(model, options))


def _backends(ingresses: list[Ingress]) -> list[tuple[str, str, int | str, str]]:
    out: list[tuple[str, str, int | str, str]] = []
    for ing in ingresses:
        found: list[Backend] = [ing.default_backend] if ing.default_backend else []
        found += [p.backend for r in ing.rules for p in r.paths if p.backend is not None]
        out.extend((ing.namespace, b.service, b.port, "http") for b in found)
    return sorted(set(out), key=str)


def served(ctx: BuildContext) -> list[Ingress]:
    """:func:`selected_ingresses` of this build, worked out once per build (kept in ``ctx.scratch``)."""
    found: list[Ingress] | None = ctx.scratch.get("ingress.served")
    if found is None:
        found = ctx.scratch["ingress.served"] = selected_ingresses(ctx.model, ctx.options)
    return found


# -- routes ----------------------------------------------------------------------------------------


def _route(ctx: BuildContext, e: PathEntry, authority_regex: str = "") -> route_components_pb2.Route:
    r = route_components_pb2.Route(name=f"{e.ingress.namespace}/{e.ingress.name}")
    if e.match == "exact":
        r.match.path = e.path
    elif e.match == "prefix" and e.path != "/":
        r.match.path_separated_prefix = e.path
    else:
        r.match.prefix = e.path
    if authority_regex:
        h = r.match.headers.add(name=":authority")
        h.string_match.safe_regex.regex = authority_regex
    if e.service is None or e.port is None:
        r.direct_response.status = 503
        r.direct_response.body.inline_string = (
            f"trafficmgr: backend {e.backend.service}:{e.backend.port} of Ingress "
            f"{e.ingress.namespace}/{e.ingress.name} not found\n"
        )
        return r
    r.route.cluster = e.service.cluster_name(e.port)
    ctx.apply_route_hooks(r, e.service, e.port)
    return r


def _wildcard_regex(host: str) -> str:
    """Kubernetes: ``*.foo.com`` matches exactly one more DNS label (Envoy's ``*.foo.com`` matches any);
    case-insensitive, as host names are."""
    return misdirected.one_label_regex(host)


def route_configuration(ctx: BuildContext, p: Plan) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=ROUTE_CONFIG)
    rc.validate_clusters.value = False
    catch_all = list(p.hosts.get(CATCH_ALL, []))
    fallback = catch_all + ([p.default] if p.default is not None else [])
    for host in sorted(p.hosts.keys() | ({CATCH_ALL} if fallback else set()), key=host_order):
        vh = rc.virtual_hosts.add(name=host, domains=[host])
        if host == CATCH_ALL:
            vh.routes.extend(_route(ctx, e) for e in fallback)
            continue
        wildcard = host.startswith("*.")
        vh.routes.extend(_route(ctx, e, _wildcard_regex(host) if wildcard else "") for e in p.hosts[host])
        # Requests for this host that match none of its paths: Kubernetes sends them to the default
        # backend; for a wildcard, a host with more labels is not this rule's host at all.
        rest = fallback if wildcard else ([p.default] if p.default is not None else [])
        shadowed = set() if wildcard else {(e.match, e.path) for e in p.hosts[host]}
        vh.routes.extend(_route(ctx, e) for e in rest if (e.match, e.path) not in shadowed)
    return rc


# -- listener --------------------------------------------------------------------------------------


def listener(ctx: BuildContext) -> listener_pb2.Listener:
    """The gateway listener: plain HTTP and (chains added by ``trafficmgr_listener`` hooks, e.g. the tls
    plugin) TLS with SNI on one port."""
    lst = listener_pb2.Listener(name=LISTENER, stat_prefix=LISTENER)
    lst.address.CopyFrom(socket_address(str(option(ctx.options, "gateway_address")), int(option(ctx.options, "gateway_port"))))
    lst.listener_filters.add(name="envoy.filters.listener.tls_inspector", typed_config=pack(tls_inspector_pb2.TlsInspector()))
    hcm = ctx.http_connection_manager("ingress_http", ROUTE_CONFIG, LISTENER)
    hcm.strip_any_host_port = True
    # Edge settings (use_remote_address among them): the gateway's clients are untrusted (edge.py).
    edge.harden_hcm(hcm, ctx.options)
    edge.harden_listener(lst)
    chain = lst.filter_chains.add(name=PLAIN_CHAIN)
    # A catch-all plain chain would swallow TLS with an unknown SNI: plain text only.
    chain.filter_chain_match.transport_protocol = "raw_buffer"
    chain.filters.add(name=HCM_FILTER, typed_config=pack(hcm))
    ctx.apply_listener_hooks(lst, LISTENER)
    return lst


def sds_names(lst: listener_pb2.Listener) -> list[str]:
    """Names of the SDS secrets the listener's TLS chains use (the consistency gate needs them)."""
    names: set[str] = set()
    for chain in lst.filter_chains:
        ts = chain.transport_socket
        if ts.typed_config.Is(tls_pb2.DownstreamTlsContext.DESCRIPTOR):
            tls = tls_pb2.DownstreamTlsContext()
            ts.typed_config.Unpack(tls)
            names.update(s.name for s in tls.common_tls_context.tls_certificate_sds_secret_configs)
    return sorted(names)


def memo_inputs(ctx: BuildContext) -> tuple[Any, ...]:
    """Everything the gateway is built from: every plugin-watched object (Ingresses, classes, Secrets,
    ...) and the backend Services. Compared by identity, so an unrelated pod change is a cache hit."""
    extra = tuple(obj for kind in sorted(ctx.model.extra) for obj in ctx.model.extra[kind].values())
    services = tuple(ctx.model.services.get((ns, svc)) for ns, svc, _, _ in _backends(served(ctx)))
    return extra + (None,) + services


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def resources(ctx: BuildContext) -> list[Resource]:
    """Listener + RouteConfiguration of the gateway (none when no Ingress is served); memoized."""
    if not served(ctx):
        return []
    key = memo_inputs(ctx)
    memo = ctx.memo.get("ingress")
    if memo is not None and same(memo[0], key):
        return memo[1]  # type: ignore[no-any-return]
    p = plan(ctx)
    rc = route_configuration(ctx, p)
    lst = listener(ctx)
    # SNI chains read their own route configuration: other hosts get 421 there (misdirected.py).
    chain_rcs = misdirected.split_routes(lst, rc)
    refs = [(RDS, ROUTE_CONFIG)] + [(RDS, c.name) for c in chain_rcs] + [(SDS, n) for n in sds_names(lst)]
    out = [ctx.resource(lst, LISTENER, refs), ctx.resource(rc, ROUTE_CONFIG)] + [ctx.resource(c, c.name) for c in chain_rcs]
    ctx.memo["ingress"] = (key, out)
    return out
