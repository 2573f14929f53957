"""Gateway API route table (``table.py``) -> the gateway view's Envoy resources.

Contract: :func:`resources` spells a :class:`~trafficmgr.plugins.gateway_api.table.Table` in Envoy's terms
and decides nothing the plan did not (order, hostnames, which backends are usable): it reads the Table
alone (plus the options and the route hooks of other plugins), keeps every order it is given, and
returns the same Resource objects while the Table is unchanged.

What each part becomes:

- ``ServedPort`` -> listener ``gateway_api|<port>`` on ``--gateway-address`` (the ingress plugin's option)
  with the ingress gateway's edge settings (``ingress/edge.py``: path normalisation, underscores
  rejected, HTTP/2 and header limits, per-connection buffer) and ``strip_any_host_port``, then every
  plugin's ``trafficmgr_listener`` (listener name ``gateway_api|<port>``). HTTP: one filter chain.
  HTTPS: ``tls_inspector`` and one chain per ``Chain`` matching ``transport_protocol: tls`` and its
  ``server_names`` (none: the default certificate, any SNI), terminating TLS (ALPN h2, http/1.1) with
  the certificates over SDS (a Gateway listener's several ``certificateRefs``: one SDS config each in
  the chain's ``DownstreamTlsContext``; Envoy presents the one matching the SNI); plain text on an HTTPS port matches no chain and is closed.
- ``Chain`` -> RouteConfiguration ``gateway_api|<port>|<chain name>`` (RDS); on an SNI chain a request
  for a host outside its server names gets 421 (a catch-all virtual host, as the ingress plugin's
  ``misdirected.py``: the client retries on a connection with the right SNI).
- ``Chain.certificates`` -> SDS Secret ``gateway_api|<namespace>|<name>`` each (one per Secret, gateway view only).
- ``VirtualHost`` -> a virtual host with ``domains: [hostname]`` (exact, ``*.suffix`` (Envoy, like the
  Gateway API, matches one or more labels there) or ``*``); requests for no virtual host get 404.
- ``Route`` -> one Envoy route named after ``Route.source``, in order (Envoy takes the first match):

  * path ``Exact`` -> ``path``; ``PathPrefix`` -> ``path_separated_prefix`` (element-wise, trailing
    ``/`` ignored), ``/`` -> ``prefix: /``; ``RegularExpression`` -> ``safe_regex`` (RE2, whole path
    without the query); headers -> header matchers (``exact`` / ``safe_regex``), query parameters ->
    ``query_parameters``, method -> a ``:method`` header matcher;
  * one usable backend -> ``cluster`` (the Service port's cluster ``<port>|<ns>|<svc>.outbound``; for
    ``http`` clusters the core serves the gateway view its HTTP/1.1-upstream copy) and the backend
    Service's route policies (``ctx.apply_route_hooks``: retries, timeouts, hashing);
    several -> ``weighted_clusters`` (no route hooks: they are per Service);
  * a backend that cannot be used (``service`` None) keeps its weight in ``weighted_clusters`` under the
    cluster name ``gateway_api|invalid-backend``, which never exists, and the route answers a missing
    cluster with 500 (``cluster_not_found_response_code: INTERNAL_SERVER_ERROR``): its share of requests
    gets 500, as the specification requires; no usable backend at all (or every weight 0) ->
    ``direct_response`` 500;
  * RequestRedirect -> ``redirect`` (scheme, host, port, ``path_redirect`` / prefix replacement,
    301/302/303/307/308). The port follows the specification: the given port, else the scheme's
    well-known port when a scheme is given, else the listener's port; it is left out of ``Location``
    when it is the scheme's well-known port (80/443; the request's own port is already stripped);
  * URLRewrite -> ``host_rewrite_literal``; ReplaceFullPath -> ``regex_rewrite`` ``^/.*$``;
    ReplacePrefixMatch -> ``prefix_rewrite``, or ``regex_rewrite`` where Envoy's plain prefix swap
    would give ``//`` or join path elements (replacement ``/``, or matched prefix ``/``);
  * Request/ResponseHeaderModifier -> ``request``/``response_headers_to_add`` (``set``:
    ``OVERWRITE_IF_EXISTS_OR_ADD``, ``add``: ``APPEND_IF_EXISTS_OR_ADD``) and ``..._to_remove``. Envoy
    refuses to modify ``host`` and ``:``-prefixed headers: ``set``/``add`` of ``host`` becomes the host
    rewrite, the rest is dropped (logged);
  * RequestMirror -> ``request_mirror_policies`` (``runtime_fraction`` for a percentage; the mirrored
    request keeps its ``Host``: ``disable_shadow_host_suffix_append``); mirrors to unusable backends are
    left out;
  * timeouts: no route timeout by default (as every trafficmgr route: Envoy's 15 s would cut streams);
    ``timeouts.request`` -> ``timeout`` (and ``max_stream_duration`` where the route has one, i.e. gRPC),
    ``timeouts.backendRequest`` -> ``retry_policy.per_try_timeout``. Set after the route hooks: the
    route's own value wins over a Service label's (``traffic.timeout.request``), which still applies to
    routes that set none;
  * GRPCRoute (``grpc``): the route honours the client's ``grpc-timeout`` (as the core's grpc routes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

import attrs
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2

from trafficmgr.plugin import (
    GRPC,
    HCM_FILTER,
    HTTP,
    Resource,
    Service,
    ServicePort,
    ads_config_source,
    duration_ms,
    pack,
    percent_fraction,
    socket_address,
)
from trafficmgr.plugin import ROUTE as RDS
from trafficmgr.plugin import SECRET as SDS
from trafficmgr.plugins.gateway_api.table import (
    EXACT,
    MATCH_REGEX,
    PREFIX,
    REGEX,
    Backend,
    Certificate,
    Chain,
    HeaderChanges,
    KeyMatch,
    Match,
    Redirect,
    Rewrite,
    Route,
    ServedPort,
    Table,
    VirtualHost,
)
from trafficmgr.plugins.ingress import edge
from trafficmgr.plugins.ingress.ir import option

if TYPE_CHECKING:
    from trafficmgr.plugin import BuildContext

log = logging.getLogger(__name__)

PREFIX_NAME = "gateway_api"
#: The weighted-cluster name of an unusable backend's share: never a cluster (cluster names are
#: ``<port>|<ns>|<svc>.outbound``), so Envoy answers it with the route's cluster-not-found code, 500.
INVALID_CLUSTER = f"{PREFIX_NAME}|invalid-backend"
INVALID_STATUS = 500
MISDIRECTED = 421
MISDIRECTED_NAME = f"{PREFIX_NAME}|misdirected"
MISDIRECTED_BODY = "trafficmgr: misdirected request: this host is not served by the TLS certificate of this connection\n"
ALPN = ("h2", "http/1.1")
REPLACE_FULL_PATH, REPLACE_PREFIX_MATCH = "ReplaceFullPath", "ReplacePrefixMatch"
WELL_KNOWN_PORTS = {"http": 80, "https": 443}
REDIRECT_CODES = {
    301: route_components_pb2.RedirectAction.MOVED_PERMANENTLY,
    302: route_components_pb2.RedirectAction.FOUND,
    303: route_components_pb2.RedirectAction.SEE_OTHER,
    307: route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
    308: route_components_pb2.RedirectAction.PERMANENT_REDIRECT,
}
#: RFC 9110 token: what Envoy accepts as a header name.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SET = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_ADD = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
MEMO_KEY = "gateway_api.translate"


def listener_name(port: int) -> str:
    return f"{PREFIX_NAME}|{port}"


def route_config_name(port: int, chain: str) -> str:
    return f"{PREFIX_NAME}|{port}|{chain}"


def secret_name(namespace: str, name: str) -> str:
    return f"{PREFIX_NAME}|{namespace}|{name}"


@attrs.define
class _Memo:
    """What the last build made, per Envoy resource (the gateway view's ``ctx.memo``): each keyed by what
    it is made of, so a change rebuilds and re-serializes only the resources it touches."""

    table: Table | None = None
    out: list[Resource] = attrs.field(factory=list)
    #: (port, protocol, chain name, hostname) -> (virtual host, its message)
    vhosts: dict[tuple[int, str, str, str], tuple[VirtualHost, route_components_pb2.VirtualHost]] = attrs.field(factory=dict)
    #: (port, chain name) -> (protocol, chain, RouteConfiguration resource)
    rcs: dict[tuple[int, str], tuple[str, Chain, Resource]] = attrs.field(factory=dict)
    #: port -> (what the listener is made of, Listener resource)
    listeners: dict[int, tuple[Any, Resource]] = attrs.field(factory=dict)
    #: Secret resource name -> (certificate, key, Secret resource)
    secrets: dict[str, tuple[bytes, bytes, Resource]] = attrs.field(factory=dict)


def resources(table: Table, ctx: BuildContext) -> list[Resource]:
    """Listeners, RouteConfigurations and Secrets of ``table`` for the gateway view, each through
    ``ctx.resource`` (the listener refs its RDS and SDS names). Memoized on the Table's value (an equal
    Table returns the same list without building anything) and per resource: a listener is rebuilt only
    when its port's protocol, chains' names, server names or certificate Secrets change, a route
    configuration when its chain changes (and then only its changed virtual hosts are translated again),
    a Secret when its PEMs change. Raises ValueError for a Table that breaks ``table.py``'s structural
    contract (which Envoy would reject as a whole)."""
    memo = ctx.memo.get(MEMO_KEY)
    if not isinstance(memo, _Memo):
        memo = ctx.memo[MEMO_KEY] = _Memo()
    if memo.table is not None and (memo.table is table or memo.table == table):
        return memo.out
    out: list[Resource] = []
    secrets: dict[str, Resource] = {}
    seen_ports: set[int] = set()
    for sp in table.ports:  # all checked before anything is built
        if sp.port in seen_ports:
            raise ValueError(f"gateway_api table: port {sp.port} listed twice")
        seen_ports.add(sp.port)
        _check_port(sp)
    live_vhosts: set[tuple[int, str, str, str]] = set()
    live_rcs: set[tuple[int, str]] = set()
    for sp in table.ports:
        rcs = []
        for chain in sp.chains:
            key = (sp.port, chain.name)
            live_rcs.add(key)
            live_vhosts.update((sp.port, sp.protocol, chain.name, vh.hostname) for vh in chain.virtual_hosts)
            old = memo.rcs.get(key)
            if old is not None and old[0] == sp.protocol and (old[1] is chain or old[1] == chain):
                rcs.append(old[2])
                continue
            rc = route_configuration(sp, chain, ctx, memo)
            res = ctx.resource(rc, rc.name)
            memo.rcs[key] = (sp.protocol, chain, res)
            rcs.append(res)
        refs = [(RDS, rc.name) for rc in rcs]
        for chain in sp.chains:
            for cert in chain.certificates if sp.protocol == "HTTPS" else ():
                name = secret_name(*cert.secret)
                refs.append((SDS, name))
                if name in secrets:
                    continue
                old_secret = memo.secrets.get(name)
                if old_secret is not None and old_secret[0] == cert.cert_pem and old_secret[1] == cert.key_pem:
                    secrets[name] = old_secret[2]
                else:
                    secrets[name] = ctx.resource(secret(cert), name)
                    memo.secrets[name] = (cert.cert_pem, cert.key_pem, secrets[name])
        shape = (sp.protocol, tuple((c.name, c.server_names, tuple(x.secret for x in c.certificates)) for c in sp.chains))
        old_listener = memo.listeners.get(sp.port)
        if old_listener is not None and old_listener[0] == shape:
            out.append(old_listener[1])
        else:
            lst = listener(sp, ctx)
            res = ctx.resource(lst, lst.name, refs)
            memo.listeners[sp.port] = (shape, res)
            out.append(res)
        out.extend(rcs)
    out.extend(secrets[n] for n in sorted(secrets))
    _prune(memo.vhosts, live_vhosts)
    _prune(memo.rcs, live_rcs)
    _prune(memo.listeners, seen_ports)
    _prune(memo.secrets, secrets.keys())
    memo.table, memo.out = table, out
    return out


def _prune(mapping: dict[Any, Any], live: Collection[Any]) -> None:
    for k in [k for k in mapping if k not in live]:
        del mapping[k]


def _check_port(sp: ServedPort) -> None:
    where = f"gateway_api table: port {sp.port}"
    if sp.protocol not in ("HTTP", "HTTPS"):
        raise ValueError(f"{where}: protocol {sp.protocol!r} (HTTP or HTTPS)")
    if not sp.chains:
        raise ValueError(f"{where}: no chains")
    if sp.protocol == "HTTP" and len(sp.chains) != 1:
        raise ValueError(f"{where}: an HTTP port has exactly one chain, not {len(sp.chains)}")
    names: set[str] = set()
    server_names: set[str] = set()  # "" = the default chain (no server names)
    for chain in sp.chains:
        if chain.name in names:
            raise ValueError(f"{where}: chain name {chain.name!r} used twice")
        names.add(chain.name)
        if sp.protocol == "HTTPS":
            if chain.secret is None or not chain.cert_pem or not chain.key_pem:
                raise ValueError(f"{where}: HTTPS chain {chain.name!r} has no certificate Secret")
            chain_secrets = [c.secret for c in chain.certificates]
            if len(set(chain_secrets)) != len(chain_secrets) or any(not c.cert_pem or not c.key_pem for c in chain.certificates):
                raise ValueError(f"{where}: HTTPS chain {chain.name!r} lists a certificate Secret twice or one without PEMs")
            # Envoy refuses a listener where two chains match the same server name (or both none).
            for sni in {n.lower() for n in chain.server_names} or {""}:
                if sni in server_names:
                    raise ValueError(f"{where}: two HTTPS chains serve the same server name {sni or '(default certificate)'!r}")
                server_names.add(sni)
        domains: set[str] = set()
        for vh in chain.virtual_hosts:
            d = vh.hostname.lower()
            if d in domains:
                raise ValueError(f"{where}: chain {chain.name!r} lists virtual host {vh.hostname!r} twice")
            domains.add(d)


# -- listener --------------------------------------------------------------------------------------


def listener(sp: ServedPort, ctx: BuildContext) -> listener_pb2.Listener:
    """The listener of one served port.

    Why a listener on a user-chosen port is safe: the port comes from a Gateway listener of *our*
    GatewayClass (the cluster operator decides who may create those), is bound only by the gateway
    proxies (node cluster ``traffic-ingress``, which the chart exposes deliberately), on
    ``--gateway-address``; the plan refuses the Ingress listener's port (``--gateway-port``). Its
    connection managers carry the same edge hardening as the Ingress listener (the clients are
    untrusted) and serve only the routes attached to that Gateway listener.
    """
    name = listener_name(sp.port)
    lst = listener_pb2.Listener(name=name, stat_prefix=f"{PREFIX_NAME}_{sp.port}")
    lst.address.CopyFrom(socket_address(str(option(ctx.options, "gateway_address")), sp.port))
    edge.harden_listener(lst)
    https = sp.protocol == "HTTPS"
    if https:
        lst.listener_filters.add(name="envoy.filters.listener.tls_inspector", typed_config=pack(tls_inspector_pb2.TlsInspector()))
    for chain in sp.chains:
        hcm = ctx.http_connection_manager(f"{PREFIX_NAME}_{sp.port}", route_config_name(sp.port, chain.name), name)
        hcm.strip_any_host_port = True
        edge.harden_hcm(hcm, ctx.options)
        fc = lst.filter_chains.add(name=chain.name)
        fc.filters.add(name=HCM_FILTER, typed_config=pack(hcm))
        if not https:
            continue
        fc.filter_chain_match.transport_protocol = "tls"
        fc.filter_chain_match.server_names.extend(chain.server_names)
        assert chain.secret is not None  # _check_port
        tls = tls_pb2.DownstreamTlsContext()
        tls.common_tls_context.alpn_protocols.extend(ALPN)
        # Several certificates (a Gateway listener's certificateRefs): Envoy presents the one whose
        # SAN matches the SNI (and whose key type the client takes), else the first.
        for cert in chain.certificates:
            sds = tls.common_tls_context.tls_certificate_sds_secret_configs.add(name=secret_name(*cert.secret))
            sds.sds_config.CopyFrom(ads_config_source())
        fc.transport_socket.name = "envoy.transport_sockets.tls"
        fc.transport_socket.typed_config.CopyFrom(pack(tls))
    ctx.apply_listener_hooks(lst, name)
    return lst


def secret(cert: Certificate | Chain) -> secret_pb2.Secret:
    """The SDS Secret of one certificate of an HTTPS chain (a Chain: its first) (gateway view only: the
    core drops Secrets any other view is given)."""
    if isinstance(cert, Chain):
        cert = cert.certificates[0]
    msg = secret_pb2.Secret(name=secret_name(*cert.secret))
    msg.tls_certificate.certificate_chain.inline_bytes = cert.cert_pem
    msg.tls_certificate.private_key.inline_bytes = cert.key_pem
    return msg


# -- routes ----------------------------------------------------------------------------------------


def route_configuration(sp: ServedPort, chain: Chain, ctx: BuildContext, memo: _Memo | None = None) -> route_pb2.RouteConfiguration:
    """The chain's RouteConfiguration; with ``memo``, a virtual host equal to the last build's is not
    translated again (its message is copied in)."""
    rc = route_pb2.RouteConfiguration(name=route_config_name(sp.port, chain.name))
    rc.validate_clusters.value = False
    for vh in chain.virtual_hosts:
        if memo is None:
            rc.virtual_hosts.append(virtual_host(sp, vh, ctx))
            continue
        key = (sp.port, sp.protocol, chain.name, vh.hostname)
        old = memo.vhosts.get(key)
        if old is None or not (old[0] is vh or old[0] == vh):
            old = memo.vhosts[key] = (vh, virtual_host(sp, vh, ctx))
        rc.virtual_hosts.append(old[1])
    if sp.protocol == "HTTPS" and chain.server_names and not any(vh.hostname == "*" for vh in chain.virtual_hosts):
        # Named with a "|" that no hostname has (virtual host names are unique in a route table).
        catch_all = rc.virtual_hosts.add(name=MISDIRECTED_NAME, domains=["*"])
        r = catch_all.routes.add(name=MISDIRECTED_NAME)
        r.match.prefix = "/"
        r.direct_response.status = MISDIRECTED
        r.direct_response.body.inline_string = MISDIRECTED_BODY
    return rc


def virtual_host(sp: ServedPort, vh: VirtualHost, ctx: BuildContext) -> route_components_pb2.VirtualHost:
    out = route_components_pb2.VirtualHost(name=vh.hostname, domains=[vh.hostname])
    out.routes.extend(routes(sp, vh.routes, ctx))
    return out


def routes(sp: ServedPort, table_routes: Iterable[Route], ctx: BuildContext,
           policy: tuple[Service, ServicePort] | None = None) -> list[route_components_pb2.Route]:
    """The Envoy routes of ``table_routes`` in order (gateway virtual hosts and sidecar mesh routes);
    ``policy``: whose route policies apply to weighted routes (see :func:`route`)."""
    out: list[route_components_pb2.Route] = []
    for r in table_routes:
        try:
            out.append(route(sp, r, ctx, policy))
        except ValueError as exc:
            # A route the plan should have refused: it alone answers 500 (or, when even its match
            # cannot be spelled, is left out); the other routes are served.
            log.error("gateway_api: route %s cannot be translated: %s", r.source, exc)
            broken = route_components_pb2.Route(name=r.source)
            try:
                _match(broken.match, r.match)
            except ValueError:
                continue
            broken.direct_response.status = INVALID_STATUS
            broken.direct_response.body.inline_string = f"trafficmgr: route {r.source or ''} cannot be served: {exc}\n"
            out.append(broken)
    return out


def route(sp: ServedPort, r: Route, ctx: BuildContext, policy: tuple[Service, ServicePort] | None = None) -> route_components_pb2.Route:
    """One Table route (see the module docstring). Route policies (``ctx.apply_route_hooks``): a single
    backend's; a weighted route gets ``policy``'s (the mesh parent Service), else none."""
    out = route_components_pb2.Route(name=r.source)
    _match(out.match, r.match)
    host_rewrite = r.rewrite.hostname if r.rewrite is not None else None
    if r.request_headers is not None:
        host_rewrite = _headers(out.request_headers_to_add, out.request_headers_to_remove, r.request_headers, r.source, True) or host_rewrite
    if r.response_headers is not None:
        _headers(out.response_headers_to_add, out.response_headers_to_remove, r.response_headers, r.source, False)
    if r.redirect is not None:
        _redirect(out.redirect, r.redirect, r.match, sp)
        return out
    used = [b for b in r.backends if b.weight > 0]
    usable = [b for b in used if b.service is not None and b.port is not None]
    if not usable:
        out.direct_response.status = INVALID_STATUS
        out.direct_response.body.inline_string = f"trafficmgr: no usable backend for {r.source or 'this route'}\n"
        return out
    action = out.route
    # No route timeout unless one is set (as the core's routes): Envoy's 15 s would end streams.
    action.timeout.FromSeconds(0)
    if r.grpc:
        action.max_stream_duration.grpc_timeout_header_max.FromSeconds(0)
    if len(used) == 1:
        svc, port = effective(used[0], r.grpc)
        action.cluster = svc.cluster_name(port)
        ctx.apply_route_hooks(out, svc, port)
    else:
        for b in used:
            w = action.weighted_clusters.clusters.add(name=_cluster(b))
            w.weight.value = b.weight
        if len(usable) < len(used):
            action.cluster_not_found_response_code = route_components_pb2.RouteAction.INTERNAL_SERVER_ERROR
        if policy is not None:
            ctx.apply_route_hooks(out, *policy)
    if host_rewrite:
        action.host_rewrite_literal = host_rewrite
    if r.rewrite is not None and r.rewrite.path_type is not None:
        _path_rewrite(action, r.rewrite, r.match)
    for m in r.mirrors:
        if m.backend.service is None or m.backend.port is None:
            continue
        mirror = action.request_mirror_policies.add(cluster=_cluster(m.backend))
        mirror.disable_shadow_host_suffix_append = True
        if m.percent < 100:
            mirror.runtime_fraction.default_value.CopyFrom(percent_fraction(max(m.percent, 0.0)))
    _timeouts(action, r)
    return out


def effective(b: Backend, grpc: bool) -> tuple[Service, ServicePort]:
    """The backend's Service and port as the core serves them: an unlabelled port gets the protocol the
    plugin implies for it (``grpc`` for GRPCRoute backends, ``http`` otherwise), so route hooks see
    the port as its cluster is built."""
    assert b.service is not None and b.port is not None
    port = b.port
    if port.protocol is not None:
        return b.service, port
    implied = attrs.evolve(port, protocol=GRPC if grpc else HTTP)
    ports = tuple(implied if p == port else p for p in b.service.ports)
    return attrs.evolve(b.service, ports=ports), implied


def _cluster(b: Backend) -> str:
    if b.service is None or b.port is None:
        return INVALID_CLUSTER
    return b.service.cluster_name(b.port)


def _timeouts(action: route_components_pb2.RouteAction, r: Route) -> None:
    if r.timeout_ms is not None:
        action.timeout.CopyFrom(duration_ms(r.timeout_ms))
        if action.HasField("max_stream_duration"):
            action.max_stream_duration.max_stream_duration.CopyFrom(duration_ms(r.timeout_ms))
            action.max_stream_duration.grpc_timeout_header_max.CopyFrom(duration_ms(r.timeout_ms))
    if r.backend_timeout_ms is not None:
        action.retry_policy.per_try_timeout.CopyFrom(duration_ms(r.backend_timeout_ms))


# -- matches ---------------------------------------------------------------------------------------


def _prefix(path: str) -> str:
    """A PathPrefix value without its trailing slashes (``/`` stays ``/``)."""
    return path.rstrip("/") or "/"


def _match(out: route_components_pb2.RouteMatch, m: Match) -> None:
    if m.path_type == EXACT:
        out.path = m.path
    elif m.path_type == PREFIX:
        p = _prefix(m.path)
        if p == "/":
            out.prefix = "/"
        else:
            out.path_separated_prefix = p
    elif m.path_type == REGEX:
        out.safe_regex.regex = m.path
    else:
        raise ValueError(f"gateway_api table: unknown path match type {m.path_type!r}")
    for h in m.headers:
        hm = out.headers.add(name=h.name.lower())
        _string_match(hm.string_match, h)
    for q in m.query:
        qm = out.query_parameters.add(name=q.name)
        _string_match(qm.string_match, q)
    if m.method:
        out.headers.add(name=":method").string_match.exact = m.method


def _string_match(out: Any, k: KeyMatch) -> None:
    if k.type == MATCH_REGEX:
        out.safe_regex.regex = k.value
    else:
        out.exact = k.value


# -- filters ---------------------------------------------------------------------------------------


def _headers(add: Any, remove: Any, changes: HeaderChanges, source: str, request: bool) -> str | None:
    """Fill ``*_headers_to_add`` / ``*_headers_to_remove``; returns a ``host`` value set on the request
    (Envoy modifies Host only through a host rewrite)."""
    host: str | None = None
    for items, action in ((changes.set, _SET), (changes.add, _ADD)):
        for name, value in items:
            low = name.lower()
            if request and low == "host":
                host = value
                continue
            if not _modifiable(low, value, source):
                continue
            h = add.add(append_action=action)
            h.header.key = low
            h.header.value = value
    for name in changes.remove:
        if _modifiable(name.lower(), "", source):
            remove.append(name.lower())
    return host


def _modifiable(name: str, value: str, source: str) -> bool:
    """Whether Envoy accepts modifying header ``name`` (else it would reject the whole route table)."""
    if name == "host" or name.startswith(":") or not _HEADER_NAME.match(name) or any(c in value for c in "\r\n\0"):
        log.error("gateway_api: %s: header %r cannot be modified (Envoy refuses it); modification dropped", source, name)
        return False
    return True


def _prefix_replacement(match: Match, replacement: str) -> tuple[str, str, str]:
    """How to replace the matched prefix with ``replacement`` (Gateway API ReplacePrefixMatch, whose
    table in the specification this follows: trailing slashes of both are ignored, an empty result is
    ``/``): ``("prefix", value, "")`` for Envoy's plain prefix swap where it gives exactly that, else
    ``("regex", pattern, substitution)``."""
    if match.path_type not in (PREFIX, EXACT):
        raise ValueError(f"ReplacePrefixMatch needs a PathPrefix match, not {match.path_type}")
    matched = _prefix(match.path).rstrip("/")  # "" for "/"
    repl = replacement.rstrip("/")
    if matched and repl:
        return ("prefix", repl, "")
    if not repl:  # "/foo" + "/bar" -> "/bar", "/foo" -> "/"
        return ("regex", "^" + re.escape(matched) + "/*", "/")
    return ("regex", "^/", repl + "/")  # matched "/": "/bar" -> "<repl>/bar"


def _replace_path(out: Any, path_type: str | None, path: str | None, match: Match, what: str, full: Callable[[str], None]) -> None:
    """The path part of a URLRewrite or RequestRedirect (``out``: a RouteAction or RedirectAction, which
    both have ``prefix_rewrite`` and ``regex_rewrite``); ``full`` sets a ReplaceFullPath."""
    if path is None:
        raise ValueError(f"{what} {path_type} without a path")
    if path_type == REPLACE_FULL_PATH:
        full(path)
    elif path_type == REPLACE_PREFIX_MATCH:
        kind, value, sub = _prefix_replacement(match, path)
        if kind == "prefix":
            out.prefix_rewrite = value
        else:
            out.regex_rewrite.pattern.regex = value
            out.regex_rewrite.substitution = sub
    else:
        raise ValueError(f"unknown {what} path type {path_type!r}")


def _path_rewrite(action: route_components_pb2.RouteAction, rw: Rewrite, match: Match) -> None:
    def full(path: str) -> None:
        action.regex_rewrite.pattern.regex = "^/.*$"
        action.regex_rewrite.substitution = path

    _replace_path(action, rw.path_type, rw.path, match, "URLRewrite", full)


def _redirect(out: route_components_pb2.RedirectAction, rd: Redirect, match: Match, sp: ServedPort) -> None:
    if rd.scheme:
        out.scheme_redirect = rd.scheme.lower()
    if rd.hostname:
        out.host_redirect = rd.hostname
    scheme = (rd.scheme or ("https" if sp.protocol == "HTTPS" else "http")).lower()
    port = rd.port
    if port is None:
        port = WELL_KNOWN_PORTS.get(scheme, sp.port) if rd.scheme else sp.port
    if port != WELL_KNOWN_PORTS.get(scheme):
        out.port_redirect = port
    code = REDIRECT_CODES.get(rd.status_code)
    if code is None:
        raise ValueError(f"redirect status code {rd.status_code} (301, 302, 303, 307 or 308)")
    out.response_code = code
    if rd.path_type is not None:
        _replace_path(out, rd.path_type, rd.path, match, "RequestRedirect", lambda path: setattr(out, "path_redirect", path))
