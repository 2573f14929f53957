"""Gateway API objects -> what the gateway proxies serve (:class:`table.Table`) and every status condition.

One pure function of the model and the options (:func:`plan`), memoized on its inputs (compared by
identity, so a build where none of them changed costs a tuple comparison).

- GatewayClasses whose ``controllerName`` is ``--gateway-class-controller`` are ours; Gateways of an
  accepted class of ours are served on the shared gateway proxies: each distinct listener port is one
  :class:`table.ServedPort`, bound on ``--gateway-address``.
- Listener validation: protocol HTTP or HTTPS, a port other than ``--gateway-port`` (the Ingress
  listener), TLS ``Terminate`` with at least one permitted, valid Secret (every such certificateRef is
  served; a bad one sets ResolvedRefs False while the others serve); listeners of any Gateway of ours that share
  a port must share the protocol (else ``Conflicted`` ``ProtocolConflict``) and not the hostname (else
  ``HostnameConflict``): the oldest Gateway, then the first listener, keeps it.
- Route attachment per parentRef: sectionName/port, ``allowedRoutes`` (namespaces Same/All/Selector, kinds),
  hostname intersection; a request is owned by the most specific listener hostname on its port
  (exact, then the longest wildcard, then none), so routes of a wildcard listener never see requests of a
  more specific listener.
- Precedence inside a virtual host: HTTPRoute: Exact path, RegularExpression (longer first:
  implementation-specific), PathPrefix by length, then method, header count, query count; GRPCRoute:
  hostname (non-wildcard characters, then characters), service and method characters, header count;
  ties: oldest route, ``namespace/name``, rule then match order.
"""

from __future__ import annotations

import argparse
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from trafficmgr.plugin import HTTP_PROTOCOLS, Model, Service
from trafficmgr.plugins.gateway_api import mesh as gamma
from trafficmgr.plugins.gateway_api import table as t
from trafficmgr.plugins.gateway_api.ir import (
    GATEWAY,
    GATEWAY_CLASS,
    GROUP,
    GRPC_ROUTE,
    HEADER_NAME_RE,
    HTTP_ROUTE,
    NAMESPACE,
    PATH_RE,
    REFERENCE_GRANT,
    ROUTE_KINDS,
    SECRET,
    BackendRef,
    CertSecret,
    Filter,
    Gateway,
    GatewayClass,
    Listener,
    Namespace,
    ParentRef,
    ReferenceGrant,
    Route,
    RouteMatch,
    Rule,
    valid_hostname,
)
from trafficmgr.plugins.ingress.ir import option as ingress_option

DEFAULT_CONTROLLER = "trafficmgr.io/gateway-controller"
SUPPORTED_PROTOCOLS = ("HTTP", "HTTPS")
CATCH_ALL = "*"
#: Ports the gateway proxies use themselves by default (``trafficmgr bootstrap``'s ``--admin-port`` and
#: ``--stats-port``): a Gateway listener there would fail to bind or shadow them. Why listeners are safe
#: otherwise: each is a port of the shared gateway pods, bound on ``--gateway-address``, reachable only
#: as far as the chart's Service exposes it, and serves only routes this plan accepted.
RESERVED_PORTS = {15000: "the gateway Envoy's admin port", 8900: "the gateway Envoy's stats listener port"}

# Condition types and reasons (the specification's names).
ACCEPTED, PROGRAMMED, RESOLVED_REFS, CONFLICTED = "Accepted", "Programmed", "ResolvedRefs", "Conflicted"
#: Listener Programmed False: served, but its port is not one the gateway Service exposes (the
#: specification's reason for a listener "not yet online and ready to accept client traffic").
PORT_NOT_EXPOSED = "Pending"
#: Route parent Accepted False: a mesh route's parent Service port is not an HTTP port (labelled ``tcp``
#: or ``direct``): the specification's reason for a parent whose listener does not take the route kind
#: (a Service port is GAMMA's listener).
NOT_HTTP_PORT = "NotAllowedByListeners"
#: Route parent Accepted False: an HTTPRoute and a GRPCRoute on one listener hostname or Service port;
#: the older keeps it (the specification names no reason: the one for a listener refusing the route).
KIND_CONFLICT = "NotAllowedByListeners"


@attrs.frozen(slots=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str = ""


@attrs.frozen(slots=True)
class ListenerStatus:
    name: str
    supported_kinds: tuple[str, ...]
    attached_routes: int
    conditions: tuple[Condition, ...]


@attrs.frozen(slots=True)
class GatewayStatus:
    gateway: Gateway
    conditions: tuple[Condition, ...]
    listeners: tuple[ListenerStatus, ...]


@attrs.frozen(slots=True)
class ParentStatus:
    """Our entry of ``status.parents`` for one parentRef."""

    ref: ParentRef
    conditions: tuple[Condition, ...]


@attrs.frozen(slots=True)
class Plan:
    """Everything planned: the table, the desired statuses of objects we own, the implied port protocols.

    ``routes`` holds every route with at least one parentRef to a Gateway of ours or to a Service (GAMMA),
    with its entries for those parents (empty tuple: none any more, our old entries are removed).
    ``mesh``: each Service port's mesh routes in precedence order (``mesh.py``), sorted by
    ``(namespace, service, port, caller namespace)`` (the caller namespace ``""`` for producer routes)."""

    table: t.Table
    classes: tuple[tuple[GatewayClass, tuple[Condition, ...]], ...] = ()
    gateways: tuple[GatewayStatus, ...] = ()
    routes: tuple[tuple[Route, tuple[ParentStatus, ...]], ...] = ()
    protocols: tuple[tuple[str, str, int | str, str], ...] = ()
    mesh: tuple[tuple[gamma.MeshKey, tuple[t.Route, ...]], ...] = ()
    #: The working state the next build may start from (not part of the plan's value).
    state: Any = attrs.field(default=None, eq=False, repr=False)


def controller_name(options: argparse.Namespace) -> str:
    return str(getattr(options, "gateway_class_controller", None) or DEFAULT_CONTROLLER)


# -- hostnames --------------------------------------------------------------------------------------


def host_matches(pattern: str, host: str) -> bool:
    """Whether ``pattern`` (``*``, ``*.example.com`` = one or more labels, or exact) covers ``host`` (exact
    or a wildcard: ``*.example.com`` covers ``*.foo.example.com``)."""
    if pattern == CATCH_ALL:
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        if host.startswith("*."):
            return host[1:].endswith(suffix)
        return host.endswith(suffix) and len(host) > len(suffix)
    return pattern == host


def intersect(listener_host: str | None, route_hosts: tuple[str, ...]) -> tuple[str, ...]:
    """The hostnames a route serves on a listener (``*`` = any): the specification's intersection."""
    lh = listener_host or CATCH_ALL
    if not route_hosts:
        return (lh,)
    out = []
    for h in route_hosts:
        if host_matches(lh, h):
            out.append(h)
        elif host_matches(h, lh):
            out.append(lh)
    return tuple(dict.fromkeys(out))


def specificity(host: str | None) -> tuple[int, int]:
    """Sort key, most specific first: exact hosts, then wildcards by length, then the catch-all."""
    if not host or host == CATCH_ALL:
        return (2, 0)
    if host.startswith("*."):
        return (1, -len(host))
    return (0, -len(host))


# -- listener validation ----------------------------------------------------------------------------


@attrs.define(eq=False)
class _Lst:
    """A validated listener of one of our Gateways."""

    gateway: Gateway
    listener: Listener
    kinds: tuple[str, ...]  # supported route kinds
    conditions: list[Condition]
    usable: bool  # serves traffic (accepted, programmed)
    certificates: tuple[CertSecret, ...] = ()  # HTTPS: the usable certificateRefs, in order


def _permitted(grants: Iterable[ReferenceGrant], from_group: str, from_kind: str, from_ns: str,
               to_ns: str, to_group: str, to_kind: str, to_name: str) -> bool:
    if from_ns == to_ns:
        return True
    return any(g.meta.namespace == to_ns and g.permits(from_group, from_kind, from_ns, to_group, to_kind, to_name)
               for g in grants)


def _supported_kinds(lst: Listener) -> tuple[tuple[str, ...], list[str]]:
    if lst.kinds is None:
        return (ROUTE_KINDS if lst.protocol in SUPPORTED_PROTOCOLS else ()), []
    ok, bad = [], []
    for group, kind in lst.kinds:
        if group == GROUP and kind in ROUTE_KINDS:
            ok.append(kind)
        else:
            bad.append(f"{group}/{kind}" if group else kind)
    return tuple(dict.fromkeys(ok)), bad


def _validate_listener(gw: Gateway, lst: Listener, ingress_port: int, grants: tuple[ReferenceGrant, ...],
                       secrets: Mapping[tuple[str, str], CertSecret]) -> _Lst:
    kinds, bad_kinds = _supported_kinds(lst)
    accepted: Condition = Condition(ACCEPTED, True, "Accepted", "listener accepted")
    resolved: Condition = Condition(RESOLVED_REFS, True, "ResolvedRefs", "all references resolved")
    certificates: tuple[CertSecret, ...] = ()
    if lst.problems:
        accepted = Condition(ACCEPTED, False, "UnsupportedValue", "; ".join(lst.problems))
    elif lst.protocol not in SUPPORTED_PROTOCOLS:
        accepted = Condition(ACCEPTED, False, "UnsupportedProtocol",
                             f"protocol {lst.protocol!r} is not supported (HTTP and HTTPS are)")
    elif lst.port == ingress_port:
        accepted = Condition(ACCEPTED, False, "PortUnavailable",
                             f"port {lst.port} is the Ingress listener's (--gateway-port)")
    elif lst.port in RESERVED_PORTS:
        accepted = Condition(ACCEPTED, False, "PortUnavailable", f"port {lst.port} is {RESERVED_PORTS[lst.port]}")
    elif lst.protocol == "HTTPS" and lst.tls_mode != "Terminate":
        accepted = Condition(ACCEPTED, False, "UnsupportedValue",
                             "HTTPS needs tls.mode Terminate" if lst.tls_mode else "HTTPS needs a tls section (mode Terminate, certificateRefs)")
    if bad_kinds:
        resolved = Condition(RESOLVED_REFS, False, "InvalidRouteKinds",
                             f"route kinds not supported: {', '.join(bad_kinds)} (HTTPRoute and GRPCRoute are)")
    elif accepted.status and lst.protocol == "HTTPS":
        certificates, resolved = _certificate(gw, lst, grants, secrets)
    usable = accepted.status and bool(kinds) and (lst.protocol != "HTTPS" or bool(certificates))
    return _Lst(gw, lst, kinds, [accepted, resolved], usable, certificates)


def _certificate(gw: Gateway, lst: Listener, grants: tuple[ReferenceGrant, ...],
                 secrets: Mapping[tuple[str, str], CertSecret]) -> tuple[tuple[CertSecret, ...], Condition]:
    """Every usable certificateRef, in order (a Secret named twice counts once: all are served, Envoy
    picks by SNI), and ResolvedRefs: False with the first unusable ref's reason (InvalidCertificateRef,
    RefNotPermitted) and every one's message, while the usable ones are still served."""
    if not lst.certificate_refs:
        return (), Condition(RESOLVED_REFS, False, "InvalidCertificateRef", "HTTPS needs tls.certificateRefs")
    good: dict[tuple[str, str], CertSecret] = {}
    bad: list[Condition] = []
    for ref in lst.certificate_refs:
        ns = ref.namespace or gw.meta.namespace
        secret = secrets.get((ns, ref.name))
        if ref.group not in ("", "core") or ref.kind != "Secret":
            bad.append(Condition(RESOLVED_REFS, False, "InvalidCertificateRef",
                                 f"certificateRef {ref.kind} {ref.name!r}: only core Secrets are supported"))
        elif not _permitted(grants, GROUP, GATEWAY, gw.meta.namespace, ns, "", "Secret", ref.name):
            bad.append(Condition(RESOLVED_REFS, False, "RefNotPermitted",
                                 f"Secret {ns}/{ref.name}: no ReferenceGrant in {ns} allows Gateways of {gw.meta.namespace}"))
        elif secret is None:
            bad.append(Condition(RESOLVED_REFS, False, "InvalidCertificateRef", f"Secret {ns}/{ref.name} (kubernetes.io/tls) not found"))
        elif secret.error:
            bad.append(Condition(RESOLVED_REFS, False, "InvalidCertificateRef", f"Secret {ns}/{ref.name}: {secret.error}"))
        else:
            good.setdefault((ns, ref.name), secret)
    if not bad:
        return tuple(good.values()), Condition(RESOLVED_REFS, True, "ResolvedRefs", "all references resolved")
    message = "; ".join(c.message for c in bad)
    if good:
        message += f" (the other {len(good)} certificate{'s are' if len(good) > 1 else ' is'} served)"
    return tuple(good.values()), Condition(RESOLVED_REFS, False, bad[0].reason, message)


def gateway_service_key(options: argparse.Namespace) -> tuple[str, str]:
    """``(namespace, name)`` of the gateway Service (``--gateway-namespace``, ``--gateway-service``)."""
    return (str(ingress_option(options, "gateway_namespace")), str(ingress_option(options, "gateway_service")))


def exposed_ports(model: Model, options: argparse.Namespace) -> frozenset[int] | None:
    """The gateway-pod ports the gateway Service sends traffic to (None: no such Service in the model,
    e.g. local mode binding a loopback address: nothing to check against).

    A Service port exposes pod port P when its ``targetPort`` is P, or is named ``gw-P`` (the chart's
    container port names for ``gateway.gatewayAPIPorts``), or is another name its endpoints resolve to P."""
    svc: Service | None = model.services.get(gateway_service_key(options))
    if svc is None:
        return None
    out: set[int] = set()
    for sp in svc.ports:
        target = sp.target_port
        if isinstance(target, int):
            out.add(target)
        elif target.startswith("gw-") and target[3:].isdigit():
            out.add(int(target[3:]))
        else:
            out.update(e.port for e in model.endpoints_of(svc, sp))
    return frozenset(out)


def _conflicts(listeners: list[_Lst]) -> None:
    """Listeners of our Gateways that share a port: same protocol, distinct hostnames (first one wins:
    oldest Gateway, then listener order); a conflicted listener serves nothing."""
    by_port: dict[int, list[_Lst]] = {}
    for entry in listeners:
        if entry.conditions[0].status and entry.listener.port is not None:
            by_port.setdefault(entry.listener.port, []).append(entry)
    for entries in by_port.values():
        protocol = entries[0].listener.protocol
        hosts: dict[str, _Lst] = {}
        for e in entries:
            lst, conflict = e.listener, None
            if lst.protocol != protocol:
                conflict = Condition(CONFLICTED, True, "ProtocolConflict",
                                     f"port {lst.port} is already served as {protocol} "
                                     f"(Gateway {entries[0].gateway.meta.namespace}/{entries[0].gateway.meta.name})")
            else:
                host = lst.hostname or CATCH_ALL
                owner = hosts.get(host)
                if owner is not None:
                    conflict = Condition(CONFLICTED, True, "HostnameConflict",
                                         f"hostname {host!r} on port {lst.port} is already served by listener "
                                         f"{owner.gateway.meta.namespace}/{owner.gateway.meta.name}/{owner.listener.name}")
                else:
                    hosts[host] = e
            e.conditions.append(conflict or Condition(CONFLICTED, False, "NoConflicts", "no conflicts"))
            if conflict is not None:
                e.usable = False


# -- routes -----------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class _Entry:
    """One route match on one hostname of one listener, with its sort key."""

    key: tuple[Any, ...]
    route: t.Route


def _http_key(m: RouteMatch) -> tuple[Any, ...]:
    rank = {"Exact": 0, "RegularExpression": 1}.get(m.path_type, 2)
    return (rank, -len(m.path), 0 if m.method else 1, -len(m.headers), -len(m.query))


def _grpc_key(m: RouteMatch, hostname: str) -> tuple[Any, ...]:
    plain = "" if hostname.startswith("*") else hostname
    return (-len(plain), -len(hostname if hostname != CATCH_ALL else ""), -len(m.grpc_service), -len(m.grpc_method),
            -len(m.headers))


class _Resolver:
    """Backend references -> :class:`table.Backend` (with the reason of the first that cannot be used)."""

    def __init__(self, model: Model, grants: tuple[ReferenceGrant, ...]) -> None:
        self.model = model
        self.grants = grants

    def backend(self, route: Route, ref: BackendRef) -> tuple[t.Backend, Condition | None]:
        ns = ref.namespace or route.meta.namespace
        port = ref.port or 0
        bad = t.Backend(ns, ref.name, port, ref.weight)
        if ref.group not in ("", "core") or ref.kind != "Service":
            return bad, Condition(RESOLVED_REFS, False, "InvalidKind",
                                  f"backendRef {ref.kind} {ref.name!r}: only core Services are supported")
        if not _permitted(self.grants, GROUP, route.kind, route.meta.namespace, ns, "", "Service", ref.name):
            return bad, Condition(RESOLVED_REFS, False, "RefNotPermitted",
                                  f"Service {ns}/{ref.name}: no ReferenceGrant in {ns} allows {route.kind}s of {route.meta.namespace}")
        svc: Service | None = self.model.services.get((ns, ref.name))
        if svc is None:
            return bad, Condition(RESOLVED_REFS, False, "BackendNotFound", f"Service {ns}/{ref.name} not found")
        if ref.port is None:
            return bad, Condition(RESOLVED_REFS, False, "BackendNotFound", f"backendRef {ns}/{ref.name} has no port")
        sp = next((p for p in svc.ports if p.port == ref.port), None)
        if sp is None:
            return bad, Condition(RESOLVED_REFS, False, "BackendNotFound", f"Service {ns}/{ref.name} has no port {ref.port}")
        return t.Backend(ns, ref.name, port, ref.weight, svc, sp), None


def _header_changes(config: Mapping[str, Any], problems: list[str], what: str) -> t.HeaderChanges:
    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for item in config.get(key) or []:
            name, value = (item or {}).get("name"), (item or {}).get("value")
            if (not isinstance(name, str) or not HEADER_NAME_RE.match(name) or not isinstance(value, str)
                    or any(c in value for c in "\r\n\0")):
                problems.append(f"{what}.{key}: {item!r} needs a header name (an HTTP token) and a single-line value")
                continue
            out.append((name.lower(), value))
        return tuple(out)

    remove = []
    for n in config.get("remove") or []:
        if not isinstance(n, str) or not HEADER_NAME_RE.match(n):
            problems.append(f"{what}.remove: {n!r} is not a header name (an HTTP token)")
            continue
        remove.append(n.lower())
    return t.HeaderChanges(pairs("set"), pairs("add"), tuple(remove))


def _path_modifier(config: Any, first_match: RouteMatch | None, problems: list[str], what: str) -> tuple[str | None, str | None]:
    if not config:
        return None, None
    typ = (config or {}).get("type")
    if typ == "ReplaceFullPath":
        value = config.get("replaceFullPath")
    elif typ == "ReplacePrefixMatch":
        value = config.get("replacePrefixMatch")
        if first_match is None or first_match.path_type != "PathPrefix":
            problems.append(f"{what}: ReplacePrefixMatch needs PathPrefix matches")
            return None, None
    else:
        problems.append(f"{what}: path modifier type {typ!r} is not supported")
        return None, None
    if not isinstance(value, str) or not PATH_RE.match(value):
        problems.append(f"{what}: path {value!r} is not an absolute path (no query, fragment, spaces or control characters)")
        return None, None
    return str(typ), value


_HTTP_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite", "RequestMirror")
_GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror")


def _rule_actions(route: Route, rule: Rule, resolver: _Resolver) -> tuple[dict[str, Any], list[str], list[Condition]]:
    """The filters and backends of one rule as :class:`table.Route` fields; problems (the rule is not
    programmed) and backend conditions (the rule is programmed, bad shares answer 500)."""
    problems: list[str] = list(rule.problems)
    refs: list[Condition] = []
    fields: dict[str, Any] = {}
    allowed = _GRPC_FILTERS if route.kind == GRPC_ROUTE else _HTTP_FILTERS
    seen: set[str] = set()
    mirrors: list[t.Mirror] = []
    first = rule.matches[0] if rule.matches else None
    for f in rule.filters:
        if f.type not in allowed:
            problems.append(f"filter {f.type or '(no type)'!r} is not supported on {route.kind}")
            continue
        if f.type in seen and f.type != "RequestMirror":
            problems.append(f"filter {f.type} appears twice")
            continue
        seen.add(f.type)
        _filter(f, first, fields, problems, resolver, route, refs, mirrors)
    if "redirect" in fields and "rewrite" in fields:
        problems.append("RequestRedirect and URLRewrite cannot be used together")
    if any(b.unsupported for b in rule.backends):
        problems.extend(sorted({b.unsupported for b in rule.backends if b.unsupported}))
    backends = []
    for ref in rule.backends:
        backend, cond = resolver.backend(route, ref)
        if cond is not None:
            refs.append(cond)
        if ref.weight > 0:
            backends.append(backend)
    fields["backends"] = tuple(backends) if "redirect" not in fields else ()
    fields["mirrors"] = tuple(mirrors)
    return fields, problems, refs


def _filter(f: Filter, first: RouteMatch | None, fields: dict[str, Any], problems: list[str], resolver: _Resolver,
            route: Route, refs: list[Condition], mirrors: list[t.Mirror]) -> None:
    c = f.config
    if f.type == "RequestHeaderModifier":
        fields["request_headers"] = _header_changes(c, problems, f.type)
    elif f.type == "ResponseHeaderModifier":
        fields["response_headers"] = _header_changes(c, problems, f.type)
    elif f.type == "RequestRedirect":
        scheme, hostname, port, code = c.get("scheme"), c.get("hostname"), c.get("port"), c.get("statusCode", 302)
        if scheme is not None and scheme not in ("http", "https"):
            problems.append(f"RequestRedirect: scheme {scheme!r} is not http or https")
        if hostname is not None and (not isinstance(hostname, str) or not valid_hostname(hostname.lower()) or "*" in hostname):
            problems.append(f"RequestRedirect: hostname {hostname!r} is not a DNS name")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
            problems.append(f"RequestRedirect: port {port!r} is not a port number")
        if code not in (301, 302, 303, 307, 308):
            problems.append(f"RequestRedirect: statusCode {code!r} is not one of 301, 302, 303, 307, 308")
        path_type, path = _path_modifier(c.get("path"), first, problems, f.type)
        fields["redirect"] = t.Redirect(scheme, hostname.lower() if isinstance(hostname, str) else None,
                                        port if isinstance(port, int) else None,
                                        code if isinstance(code, int) else 302, path_type, path)
    elif f.type == "URLRewrite":
        hostname = c.get("hostname")
        if hostname is not None and (not isinstance(hostname, str) or not valid_hostname(hostname.lower()) or "*" in hostname):
            problems.append(f"URLRewrite: hostname {hostname!r} is not a DNS name")
        path_type, path = _path_modifier(c.get("path"), first, problems, f.type)
        fields["rewrite"] = t.Rewrite(hostname.lower() if isinstance(hostname, str) else None, path_type, path)
    elif f.type == "RequestMirror":
        assert f.mirror is not None
        percent = 100.0
        if c.get("percent") is not None:
            percent = float(c["percent"]) if isinstance(c["percent"], int) and 0 <= c["percent"] <= 100 else -1
        elif isinstance(c.get("fraction"), Mapping):
            num, den = c["fraction"].get("numerator"), c["fraction"].get("denominator", 100)
            ok = isinstance(num, int) and isinstance(den, int) and den > 0 and 0 <= num <= den
            percent = 100.0 * num / den if ok else -1
        if percent < 0:
            problems.append("RequestMirror: percent/fraction must be within 0-100 %")
            return
        backend, cond = resolver.backend(route, attrs.evolve(f.mirror, weight=1))
        if cond is not None:
            refs.append(cond)  # a mirror that cannot be used is left out (no copy is sent)
            return
        mirrors.append(t.Mirror(backend, percent))


@attrs.define
class _Attach:
    """One route's attachment to one parentRef: the listeners it attached to and the conditions."""

    listeners: list[_Lst] = attrs.field(factory=list)
    accepted: Condition | None = None


def _namespace_allowed(entry: _Lst, route: Route, namespaces: Mapping[tuple[str, str], Namespace]) -> bool:
    lst, gw_ns = entry.listener, entry.gateway.meta.namespace
    if lst.allowed_from == "All":
        return True
    if lst.allowed_from == "Selector":
        ns = namespaces.get(("", route.meta.namespace))
        labels = ns.labels if ns is not None else {"kubernetes.io/metadata.name": route.meta.namespace}
        return lst.selector is not None and lst.selector.matches(labels)
    return route.meta.namespace == gw_ns


def _attach(route: Route, ref: ParentRef, gw: Gateway, listeners: list[_Lst],
            namespaces: Mapping[tuple[str, str], Namespace]) -> _Attach:
    """``listeners``: the Gateway's (or every Gateway's: only ``gw``'s are considered)."""
    out = _Attach()
    candidates = [e for e in listeners if e.gateway is gw]
    if ref.section_name is not None:
        candidates = [e for e in candidates if e.listener.name == ref.section_name]
    if ref.port is not None:
        candidates = [e for e in candidates if e.listener.port == ref.port]
    if not candidates:
        what = " ".join(x for x in (f"sectionName {ref.section_name!r}" if ref.section_name else "",
                                    f"port {ref.port}" if ref.port is not None else "") if x)
        out.accepted = Condition(ACCEPTED, False, "NoMatchingParent", f"Gateway {gw.meta.namespace}/{gw.meta.name} has no listener with {what}")
        return out
    allowed = [e for e in candidates if route.kind in e.kinds and _namespace_allowed(e, route, namespaces)]
    if not allowed:
        out.accepted = Condition(ACCEPTED, False, "NotAllowedByListeners",
                                 f"no listener of Gateway {gw.meta.namespace}/{gw.meta.name} allows {route.kind}s "
                                 f"from namespace {route.meta.namespace}")
        return out
    out.listeners = [e for e in allowed if not route.hostnames or any(_intersects(e.listener.hostname, h) for h in route.hostnames)]
    if not out.listeners:
        out.accepted = Condition(ACCEPTED, False, "NoMatchingListenerHostname",
                                 f"no hostname of the route intersects a listener hostname of Gateway {gw.meta.namespace}/{gw.meta.name}")
        return out
    out.accepted = Condition(ACCEPTED, True, "Accepted", "route accepted")
    return out


def _intersects(listener_host: str | None, host: str) -> bool:
    lh = listener_host or CATCH_ALL
    return host_matches(lh, host) or host_matches(host, lh)


# -- the plan ---------------------------------------------------------------------------------------


def _owner(port_listeners: list[_Lst], host: str) -> _Lst | None:
    """The listener on one port that owns requests for ``host``: the most specific hostname covering it."""
    covering = [e for e in port_listeners if host_matches(e.listener.hostname or CATCH_ALL, host)]
    if not covering:
        return None
    return min(covering, key=lambda e: specificity(e.listener.hostname))


@attrs.define(eq=False)
class _Contribution:
    """What one route adds to a plan: virtual host and mesh entries, implied protocols, the listeners it
    is attached to (counted in attachedRoutes), its status entries (None: not ours), and the Services it
    reads (backends, mirrors, Service parents)."""

    route: Route
    vhosts: list[tuple[tuple[int, int, str], _Entry]] = attrs.field(factory=list)
    mesh: list[tuple[gamma.MeshKey, tuple[tuple[Any, ...], t.Route]]] = attrs.field(factory=list)
    protocols: set[tuple[str, str, int | str, str]] = attrs.field(factory=set)
    attached: list[int] = attrs.field(factory=list)
    status: tuple[ParentStatus, ...] | None = None
    services: frozenset[tuple[str, str]] = frozenset()


@attrs.define(eq=False)
class _State:
    """A plan's working state, for the next build to start from when only routes changed (never a model
    mapping: IR objects and this build's listener records only)."""

    options: tuple[Any, ...]
    ours: dict[str, tuple[GatewayClass, tuple[Condition, ...]]]
    gateways: list[Gateway]
    gw_problem: dict[int, Condition]
    listeners: list[_Lst]
    grants: tuple[ReferenceGrant, ...]
    gateway_service: Any
    contributions: dict[tuple[str, str, str], _Contribution]
    users: dict[tuple[str, str], set[tuple[str, str, str]]]  # Service key -> route keys reading it


def _route_key(route: Route) -> tuple[str, str, str]:
    return (route.kind, route.meta.namespace, route.meta.name)


class _Common:
    """Everything routes attach to, derived once per full build (classes, Gateways, listeners)."""

    def __init__(self, model: Model, options: argparse.Namespace, ours: dict[str, tuple[GatewayClass, tuple[Condition, ...]]],
                 gateways: list[Gateway], gw_problem: dict[int, Condition], listeners: list[_Lst],
                 grants: tuple[ReferenceGrant, ...]) -> None:
        self.model, self.options, self.ours, self.gateways = model, options, ours, gateways
        self.gw_problem, self.listeners, self.grants = gw_problem, listeners, grants
        self.controller = controller_name(options)
        self.namespaces: Mapping[tuple[str, str], Namespace] = model.extra.get(NAMESPACE) or {}
        self.usable = [e for e in listeners if e.usable]
        self.listeners_of: dict[int, list[_Lst]] = {}
        for e in listeners:
            self.listeners_of.setdefault(id(e.gateway), []).append(e)
        self.usable_by_port: dict[int | None, list[_Lst]] = {}
        for e in self.usable:
            self.usable_by_port.setdefault(e.listener.port, []).append(e)
        self.resolver = _Resolver(model, grants)
        self.gateway_keys = {(g.meta.namespace, g.meta.name): g for g in gateways}
        self.claims: dict[tuple[int, str], list[tuple[Route, tuple[str, ...]]]] = {}
        self.mesh_claims: dict[gamma.MeshKey, Route] = {}


def _common(model: Model, options: argparse.Namespace) -> _Common:
    extra = model.extra
    controller = controller_name(options)
    ingress_port = int(ingress_option(options, "gateway_port"))
    classes = (extra.get(GATEWAY_CLASS) or {}).values()
    ours: dict[str, tuple[GatewayClass, tuple[Condition, ...]]] = {}
    for gc in sorted(classes, key=lambda c: c.name):
        if gc.controller != controller:
            continue
        if gc.has_parameters:
            cond = Condition(ACCEPTED, False, "InvalidParameters", "parametersRef is not supported by this controller")
        else:
            cond = Condition(ACCEPTED, True, "Accepted", "GatewayClass accepted")
        ours[gc.name] = (gc, (cond,))
    grants: tuple[ReferenceGrant, ...] = tuple((extra.get(REFERENCE_GRANT) or {}).values())
    secrets: Mapping[tuple[str, str], CertSecret] = extra.get(SECRET) or {}
    gateways = sorted((g for g in (extra.get(GATEWAY) or {}).values() if g.class_name in ours),
                      key=lambda g: (g.meta.created, g.meta.namespace, g.meta.name))
    # Listeners of served Gateways (a Gateway of a class we do not accept, or asking for addresses, serves nothing).
    listeners: list[_Lst] = []
    gw_problem: dict[int, Condition] = {}
    for gw in gateways:
        klass = ours[gw.class_name][1][0]
        if not klass.status:
            gw_problem[id(gw)] = Condition(ACCEPTED, False, "Invalid", f"GatewayClass {gw.class_name} is not accepted: {klass.message}")
            continue
        if gw.requested_addresses:
            gw_problem[id(gw)] = Condition(ACCEPTED, False, "UnsupportedAddress",
                                           "spec.addresses is not supported: the addresses are the gateway Service's")
            continue
        listeners.extend(_validate_listener(gw, lst, ingress_port, grants, secrets) for lst in gw.listeners)
    _conflicts(listeners)
    return _Common(model, options, ours, gateways, gw_problem, listeners, grants)


def _contribution(route: Route, c: _Common) -> _Contribution:
    """What ``route`` adds (attachment, conditions, entries). Routes must come oldest first (kind
    conflicts: the older route's claims are already in ``c``)."""
    out = _Contribution(route)
    vhosts: dict[tuple[int, int, str], list[_Entry]] = {}
    mesh_entries: dict[gamma.MeshKey, list[tuple[tuple[Any, ...], t.Route]]] = {}
    parents = []
    mine = False
    names: set[tuple[str, str]] = set()
    for rule in route.rules:
        for b in (*rule.backends, *(f.mirror for f in rule.filters if f.mirror)):
            names.add((b.namespace or route.meta.namespace, b.name))
    for ref in route.parent_refs:
        if gamma.is_service_parent(ref):
            mine = True  # this control plane is the mesh of every Service (GAMMA)
            names.add((ref.namespace or route.meta.namespace, ref.name))
            parents.append(_attach_service_parent(route, ref, c.model, c.resolver, mesh_entries, out.protocols, c.mesh_claims))
            continue
        if ref.group != GROUP or ref.kind != GATEWAY:
            continue  # other kinds: not ours
        gw = c.gateway_keys.get((ref.namespace or route.meta.namespace, ref.name))
        if gw is None:
            continue
        mine = True
        if id(gw) in c.gw_problem:
            parents.append(ParentStatus(ref, (Condition(ACCEPTED, False, "NotAllowedByListeners",
                                                        f"Gateway {gw.meta.namespace}/{gw.meta.name} is not accepted"),
                                              Condition(RESOLVED_REFS, True, "ResolvedRefs", "all references resolved"))))
            continue
        att = _attach(route, ref, gw, c.listeners_of.get(id(gw), []), c.namespaces)
        _kind_conflicts(route, att, c.claims)
        served = [e for e in att.listeners if e.usable]
        accepted, resolved, programmed = _program_route(route, served, c.usable_by_port, c.resolver, vhosts, out.protocols)
        if att.accepted is not None and att.accepted.status:
            att.accepted = accepted or att.accepted
            if att.accepted.status:
                out.attached.extend(id(e) for e in att.listeners)
        assert att.accepted is not None
        parents.append(ParentStatus(ref, (att.accepted, resolved)))
    if mine or _has_our_entries(route, c.controller):
        out.status = tuple(parents)
    out.vhosts = [(k, e) for k, entries in vhosts.items() for e in entries]
    out.mesh = [(k, e) for k, entries in mesh_entries.items() for e in entries]
    out.services = frozenset(names)
    return out


def _sorted_routes(model: Model) -> list[Route]:
    return sorted([r for kind in ROUTE_KINDS for r in (model.extra.get(kind) or {}).values()], key=lambda r: (r.age_key, r.kind))


def build(model: Model, options: argparse.Namespace, previous: Plan | None = None) -> Plan:
    """The plan of ``model`` (no memo: see :func:`plan`). ``previous``: the plan of the model before this
    one (``model.delta`` relative to it): when only HTTPRoutes (and Services they read) changed, only the
    changed routes are planned again; the result equals a full build."""
    state = previous.state if previous is not None else None
    if state is not None and model.delta is not None:
        changed = _changed_routes(model, options, state)
        if changed is not None:
            return _rebuild(model, options, state, changed)
    c = _common(model, options)
    contributions = {_route_key(r): _contribution(r, c) for r in _sorted_routes(model)}
    state = _State(_option_values(options), c.ours, c.gateways, c.gw_problem, c.listeners, c.grants,
                   _gateway_service_inputs(model, options), contributions, {})
    for key, contrib in contributions.items():
        for name in contrib.services:
            state.users.setdefault(name, set()).add(key)
    return _finish(model, options, state)


def _changed_routes(model: Model, options: argparse.Namespace, state: _State) -> set[tuple[str, str, str]] | None:
    """The routes to plan again, or None when a full build is needed (anything but HTTPRoutes and the
    Services routes read changed, or GRPCRoutes exist: their kind conflicts couple routes)."""
    delta = model.delta
    assert delta is not None
    if not (delta.extra & _KIND_SET) <= {HTTP_ROUTE} or model.extra.get(GRPC_ROUTE):
        return None
    if any(k[0] == GRPC_ROUTE for k in state.contributions) or state.options != _option_values(options):
        return None
    gw_inputs = _gateway_service_inputs(model, options)
    if len(gw_inputs) != len(state.gateway_service) or not all(a is b or a == b for a, b in zip(gw_inputs, state.gateway_service)):
        return None
    current = model.extra.get(HTTP_ROUTE) or {}
    changed = {(HTTP_ROUTE, ns, name) for (ns, name), r in current.items()
               if (old := state.contributions.get((HTTP_ROUTE, ns, name))) is None or old.route is not r}
    changed.update(k for k in state.contributions if (k[1], k[2]) not in current)
    for svc in delta.services:
        changed.update(state.users.get(svc, ()))
    return changed


def _rebuild(model: Model, options: argparse.Namespace, state: _State, changed: set[tuple[str, str, str]]) -> Plan:
    """``state``'s plan with the ``changed`` routes planned again (the rest reused)."""
    c = _Common(model, options, state.ours, state.gateways, state.gw_problem, state.listeners, state.grants)
    current = model.extra.get(HTTP_ROUTE) or {}
    contributions = dict(state.contributions)
    users = {k: set(v) for k, v in state.users.items()} if changed else state.users
    for key in changed:
        old = contributions.pop(key, None)
        if old is not None:
            for name in old.services:
                users.get(name, set()).discard(key)
        route = current.get((key[1], key[2]))
        if route is None:
            continue
        contrib = _contribution(route, c)
        contributions[key] = contrib
        for name in contrib.services:
            users.setdefault(name, set()).add(key)
    state = attrs.evolve(state, contributions=contributions, users={k: v for k, v in users.items() if v})
    return _finish(model, options, state)


def _finish(model: Model, options: argparse.Namespace, state: _State) -> Plan:
    """The plan from the routes' contributions (in route order: oldest first)."""
    contributions = sorted(state.contributions.values(), key=lambda x: (x.route.age_key, x.route.kind))
    attached_count: dict[int, int] = {}
    vhosts: dict[tuple[int, int, str], list[_Entry]] = {}
    mesh_entries: dict[gamma.MeshKey, list[tuple[tuple[Any, ...], t.Route]]] = {}
    protocols: set[tuple[str, str, int | str, str]] = set()
    route_status: list[tuple[Route, tuple[ParentStatus, ...]]] = []
    for contrib in contributions:
        for lid in contrib.attached:
            attached_count[lid] = attached_count.get(lid, 0) + 1
        for vkey, entry in contrib.vhosts:
            vhosts.setdefault(vkey, []).append(entry)
        for mkey, mentry in contrib.mesh:
            mesh_entries.setdefault(mkey, []).append(mentry)
        protocols.update(contrib.protocols)
        if contrib.status is not None:
            route_status.append((contrib.route, contrib.status))
    live = set(state.contributions)
    for k in [k for k in _route_memo if k not in live]:
        _route_memo.pop(k, None)
    usable = [e for e in state.listeners if e.usable]
    table = _table(usable, vhosts)
    exposed = exposed_ports(model, options)
    statuses = tuple(_gateway_status(gw, [e for e in state.listeners if e.gateway is gw], attached_count,
                                     state.gw_problem.get(id(gw)), exposed, options)
                     for gw in state.gateways)
    return Plan(table, tuple(state.ours.values()), statuses, tuple(route_status), tuple(sorted(protocols, key=str)),
                gamma.table(mesh_entries), state)


def _overlap(a: str, b: str) -> bool:
    return host_matches(a, b) or host_matches(b, a)


def _kind_conflicts(route: Route, att: _Attach, claims: dict[tuple[int, str], list[tuple[Route, tuple[str, ...]]]]) -> None:
    """HTTPRoute and GRPCRoute never share a hostname on one listener: the older route (then
    ``namespace/name``; routes come in that order) keeps it, the other is not attached there."""
    if att.accepted is None or not att.accepted.status:
        return
    other = GRPC_ROUTE if route.kind == HTTP_ROUTE else HTTP_ROUTE
    kept, clash = [], None
    for e in att.listeners:
        hosts = intersect(e.listener.hostname, route.hostnames)
        owner = next((r for r, theirs in claims.get((id(e), other), ())
                      if any(_overlap(a, b) for a in hosts for b in theirs)), None)
        if owner is not None:
            clash = clash or owner
            continue
        kept.append(e)
        claims.setdefault((id(e), route.kind), []).append((route, hosts))
    att.listeners = kept
    if not kept and clash is not None:
        att.accepted = Condition(ACCEPTED, False, "NotAllowedByListeners",
                                 f"its hostnames are already served by {clash.kind} {clash.meta.namespace}/{clash.meta.name} "
                                 f"(older) on every listener it attaches to: a listener serves a hostname with "
                                 f"HTTPRoutes or GRPCRoutes, not both")


def _has_our_entries(route: Route, controller: str) -> bool:
    return any(p.get("controllerName") == controller for p in route.parents)


def _program_route(route: Route, served: list[_Lst], usable: Mapping[int | None, list[_Lst]], resolver: _Resolver,
                   vhosts: dict[tuple[int, int, str], list[_Entry]],
                   protocols: set[tuple[str, str, int | str, str]]) -> tuple[Condition | None, Condition, bool]:
    """Add the route's matches to the virtual hosts of the listeners it attached to (``usable``: the
    usable listeners by port); its Accepted override (``UnsupportedValue``) and its ResolvedRefs condition."""
    if route.problems:  # an invalid hostname: serving the rest could widen the route to every host
        return (Condition(ACCEPTED, False, "UnsupportedValue", "; ".join(route.problems) + " (the route is not served)"),
                Condition(RESOLVED_REFS, True, "ResolvedRefs", "all references resolved"), False)
    matches, problems, ref_conds = route_matches(route, resolver)
    programmed = False
    grpc = route.kind == GRPC_ROUTE
    # Where the route's requests land: (listener, hostname) pairs this listener owns on its port (a more
    # specific listener on the same port owns the others); the same for every match.
    targets = [(e, host) for e in served for host in intersect(e.listener.hostname, route.hostnames)
               if _owner(usable.get(e.listener.port, []), host) is e] if matches else []
    for m, tie, tr in matches if served else ():
        add_protocols(tr, protocols)
        for e, host in targets:
            key = (_grpc_key(m, host) if grpc else _http_key(m)) + tie
            vhosts.setdefault((int(e.listener.port or 0), id(e), host), []).append(_Entry((1 if grpc else 0, key), tr))
            programmed = True
    accepted, resolved = route_conditions(problems, ref_conds)
    return accepted, resolved, programmed


_Matches = tuple[list[tuple[RouteMatch, tuple[Any, ...], t.Route]], list[str], list[Condition]]
#: route_matches results by (kind, namespace, name): (route, what it read, result); pruned by each build.
_route_memo: dict[tuple[str, str, str], tuple[Route, tuple[Any, ...], _Matches]] = {}


def _route_deps(route: Route, resolver: _Resolver) -> tuple[Any, ...]:
    """What :func:`_route_matches` reads besides the route: the Services it names (compared by identity)
    and, when it names another namespace's, the ReferenceGrants."""
    ns = route.meta.namespace
    refs = [b for rule in route.rules for b in (*rule.backends, *(f.mirror for f in rule.filters if f.mirror))]
    deps: list[Any] = [resolver.model.services.get((b.namespace or ns, b.name)) for b in refs]
    if any((b.namespace or ns) != ns for b in refs):
        deps.extend(resolver.grants)
    return tuple(deps)


def route_matches(route: Route, resolver: _Resolver) -> _Matches:
    """Every match of every valid rule of ``route`` as ``(match, tie-break key, table route)``, with the
    problems of the rules left out (``UnsupportedValue``) and the backend conditions (shared by Gateway
    and Service parents). Memoized per route while the route object and what it reads are the same (the
    same table routes again: the translation compares them by identity first). Callers must not mutate
    the lists."""
    key = (route.kind, route.meta.namespace, route.meta.name)
    deps = _route_deps(route, resolver)
    old = _route_memo.get(key)
    if old is not None and old[0] is route and len(old[1]) == len(deps) and all(a is b for a, b in zip(old[1], deps)):
        return old[2]
    result = _route_matches(route, resolver)
    _route_memo[key] = (route, deps, result)
    return result


def _route_matches(route: Route, resolver: _Resolver) -> _Matches:
    problems: list[str] = []
    ref_conds: list[Condition] = []
    out: list[tuple[RouteMatch, tuple[Any, ...], t.Route]] = []
    grpc = route.kind == GRPC_ROUTE
    for ri, rule in enumerate(route.rules):
        fields, rule_problems, conds = _rule_actions(route, rule, resolver)
        ref_conds.extend(conds)
        if rule_problems:
            problems.extend(f"rule {ri}: {p}" for p in rule_problems)
            continue
        for mi, m in enumerate(rule.matches):
            source = f"{route.kind}/{route.meta.namespace}/{route.meta.name}/rule{ri}/match{mi}"
            tm = t.Match(m.path_type, m.path, tuple(t.KeyMatch(k.name, k.value, k.type) for k in m.headers),
                         tuple(t.KeyMatch(k.name, k.value, k.type) for k in m.query), m.method)
            tr = t.Route(tm, timeout_ms=rule.timeout_ms, backend_timeout_ms=rule.backend_timeout_ms, grpc=grpc,
                         source=source, **fields)
            out.append((m, (route.meta.created, f"{route.meta.namespace}/{route.meta.name}", ri, mi), tr))
    return out, problems, ref_conds


def add_protocols(tr: t.Route, protocols: set[tuple[str, str, int | str, str]]) -> None:
    """The usable backends (and mirror targets) of ``tr`` are ``grpc`` (GRPCRoute) or ``http`` ports."""
    for b in (*tr.backends, *(m.backend for m in tr.mirrors)):
        if b.service is not None and b.port is not None:
            protocols.add((b.namespace, b.name, b.port_number, "grpc" if tr.grpc else "http"))


def route_conditions(problems: list[str], ref_conds: list[Condition]) -> tuple[Condition | None, Condition]:
    """A parent's Accepted override (``UnsupportedValue`` when rules were left out) and ResolvedRefs."""
    accepted = None
    if problems:
        accepted = Condition(ACCEPTED, False, "UnsupportedValue", "; ".join(problems) + " (those rules are not served)")
    if ref_conds:
        msg = "; ".join(dict.fromkeys(c.message for c in ref_conds))
        resolved = Condition(RESOLVED_REFS, False, ref_conds[0].reason, msg)
    else:
        resolved = Condition(RESOLVED_REFS, True, "ResolvedRefs", "all references resolved")
    return accepted, resolved


def _table(usable: list[_Lst], vhosts: dict[tuple[int, int, str], list[_Entry]]) -> t.Table:
    by_listener: dict[tuple[int, int], dict[str, list[_Entry]]] = {}
    for (p, lid, h), entries in vhosts.items():
        by_listener.setdefault((p, lid), {})[h] = entries
    ports = []
    for port in sorted({int(e.listener.port or 0) for e in usable}):
        on_port = [e for e in usable if e.listener.port == port]
        protocol = on_port[0].listener.protocol
        chains = []
        groups = [on_port] if protocol == "HTTP" else [[e] for e in sorted(on_port, key=lambda e: specificity(e.listener.hostname))]
        for group in groups:
            hosts: list[t.VirtualHost] = []
            for e in group:
                mine = dict(by_listener.get((port, id(e)), {}))
                own = e.listener.hostname or CATCH_ALL
                mine.setdefault(own, [])  # the listener's own hostname answers (404) even without routes
                # Only wildcards and the catch-all cover other hostnames (an exact one only itself): the
                # few broader hostnames are checked per host, not every pair (2000 hosts: 4M checks).
                broader = [h for h in mine if h == CATCH_ALL or h.startswith("*.")]
                for host in sorted(mine, key=lambda h: (specificity(h), h)):
                    # Routes of broader hostnames on the same listener apply to this host too.
                    entries = [x for h in broader if h != host and host_matches(h, host) for x in mine[h]] + mine[host]
                    entries.sort(key=lambda x: x.key)
                    hosts.append(t.VirtualHost(host, tuple(x.route for x in entries)))
            hosts.sort(key=lambda v: (specificity(v.hostname), v.hostname))
            if protocol == "HTTP":
                chains.append(t.Chain("http", tuple(hosts)))
            else:
                e = group[0]
                first, *more = e.certificates
                name = f"https|{e.gateway.meta.namespace}/{e.gateway.meta.name}/{e.listener.name}"
                chains.append(t.Chain(name, tuple(hosts), (e.listener.hostname,) if e.listener.hostname else (),
                                      (first.namespace, first.name), first.cert_pem, first.key_pem,
                                      tuple(t.Certificate((c.namespace, c.name), c.cert_pem, c.key_pem) for c in more)))
        ports.append(t.ServedPort(port, protocol, tuple(chains)))
    return t.Table(tuple(ports))


def _gateway_status(gw: Gateway, listeners: list[_Lst], attached: Mapping[int, int], problem: Condition | None,
                    exposed: frozenset[int] | None = None, options: argparse.Namespace | None = None) -> GatewayStatus:
    """The Gateway's and its listeners' conditions. ``exposed``: the pod ports the gateway Service
    exposes (None: unknown); a served listener on another port is ``Programmed`` False ``Pending`` (the
    specification's reason for a listener not ready to accept client traffic): it is bound in the gateway
    pods all the same, and answers once the Service exposes its port."""
    if problem is not None:
        conds = (problem, Condition(PROGRAMMED, False, "Invalid", problem.message))
        return GatewayStatus(gw, conds, ())
    out = []
    for e in listeners:
        accepted, resolved, conflicted = e.conditions[0], e.conditions[1], e.conditions[2] if len(e.conditions) > 2 else \
            Condition(CONFLICTED, False, "NoConflicts", "no conflicts")
        if e.usable and exposed is not None and e.listener.port not in exposed:
            ns, name = gateway_service_key(options) if options is not None else ("", "")
            programmed = Condition(PROGRAMMED, False, PORT_NOT_EXPOSED,
                                   f"port {e.listener.port} is not exposed by the gateway Service {ns}/{name} "
                                   f"(exposed pod ports: {', '.join(map(str, sorted(exposed))) or 'none'}): "
                                   f"clients cannot reach it; add it to the chart's gateway.gatewayAPIPorts")
        elif e.usable:
            programmed = Condition(PROGRAMMED, True, "Programmed", "listener programmed")
        else:
            why = next((c.message for c in (accepted, resolved) if not c.status), conflicted.message if conflicted.status else
                       "no supported route kinds")
            programmed = Condition(PROGRAMMED, False, "Invalid", why)
        out.append(ListenerStatus(e.listener.name, e.kinds, attached.get(id(e), 0), (accepted, programmed, resolved, conflicted)))
    valid = sum(1 for e in listeners if e.usable)
    if gw.problems:
        accepted = Condition(ACCEPTED, True if valid else False, "ListenersNotValid", "; ".join(gw.problems))
    elif valid == len(listeners) and listeners:
        accepted = Condition(ACCEPTED, True, "Accepted", "Gateway accepted")
    elif valid:
        accepted = Condition(ACCEPTED, True, "ListenersNotValid", f"{len(listeners) - valid} of {len(listeners)} listeners are not valid")
    else:
        accepted = Condition(ACCEPTED, False, "ListenersNotValid", "no listener is valid")
    programmed = (Condition(PROGRAMMED, True, "Programmed", "served by the gateway proxies") if valid
                  else Condition(PROGRAMMED, False, "Invalid", "no listener is valid"))
    return GatewayStatus(gw, (accepted, programmed), tuple(out))


# -- memo -------------------------------------------------------------------------------------------

_KINDS = (GATEWAY_CLASS, GATEWAY, HTTP_ROUTE, GRPC_ROUTE, REFERENCE_GRANT, SECRET, NAMESPACE)
_lock = threading.Lock()
_memo: list[tuple[tuple[Any, ...], Plan]] = []


_KIND_SET = frozenset(_KINDS)
#: The last plan made per options object (one per control plane), the Service keys it read and the
#: option values: while a model's delta names none of our kinds and none of those Services, it stands.
#: Keyed by ``id(options)`` with a weak reference to check it (a Namespace is not hashable).
_last: dict[int, tuple[weakref.ref[argparse.Namespace], Plan, frozenset[tuple[str, str]], tuple[Any, ...]]] = {}


def referenced_services(model: Model) -> frozenset[tuple[str, str]]:
    """The Services routes name (backends, mirrors, Service parents), present or not."""
    routes = [r for kind in ROUTE_KINDS for r in (model.extra.get(kind) or {}).values()]
    return frozenset({(b.namespace or r.meta.namespace, b.name)
                      for r in routes for rule in r.rules for b in (*rule.backends, *(f.mirror for f in rule.filters if f.mirror))}
                     | {(p.namespace or r.meta.namespace, p.name) for r in routes for p in r.parent_refs if gamma.is_service_parent(p)})


def inputs(model: Model, options: argparse.Namespace, names: frozenset[tuple[str, str]] | None = None) -> tuple[Any, ...]:
    """What a plan is made of: our kinds' objects, the Services that routes name (backends, mirrors,
    Service parents; ``names``, computed when not given), the gateway Service, the options it reads.
    Compared by identity (objects) and value (option values)."""
    objs: list[Any] = []
    for kind in _KINDS:
        table = model.extra.get(kind) or {}
        objs.append(len(table))
        objs.extend(table.values())
    ordered = sorted(referenced_services(model) if names is None else names)
    objs.append(len(ordered))
    objs.extend(model.services.get(k) for k in ordered)
    objs.append((controller_name(options), int(ingress_option(options, "gateway_port"))))
    objs.extend(_gateway_service_inputs(model, options))
    return tuple(objs)


def _gateway_service_inputs(model: Model, options: argparse.Namespace) -> tuple[Any, ...]:
    """The gateway Service and the endpoints of its named target ports (what :func:`exposed_ports` reads)."""
    key = gateway_service_key(options)
    svc = model.services.get(key)
    if svc is None:
        return (key, None)
    return (key, svc, *(model.endpoints_of(svc, sp) for sp in svc.ports if isinstance(sp.target_port, str)))


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y or (type(x) in (int, tuple) and x == y) for x, y in zip(a, b))


def _option_values(options: argparse.Namespace) -> tuple[Any, ...]:
    return (controller_name(options), int(ingress_option(options, "gateway_port")), gateway_service_key(options))


def plan(model: Model, options: argparse.Namespace) -> Plan:
    """:func:`build`, memoized on :func:`inputs` (a few recent plans, shared by the resource, protocol
    and status hooks of one build).

    With ``model.delta`` (the Kubernetes layer's models, each the successor of the last one this
    ``options`` object's control plane built): when it names none of our kinds and none of the Services
    the last plan read, that plan stands without walking anything (O(changed Services), the common case:
    pod and endpoint changes); when only HTTPRoutes and Services they read changed, :func:`build` plans
    only those routes again (and assembles the rest from the last plan's per-route results)."""
    delta = model.delta
    opts = _option_values(options)
    with _lock:
        same = _same_model[1] if _same_model is not None and _same_model[0]() is model and _same_model[2] is options else None
    if same is not None:  # the other hooks of the same build
        return same
    previous: Plan | None = None
    if delta is not None:
        with _lock:
            last = _last.get(id(options))
        if last is not None and last[0]() is options and last[3] == opts:
            if _KIND_SET.isdisjoint(delta.extra) and last[2].isdisjoint(delta.services):
                _remember(model, options, last[1])
                return last[1]
            previous = last[1]  # the plan of the model before this one: a start for build()
    names = referenced_services(model)
    key = inputs(model, options, names)
    result = None
    with _lock:
        for k, p in _memo:
            if _same(k, key):
                result = p
                break
    if result is None:
        try:
            result = build(model, options, previous)
        except BaseException:
            # This model's changes are not in any plan: the next delta cannot be trusted against the last one.
            with _lock:
                _last.pop(id(options), None)
            raise
        with _lock:
            _memo.insert(0, (key, result))
            del _memo[4:]
    with _lock:
        for gone in [i for i, v in _last.items() if v[0]() is None]:
            del _last[gone]  # options objects gone (control planes of earlier tests)
        _last[id(options)] = (weakref.ref(options), result, names | {gateway_service_key(options)}, opts)
    _remember(model, options, result)
    return result


#: The plan of the model being built (a weak reference: never kept past its build), for the other hooks
#: of the same build (port protocols, resources, mesh routes, status all ask).
_same_model: tuple[weakref.ref[Model], Plan, argparse.Namespace] | None = None


def _remember(model: Model, options: argparse.Namespace, result: Plan) -> None:
    global _same_model
    with _lock:
        _same_model = (weakref.ref(model), result, options)


def table(model: Model, options: argparse.Namespace) -> t.Table:
    """The route table (memoized)."""
    return plan(model, options).table


#: Route parent Accepted False: a consumer route on a Service port its owner did not enable for the mesh.
CONSUMER_PORT_NOT_ENABLED = "NotAllowedByListeners"


def _attach_service_parent(route: Route, ref: ParentRef, model: Model, resolver: _Resolver,
           entries: dict[gamma.MeshKey, list[tuple[tuple[Any, ...], t.Route]]],
           protocols: set[tuple[str, str, int | str, str]],
           claims: dict[gamma.MeshKey, Route] | None = None) -> ParentStatus:
    """Attach ``route`` to the Service parent ``ref``: its matches go to ``entries`` (by Service port,
    with their precedence key); returns our status entry for that parent.

    ``claims``: which route kind each Service port already serves (routes come oldest first, then
    ``namespace/name``). An HTTPRoute and a GRPCRoute never share a Service port (the specification's rule
    for a listener and hostname: for a Service parent the Service is the only host): the route of the
    other kind is not attached to a port already claimed, and is ``Accepted`` False when that leaves it
    no port. Producer and consumer routes claim separately (per caller namespace).

    A consumer route (GEP-1294 "Namespace boundaries": the parent Service is in another namespace; the
    route is "scoped only [to] the same namespace ... so that for traffic between two namespaces, another
    unrelated namespace cannot modify their traffic") is keyed by the route's namespace as the caller
    namespace; the parent reference itself needs no ReferenceGrant (that is what a consumer route is).
    It implies no protocol for the parent Service (that would enable the port for every caller): the
    port must be enabled by its owner (a ``traffic.port.N`` label or ``appProtocol``), else ``Accepted``
    False. Backends follow the same ReferenceGrant rule as every route of ours (stricter than GEP-1294,
    which lets a mesh skip it)."""

    ok_refs = Condition(RESOLVED_REFS, True, "ResolvedRefs", "all references resolved")
    ns = ref.namespace or route.meta.namespace

    def refused(reason: str, message: str) -> ParentStatus:
        return ParentStatus(ref, (Condition(ACCEPTED, False, reason, message + " (not served)"), ok_refs))

    caller = route.meta.namespace if ns != route.meta.namespace else ""
    svc: Service | None = model.services.get((ns, ref.name))
    if svc is None:
        return refused("NoMatchingParent", f"Service {ns}/{ref.name} not found")
    ports = [p for p in svc.ports if (ref.port is None or p.port == ref.port)
             and (ref.section_name is None or p.name == ref.section_name)]
    if not ports:
        what = " ".join(x for x in (f"port {ref.port}" if ref.port is not None else "",
                                    f"port named {ref.section_name!r}" if ref.section_name else "") if x)
        return refused("NoMatchingParent", f"Service {ns}/{ref.name} has no {what}")
    # A port labelled (traffic.port.N or appProtocol) with a non-HTTP protocol (tcp, direct) gets no HTTP
    # routes in the sidecars: the route does not apply there (unlabelled ports become http/grpc).
    http_ports = [p for p in ports if p.protocol is None or p.protocol in HTTP_PROTOCOLS]
    if not http_ports:
        listed = ", ".join(f"{p.port} ({p.protocol})" for p in ports)
        return refused(NOT_HTTP_PORT, f"Service {ns}/{ref.name} port{'s' if len(ports) > 1 else ''} {listed} "
                                      f"{'are' if len(ports) > 1 else 'is'} not HTTP: {route.kind}s apply to "
                                      f"http, http2, grpc and unlabelled ports only")
    ports = http_ports
    if caller:
        enabled = [p for p in ports if p.protocol is not None]
        if not enabled:
            listed = ", ".join(str(p.port) for p in ports)
            return refused(CONSUMER_PORT_NOT_ENABLED,
                           f"Service {ns}/{ref.name} port{'s' if len(ports) > 1 else ''} {listed} "
                           f"{'are' if len(ports) > 1 else 'is'} not enabled for the mesh by the Service's owner (label "
                           f"traffic.port.<port>=http|http2|grpc or appProtocol): a consumer route (namespace "
                           f"{caller}) cannot enable another namespace's Service port")
        ports = enabled
    if route.problems:
        return refused("UnsupportedValue", "; ".join(route.problems))
    claims = {} if claims is None else claims
    taken = [(p, owner) for p in ports if (owner := claims.get((ns, ref.name, p.port, caller))) is not None
             and owner.kind != route.kind]
    if taken:
        ports = [p for p in ports if all(p is not q for q, _ in taken)]
        if not ports:
            owner = taken[0][1]
            return refused(KIND_CONFLICT, f"Service {ns}/{ref.name} port {taken[0][0].port} is already routed by "
                                          f"{owner.kind} {owner.meta.namespace}/{owner.meta.name} (older, or the same age "
                                          f"and first by namespace/name): a Service port takes HTTPRoutes or GRPCRoutes, not both")
    matches, problems, ref_conds = route_matches(route, resolver)
    grpc = route.kind == GRPC_ROUTE
    for port in ports:
        claims.setdefault((ns, ref.name, port.port, caller), route)
        if not caller:
            protocols.add((ns, ref.name, port.port, "grpc" if grpc else "http"))
        for m, tie, tr in matches:
            add_protocols(tr, protocols)
            key = (_grpc_key(m, "*") if grpc else _http_key(m)) + tie
            entries.setdefault((ns, ref.name, port.port, caller), []).append(((1 if grpc else 0, key), tr))
    accepted, resolved = route_conditions(problems, ref_conds)
    conds: tuple[Condition, ...] = (accepted or Condition(ACCEPTED, True, "Accepted", "route accepted"), resolved)
    return ParentStatus(ref, conds)
