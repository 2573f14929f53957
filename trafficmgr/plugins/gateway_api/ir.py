"""The Gateway API IR: raw ``gateway.networking.k8s.io`` objects (and the Secrets and Namespaces they need)
as frozen attrs classes.

The ``convert_*`` functions are the only ones that read raw Kubernetes dicts. They never raise on a bad
object: a missing optional field gets its specified default, a field of the wrong type or an invalid value
is dropped and described in ``problems`` (the plan turns those into status conditions), so one bad
object never hides the others.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

import attrs

from trafficmgr.plugin import ObjectRef, tls_pem_error

GROUP = "gateway.networking.k8s.io"
API_V1 = f"{GROUP}/v1"
API_V1BETA1 = f"{GROUP}/v1beta1"

# Kind keys in ``model.extra`` (the Secret and Namespace watches are this plugin's own, under their own keys).
GATEWAY_CLASS = "GatewayClass"
GATEWAY = "Gateway"
HTTP_ROUTE = "HTTPRoute"
GRPC_ROUTE = "GRPCRoute"
REFERENCE_GRANT = "ReferenceGrant"
SECRET = "GatewayAPISecret"
NAMESPACE = "GatewayAPINamespace"
TLS_TYPE = "kubernetes.io/tls"
ROUTE_KINDS = (HTTP_ROUTE, GRPC_ROUTE)

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
#: A Gateway API hostname: RFC 1123 with an optional leading ``*.`` label (no IPs, no trailing dot).
HOSTNAME_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_IPV4_RE = re.compile(r"^[0-9.]+$")
#: A path Envoy takes in every match type (no query, fragment, whitespace or control characters).
PATH_RE = re.compile(r"^/[^\s?#\x00-\x1f\x7f]*$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
# Header and query values may not carry control characters (Envoy would reject them).
VALUE_RE = re.compile(r"^[^\x00-\x08\x0a-\x1f\x7f]*$")
DURATION_RE = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
GRPC_SERVICE_RE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
GRPC_METHOD_RE = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
# Regex constructs RE2 (Envoy's engine) does not have: lookaround and back-references.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\\[1-9]")


def valid_hostname(host: str) -> bool:
    return bool(HOSTNAME_RE.match(host)) and not _IPV4_RE.match(host) and len(host) <= 253


try:  # RE2 itself (google-re2), when installed: the exact syntax and program size Envoy checks
    import re2 as _re2  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    _re2 = None

#: Envoy rejects a regex whose RE2 program is larger than this (``re2.max_program_size.error_level``),
#: and with it the whole RouteConfiguration: checked here so one route cannot break the others.
RE2_MAX_PROGRAM_SIZE = 100
#: Without google-re2: a length limit standing in for the program size (a program has at least one
#: instruction per literal character).
REGEX_MAX_LENGTH = 80


def valid_regex(pattern: str) -> str:
    """Why ``pattern`` is not a regular expression Envoy (RE2) takes ("" when it is)."""
    if _NOT_RE2.search(pattern):
        return "lookaround and back-references are not supported (RE2 syntax)"
    if _re2 is not None:
        try:
            size = _re2.compile(pattern).programsize
        except Exception as exc:  # noqa: BLE001 - re2.error, or anything the binding raises for bad input
            return f"invalid regular expression (RE2): {exc}"
        if size > RE2_MAX_PROGRAM_SIZE:
            return f"regular expression too complex for Envoy (RE2 program size {size} > {RE2_MAX_PROGRAM_SIZE})"
        return ""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression: {exc}"
    if len(pattern) > REGEX_MAX_LENGTH:
        return f"regular expression longer than {REGEX_MAX_LENGTH} characters"
    counts = [int(n) for pair in re.findall(r"\{(\d+)(?:,(\d*))?\}", pattern) for n in pair if n]
    if len(re.findall(r"\{\d", pattern)) > 1 or any(n > 10 for n in counts):
        return "counted repetitions above 10 or more than one are refused (RE2 expands them; install google-re2 to check exactly)"
    return ""


def parse_duration_ms(text: str) -> int | None:
    """A Gateway API Duration (``1h``, ``10s``, ``500ms``, ``1m30s``) in milliseconds; None if invalid."""
    if not isinstance(text, str) or not DURATION_RE.match(text):
        return None
    units = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|h|m|s)", text))


# -- shared pieces ----------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Meta:
    """What every object carries: identity, version, generation, age."""

    namespace: str
    name: str
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    created: str = ""


def _meta(raw: Mapping[str, Any], namespaced: bool = True) -> Meta:
    md = raw.get("metadata") if isinstance(raw.get("metadata"), Mapping) else {}
    assert isinstance(md, Mapping)
    gen = md.get("generation")
    return Meta(
        namespace=(str(md.get("namespace") or "default") if namespaced else ""), name=str(md.get("name") or ""),
        uid=str(md.get("uid") or ""), resource_version=str(md.get("resourceVersion") or ""),
        generation=gen if isinstance(gen, int) and not isinstance(gen, bool) else 0,
        created=str(md.get("creationTimestamp") or ""),
    )


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _status_list(raw: Mapping[str, Any], key: str) -> tuple[Mapping[str, Any], ...]:
    return tuple(x for x in _list(_dict(raw.get("status")).get(key)) if isinstance(x, Mapping))


# -- GatewayClass -----------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class GatewayClass:
    meta: Meta
    controller: str = ""
    has_parameters: bool = False
    conditions: tuple[Mapping[str, Any], ...] = attrs.field(default=(), eq=False, repr=False)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(GATEWAY_CLASS, "", self.meta.name, self.meta.uid, self.meta.resource_version)


def convert_class(raw: dict[str, Any], ctx: Any) -> GatewayClass:
    spec = _dict(raw.get("spec"))
    return GatewayClass(_meta(raw, namespaced=False), _str(spec.get("controllerName")), spec.get("parametersRef") is not None,
                        _status_list(raw, "conditions"))


# -- Gateway ----------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class ObjectReference:
    """A certificateRef (group ``""``, kind ``Secret`` by default) or any other typed reference."""

    group: str
    kind: str
    name: str
    namespace: str | None = None  # None: the referrer's namespace


@attrs.frozen(slots=True)
class LabelSelector:
    """``matchLabels`` and ``matchExpressions`` (``(key, operator, values)``)."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for key, op, values in self.expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True


def _selector(raw: Any) -> tuple[LabelSelector | None, str]:
    raw = _dict(raw)
    labels = _dict(raw.get("matchLabels"))
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return None, "matchLabels must map strings to strings"
    exprs = []
    for e in _list(raw.get("matchExpressions")):
        e = _dict(e)
        op = _str(e.get("operator"))
        values = tuple(v for v in _list(e.get("values")) if isinstance(v, str))
        if op not in ("In", "NotIn", "Exists", "DoesNotExist") or not _str(e.get("key")):
            return None, f"matchExpressions: unknown operator {op!r} or missing key"
        exprs.append((_str(e.get("key")), op, values))
    return LabelSelector(tuple(sorted(labels.items())), tuple(exprs)), ""


@attrs.frozen(slots=True)
class Listener:
    """One Gateway listener. ``port`` None: missing or invalid. ``allowed_from`` is ``Same``, ``All`` or
    ``Selector``; ``kinds`` None = the protocol's default kinds, else ``(group, kind)`` as written.
    ``problems``: invalid values (the listener is not accepted, reason ``UnsupportedValue``)."""

    name: str
    port: int | None
    protocol: str
    hostname: str | None = None
    tls_mode: str | None = None
    certificate_refs: tuple[ObjectReference, ...] = ()
    allowed_from: str = "Same"
    selector: LabelSelector | None = None
    kinds: tuple[tuple[str, str], ...] | None = None
    problems: tuple[str, ...] = ()


def _listener(raw: Mapping[str, Any], index: int) -> Listener:
    problems: list[str] = []
    name = _str(raw.get("name")) or f"listener-{index}"
    port = _int(raw.get("port"))
    if port is None or not 1 <= port <= 65535:
        problems.append(f"port {raw.get('port')!r} is not a port number (1-65535)")
        port = None
    hostname = raw.get("hostname")
    if hostname is not None:
        if not isinstance(hostname, str) or not valid_hostname(hostname.lower()):
            problems.append(f"hostname {hostname!r} is not a valid DNS name or wildcard")
            hostname = None
        else:
            hostname = hostname.lower()
    tls = _dict(raw.get("tls"))
    refs = []
    for r in _list(tls.get("certificateRefs")):
        r = _dict(r)
        ns = r.get("namespace")
        refs.append(ObjectReference(_str(r.get("group")), _str(r.get("kind"), "Secret"), _str(r.get("name")),
                                    ns if isinstance(ns, str) and ns else None))
    allowed = _dict(raw.get("allowedRoutes"))
    namespaces = _dict(allowed.get("namespaces"))
    allowed_from = _str(namespaces.get("from"), "Same")
    selector = None
    if allowed_from not in ("Same", "All", "Selector"):
        problems.append(f"allowedRoutes.namespaces.from {allowed_from!r} is not Same, All or Selector")
    elif allowed_from == "Selector":
        selector, why = _selector(namespaces.get("selector"))
        if selector is None:
            problems.append(f"allowedRoutes.namespaces.selector: {why}")
    kinds: tuple[tuple[str, str], ...] | None = None
    if allowed.get("kinds") is not None:
        kinds = tuple((_str(_dict(k).get("group"), GROUP), _str(_dict(k).get("kind"))) for k in _list(allowed.get("kinds")))
    return Listener(name, port, _str(raw.get("protocol")), hostname, _str(tls.get("mode"), "Terminate") if tls else None,
                    tuple(refs), allowed_from, selector, kinds, tuple(problems))


@attrs.frozen(slots=True)
class Gateway:
    """A Gateway. ``requested_addresses``: ``spec.addresses`` (not supported: the addresses are the
    gateway Service's). ``status`` keeps the current conditions, listener statuses and addresses, to write
    only what changes."""

    meta: Meta
    class_name: str
    listeners: tuple[Listener, ...] = ()
    requested_addresses: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    conditions: tuple[Mapping[str, Any], ...] = attrs.field(default=(), eq=False, repr=False)
    listener_status: tuple[Mapping[str, Any], ...] = attrs.field(default=(), eq=False, repr=False)
    addresses: tuple[Mapping[str, Any], ...] = attrs.field(default=(), eq=False, repr=False)

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(GATEWAY, self.meta.namespace, self.meta.name, self.meta.uid, self.meta.resource_version)


def convert_gateway(raw: dict[str, Any], ctx: Any) -> Gateway:
    spec = _dict(raw.get("spec"))
    problems = []
    listeners = []
    names: set[str] = set()
    for i, item in enumerate(_list(spec.get("listeners"))):
        if not isinstance(item, Mapping):
            problems.append(f"listeners[{i}] is not an object")
            continue
        lst = _listener(item, i)
        if lst.name in names:
            problems.append(f"listener name {lst.name!r} is used twice; the second is ignored")
            continue
        names.add(lst.name)
        listeners.append(lst)
    addresses = tuple(_str(_dict(a).get("value")) for a in _list(spec.get("addresses")))
    return Gateway(_meta(raw), _str(spec.get("gatewayClassName")), tuple(listeners), addresses, tuple(problems),
                   _status_list(raw, "conditions"), _status_list(raw, "listeners"), _status_list(raw, "addresses"))


# -- routes -----------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class ParentRef:
    """A route's parentRef. ``namespace`` None = the route's; ``port`` None = any."""

    group: str
    kind: str
    name: str
    namespace: str | None = None
    section_name: str | None = None
    port: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The parentRef as written back into ``status.parents[].parentRef``."""
        out: dict[str, Any] = {"group": self.group, "kind": self.kind, "name": self.name}
        if self.namespace is not None:
            out["namespace"] = self.namespace
        if self.section_name is not None:
            out["sectionName"] = self.section_name
        if self.port is not None:
            out["port"] = self.port
        return out


@attrs.frozen(slots=True)
class BackendRef:
    """A backendRef (also a RequestMirror's). ``port`` None: missing. ``unsupported``: what of it we do
    not implement (e.g. backendRef-level filters)."""

    group: str
    kind: str
    name: str
    namespace: str | None = None
    port: int | None = None
    weight: int = 1
    unsupported: str = ""


@attrs.frozen(slots=True)
class KeyMatch:
    name: str
    value: str
    type: str = "Exact"


@attrs.frozen(slots=True)
class RouteMatch:
    """One HTTPRoute match, or a GRPCRoute match already turned into a path (``grpc_service`` and
    ``grpc_method`` kept for GRPCRoute precedence)."""

    path_type: str = "PathPrefix"
    path: str = "/"
    headers: tuple[KeyMatch, ...] = ()
    query: tuple[KeyMatch, ...] = ()
    method: str | None = None
    grpc_service: str = ""
    grpc_method: str = ""


@attrs.frozen(slots=True)
class Filter:
    """One filter, as written: ``type`` and its (plain) configuration; validated in the plan."""

    type: str
    config: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    mirror: BackendRef | None = None


@attrs.frozen(slots=True)
class Rule:
    """One rule. ``problems``: what is invalid in it (the rule is not programmed; ``UnsupportedValue``)."""

    matches: tuple[RouteMatch, ...]
    filters: tuple[Filter, ...] = ()
    backends: tuple[BackendRef, ...] = ()
    timeout_ms: int | None = None
    backend_timeout_ms: int | None = None
    problems: tuple[str, ...] = ()


@attrs.frozen(slots=True)
class Route:
    """An HTTPRoute or GRPCRoute (``kind``). ``parents`` is the current ``status.parents`` (every
    controller's entries: ours are replaced, the others' kept)."""

    kind: str
    meta: Meta
    parent_refs: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    problems: tuple[str, ...] = ()
    parents: tuple[Mapping[str, Any], ...] = attrs.field(default=(), eq=False, repr=False)

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(self.kind, self.meta.namespace, self.meta.name, self.meta.uid, self.meta.resource_version)

    @property
    def age_key(self) -> tuple[str, str]:
        """Oldest first (creationTimestamp is RFC 3339 UTC: it sorts as text), then ``namespace/name``."""
        return (self.meta.created, f"{self.meta.namespace}/{self.meta.name}")


def _parent_refs(spec: Mapping[str, Any]) -> tuple[ParentRef, ...]:
    out = []
    for p in _list(spec.get("parentRefs")):
        p = _dict(p)
        if not _str(p.get("name")):
            continue
        ns, section, port = p.get("namespace"), p.get("sectionName"), _int(p.get("port"))
        out.append(ParentRef(_str(p.get("group"), GROUP), _str(p.get("kind"), GATEWAY), _str(p.get("name")),
                             ns if isinstance(ns, str) and ns else None,
                             section if isinstance(section, str) and section else None, port))
    return tuple(out)


def _backend_ref(raw: Any, default_weight: int = 1) -> tuple[BackendRef | None, str]:
    raw = _dict(raw)
    name = _str(raw.get("name"))
    if not name:
        return None, "a backendRef without a name"
    weight = raw.get("weight", default_weight)
    if _int(weight) is None or not 0 <= weight <= 1_000_000:
        return None, f"backendRef {name!r}: weight {weight!r} is not an integer in 0-1000000"
    ns = raw.get("namespace")
    unsupported = "backendRef filters are not supported" if _list(raw.get("filters")) else ""
    return BackendRef(_str(raw.get("group")), _str(raw.get("kind"), "Service"), name, ns if isinstance(ns, str) and ns else None,
                      _int(raw.get("port")), int(weight), unsupported), ""


def _key_matches(items: Any, what: str, case_insensitive: bool, problems: list[str]) -> tuple[KeyMatch, ...]:
    out: list[KeyMatch] = []
    seen: set[str] = set()
    for h in _list(items):
        h = _dict(h)
        name, value, typ = _str(h.get("name")), _str(h.get("value")), _str(h.get("type"), "Exact")
        if not name or not HEADER_NAME_RE.match(name):
            problems.append(f"{what} name {h.get('name')!r} is not a valid name")
            continue
        if typ not in ("Exact", "RegularExpression"):
            problems.append(f"{what} {name!r}: match type {typ!r} is not supported")
            continue
        if not isinstance(h.get("value"), str) or not VALUE_RE.match(value):
            problems.append(f"{what} {name!r}: value {h.get('value')!r} is not a valid value")
            continue
        if typ == "RegularExpression" and (why := valid_regex(value)):
            problems.append(f"{what} {name!r}: {why}")
            continue
        key = name.lower() if case_insensitive else name
        if key in seen:  # the specification: only the first entry of an equivalent name counts
            continue
        seen.add(key)
        out.append(KeyMatch(key, value, typ))
    return tuple(out)


def _http_match(raw: Any, problems: list[str]) -> RouteMatch | None:
    raw = _dict(raw)
    before = len(problems)
    path = _dict(raw.get("path"))
    path_type, value = _str(path.get("type"), "PathPrefix"), path.get("value", "/")
    if path_type not in ("Exact", "PathPrefix", "RegularExpression"):
        problems.append(f"path match type {path_type!r} is not supported")
    elif not isinstance(value, str):
        problems.append(f"path value {value!r} is not a string")
    elif path_type == "RegularExpression":
        if why := valid_regex(value):
            problems.append(f"path {value!r}: {why}")
    elif not PATH_RE.match(value) or "//" in value or "/./" in value or "/../" in value:
        problems.append(f"path {value!r} is not a valid absolute path")
    elif path_type == "PathPrefix" and len(value) > 1:
        value = value.rstrip("/") or "/"
    headers = _key_matches(raw.get("headers"), "header", True, problems)
    query = _key_matches(raw.get("queryParams"), "query parameter", False, problems)
    method = raw.get("method")
    if method is not None and method not in METHODS:
        problems.append(f"method {method!r} is not an HTTP method")
    if len(problems) > before:
        return None
    return RouteMatch(path_type, str(value), headers, query, method)


def _grpc_match(raw: Any, problems: list[str]) -> RouteMatch | None:
    raw = _dict(raw)
    before = len(problems)
    method = _dict(raw.get("method"))
    typ = _str(method.get("type"), "Exact")
    service, name = _str(method.get("service")), _str(method.get("method"))
    path_type, path = "PathPrefix", "/"
    if method:
        if typ not in ("Exact", "RegularExpression"):
            problems.append(f"method match type {typ!r} is not supported")
        elif not service and not name:
            problems.append("a method match needs a service, a method or both")
        elif typ == "Exact":
            if service and not GRPC_SERVICE_RE.match(service):
                problems.append(f"service {service!r} is not a gRPC service name")
            elif name and not GRPC_METHOD_RE.match(name):
                problems.append(f"method {name!r} is not a gRPC method name")
            elif service and name:
                path_type, path = "Exact", f"/{service}/{name}"
            elif service:  # every method of the service: element-wise prefix /<service> (= /<service>/...)
                path = f"/{service}"
            else:
                path_type, path = "RegularExpression", f"/[^/]+/{re.escape(name)}"
        else:
            for part in (service, name):
                if part and (why := valid_regex(part)):
                    problems.append(f"{part!r}: {why}")
            path_type, path = "RegularExpression", f"/{service or '[^/]+'}/{name or '[^/]+'}"
            if len(problems) == before and (why := valid_regex(path)):
                problems.append(f"method match {path!r}: {why}")
    headers = _key_matches(raw.get("headers"), "header", True, problems)
    if len(problems) > before:
        return None
    return RouteMatch(path_type, path, headers, grpc_service=service, grpc_method=name)


def _filters(raw: Any, problems: list[str]) -> tuple[Filter, ...]:
    out = []
    for f in _list(raw):
        f = _dict(f)
        typ = _str(f.get("type"))
        key = {"URLRewrite": "urlRewrite", "CORS": "cors"}.get(typ, typ[:1].lower() + typ[1:])
        config = _dict(f.get(key))
        mirror = None
        if typ == "RequestMirror":
            mirror, why = _backend_ref(config.get("backendRef"))
            if mirror is None:
                problems.append(f"RequestMirror: {why}")
                continue
        out.append(Filter(typ, config, mirror))
    return tuple(out)


def _rule(raw: Any, kind: str) -> Rule:
    raw = _dict(raw)
    problems: list[str] = []
    raw_matches = _list(raw.get("matches")) or [{}]
    one = _grpc_match if kind == GRPC_ROUTE else _http_match
    matches = tuple(m for m in (one(m, problems) for m in raw_matches) if m is not None)
    filters = _filters(raw.get("filters"), problems)
    backends = []
    for b in _list(raw.get("backendRefs")):
        ref, why = _backend_ref(b)
        if ref is None:
            problems.append(why)
        else:
            backends.append(ref)
    timeouts = _dict(raw.get("timeouts"))
    timeout_ms = backend_ms = None
    for key in ("request", "backendRequest"):
        if timeouts.get(key) is None:
            continue
        ms = parse_duration_ms(timeouts[key])
        if ms is None:
            problems.append(f"timeouts.{key} {timeouts[key]!r} is not a duration (e.g. 10s, 500ms)")
        elif key == "request":
            timeout_ms = ms
        else:
            backend_ms = ms
    if timeout_ms and backend_ms and backend_ms > timeout_ms:
        problems.append("timeouts.backendRequest is longer than timeouts.request")
    return Rule(matches, filters, tuple(backends), timeout_ms, backend_ms, tuple(problems))


def _convert_route(raw: dict[str, Any], kind: str) -> Route:
    spec = _dict(raw.get("spec"))
    problems = []
    hostnames = []
    for h in _list(spec.get("hostnames")):
        if isinstance(h, str) and valid_hostname(h.lower()):
            hostnames.append(h.lower())
        else:
            problems.append(f"hostname {h!r} is not a valid DNS name or wildcard")
    rules = tuple(_rule(r, kind) for r in _list(spec.get("rules"))) or (_rule({}, kind),)
    return Route(kind, _meta(raw), _parent_refs(spec), tuple(dict.fromkeys(hostnames)), rules, tuple(problems),
                 _status_list(raw, "parents"))


def convert_http_route(raw: dict[str, Any], ctx: Any) -> Route:
    return _convert_route(raw, HTTP_ROUTE)


def convert_grpc_route(raw: dict[str, Any], ctx: Any) -> Route:
    return _convert_route(raw, GRPC_ROUTE)


# -- ReferenceGrant ---------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class ReferenceGrant:
    """``from``: ``(group, kind, namespace)``; ``to``: ``(group, kind, name or None)`` in this namespace."""

    meta: Meta
    from_: tuple[tuple[str, str, str], ...] = ()
    to: tuple[tuple[str, str, str | None], ...] = ()

    def permits(self, group: str, kind: str, namespace: str, to_group: str, to_kind: str, to_name: str) -> bool:
        return (group, kind, namespace) in self.from_ and any(
            g == to_group and k == to_kind and (n is None or n == to_name) for g, k, n in self.to)


def convert_reference_grant(raw: dict[str, Any], ctx: Any) -> ReferenceGrant:
    spec = _dict(raw.get("spec"))
    frm = tuple((_str(_dict(f).get("group")), _str(_dict(f).get("kind")), _str(_dict(f).get("namespace")))
                for f in _list(spec.get("from")))
    to = tuple((_str(_dict(t).get("group")), _str(_dict(t).get("kind")), _str(_dict(t).get("name")) or None)
               for t in _list(spec.get("to")))
    return ReferenceGrant(_meta(raw), frm, to)


# -- Namespaces and Secrets -------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = attrs.field(factory=dict, eq=False)


def convert_namespace(raw: dict[str, Any], ctx: Any) -> Namespace:
    md = _dict(raw.get("metadata"))
    labels = {k: v for k, v in _dict(md.get("labels")).items() if isinstance(k, str) and isinstance(v, str)}
    labels.setdefault("kubernetes.io/metadata.name", _str(md.get("name")))
    return Namespace(_str(md.get("name")), labels)


@attrs.frozen(slots=True)
class CertSecret:
    """A ``kubernetes.io/tls`` Secret a Gateway listener references. ``error`` non-empty: it cannot be
    served (then the PEMs are empty: invalid key material never reaches Envoy)."""

    namespace: str
    name: str
    cert_pem: bytes = attrs.field(default=b"", repr=False)
    key_pem: bytes = attrs.field(default=b"", repr=False)
    error: str = ""


def validate_pem(cert: bytes, key: bytes) -> str:
    """Why Envoy could not serve this chain and key ("" when it can): the check the tls plugin uses."""
    try:
        return tls_pem_error(cert.decode("ascii"), key.decode("ascii"))
    except UnicodeDecodeError:
        return "tls.crt/tls.key are not PEM (non-ASCII bytes)"


def convert_secret(raw: dict[str, Any], ctx: Any) -> CertSecret:
    """Any Secret -> :class:`CertSecret` (one of another type gets an ``error``: listeners need TLS ones)."""
    md = _dict(raw.get("metadata"))
    base = CertSecret(_str(md.get("namespace"), "default"), _str(md.get("name")))
    if raw.get("type") != TLS_TYPE:
        return attrs.evolve(base, error=f"Secret type is {raw.get('type')!r}, not {TLS_TYPE}")
    data = _dict(raw.get("data"))
    try:
        cert = base64.b64decode(_str(data.get("tls.crt")), validate=True)
        key = base64.b64decode(_str(data.get("tls.key")), validate=True)
    except (binascii.Error, ValueError):
        return attrs.evolve(base, error="tls.crt/tls.key are not base64")
    error = validate_pem(cert, key)
    if error:
        return attrs.evolve(base, error=error)
    return attrs.evolve(base, cert_pem=cert, key_pem=key)
