"""The route table: what the Gateway API plan (``plan.py``) hands the Envoy translation (``translate.py``).

Plain data, no protobufs and no Kubernetes objects: everything the translation needs is resolved here
(Services looked up, ReferenceGrants checked, invalid parts replaced by what the specification says the
data plane must do, e.g. a 500 for a backend that cannot be used). The plan decides *what* is served, in
which order; the translation only spells it in Envoy's terms.

Order is meaning: ``ServedPort.chains``, ``Chain.virtual_hosts`` and ``VirtualHost.routes`` are in serving
order (Gateway API precedence already applied), and the translation keeps that order.
"""

from __future__ import annotations

import attrs

from trafficmgr.plugin import Service, ServicePort

#: Path match types (HTTPRoute ``path.type``; GRPCRoute method matches are turned into paths).
EXACT, PREFIX, REGEX = "Exact", "PathPrefix", "RegularExpression"
#: Header / query parameter match types.
MATCH_EXACT, MATCH_REGEX = "Exact", "RegularExpression"


@attrs.frozen(slots=True)
class Backend:
    """One backendRef: a Service port. ``service``/``port`` are None when it cannot be used (missing
    Service or port, not permitted by a ReferenceGrant, unsupported kind): its share of requests gets 500,
    as the specification requires. ``weight`` 0 backends are not listed at all."""

    namespace: str
    name: str
    port_number: int
    weight: int
    service: Service | None = None
    port: ServicePort | None = None


@attrs.frozen(slots=True)
class KeyMatch:
    """A header or query parameter match."""

    name: str
    value: str
    type: str = MATCH_EXACT


@attrs.frozen(slots=True)
class Match:
    """One HTTPRoute match (all conditions must hold). ``path_type``/``path`` always set (default
    ``PathPrefix`` ``/``); ``method`` None = any."""

    path_type: str = PREFIX
    path: str = "/"
    headers: tuple[KeyMatch, ...] = ()
    query: tuple[KeyMatch, ...] = ()
    method: str | None = None


@attrs.frozen(slots=True)
class HeaderChanges:
    """RequestHeaderModifier / ResponseHeaderModifier: ``set`` replaces, ``add`` appends, ``remove`` drops."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@attrs.frozen(slots=True)
class Redirect:
    """RequestRedirect. None fields keep the request's value; ``path_type`` is ``ReplaceFullPath`` or
    ``ReplacePrefixMatch`` (with ``path``), or None."""

    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    status_code: int = 302
    path_type: str | None = None
    path: str | None = None


@attrs.frozen(slots=True)
class Rewrite:
    """URLRewrite: ``hostname`` and/or path (``ReplaceFullPath`` / ``ReplacePrefixMatch``)."""

    hostname: str | None = None
    path_type: str | None = None
    path: str | None = None


@attrs.frozen(slots=True)
class Mirror:
    """RequestMirror to one backend (``percent`` of requests, default all)."""

    backend: Backend
    percent: float = 100.0


@attrs.frozen(slots=True)
class Route:
    """One Envoy route: one match of one rule of one xRoute, with the rule's filters and backends.

    Exactly one of: ``redirect`` set (no backends used), or ``backends`` (possibly empty: no usable
    backend -> 500; every weight 0 -> 500 too). ``grpc``: a GRPCRoute rule (backends spoken to over
    HTTP/2). ``timeout_ms``: HTTPRoute ``timeouts.request``; ``backend_timeout_ms``:
    ``timeouts.backendRequest`` (per try). ``source``: ``<kind>/<namespace>/<name>/rule<i>/match<j>``, for
    route names and debugging."""

    match: Match
    backends: tuple[Backend, ...] = ()
    request_headers: HeaderChanges | None = None
    response_headers: HeaderChanges | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    timeout_ms: int | None = None
    backend_timeout_ms: int | None = None
    grpc: bool = False
    source: str = ""


@attrs.frozen(slots=True)
class VirtualHost:
    """Requests for ``hostname`` (``*.example.com`` wildcard, or ``*`` for any host): its routes in
    precedence order (the first match wins). Hostnames are already the intersection of the listener's
    and the route's; an exact hostname's virtual host also carries the routes of matching wildcards that
    apply to it (Envoy picks one virtual host per request)."""

    hostname: str
    routes: tuple[Route, ...]


@attrs.frozen(slots=True)
class Certificate:
    """One more certificate of an HTTPS chain: the ``(namespace, name)`` of its Secret and its PEMs."""

    secret: tuple[str, str]
    cert_pem: bytes = attrs.field(repr=False)
    key_pem: bytes = attrs.field(repr=False)


@attrs.frozen(slots=True)
class Chain:
    """One filter chain of a port. Plain HTTP: ``server_names`` empty, ``secret`` None. HTTPS (TLS
    terminated here): ``server_names`` from the Gateway listener's hostname (empty: any SNI) and
    ``secret`` the ``(namespace, name)`` of the certificate Secret (already permitted; its PEMs in
    ``cert_pem``/``key_pem``): the listener's first usable ``certificateRef``; ``more_certificates``
    its further usable ones, in order (distinct Secrets; Envoy presents the one whose names match the
    client's SNI, and its key type, else the first). ``name`` is unique within the port."""

    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    server_names: tuple[str, ...] = ()
    secret: tuple[str, str] | None = None
    cert_pem: bytes = attrs.field(default=b"", repr=False)
    key_pem: bytes = attrs.field(default=b"", repr=False)
    more_certificates: tuple[Certificate, ...] = ()

    @property
    def certificates(self) -> tuple[Certificate, ...]:
        """Every certificate of the chain, the first (``secret``) first; empty for plain HTTP."""
        if self.secret is None:
            return ()
        return (Certificate(self.secret, self.cert_pem, self.key_pem), *self.more_certificates)


@attrs.frozen(slots=True)
class ServedPort:
    """One listening port of the gateway proxies (all Gateway listeners of our class on that port)."""

    port: int
    protocol: str  # "HTTP" or "HTTPS"
    chains: tuple[Chain, ...]


@attrs.frozen(slots=True)
class Table:
    """Everything the gateway proxies serve for Gateway API objects, by port (ascending)."""

    ports: tuple[ServedPort, ...] = ()
