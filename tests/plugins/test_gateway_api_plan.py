"""gateway_api plan (pure Python): Gateway API objects (raw dicts through the plugin's converters) in,
``table.Table`` + status conditions out. Every precedence rule and tie-breaker, hostname intersection,
allowedRoutes, ReferenceGrant, every status reason the design names, and bad objects that break nothing."""

from __future__ import annotations

import argparse
import datetime
import functools
from typing import Any

import pytest

from trafficmgr.plugin import Model, Service, ServicePort
from trafficmgr.plugins.gateway_api import ir, plan
from trafficmgr.plugins.gateway_api import table as t
from trafficmgr.plugins.gateway_api.plan import Condition

GW_API = "gateway.networking.k8s.io/v1"


@functools.cache
def make_cert(host: str) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for ``host`` and its key, PEM (made in memory)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
OPTIONS = argparse.Namespace(gateway_port=10000, gateway_class_controller=None)


def meta(name: str, ns: str | None = "default", created: str = "2026-01-01T00:00:00Z", **extra: Any) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "creationTimestamp": created, "generation": 1, "resourceVersion": "1", **extra}
    if ns is not None:
        md["namespace"] = ns
    return md


def gclass(name: str = "traffic", controller: str = plan.DEFAULT_CONTROLLER, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": GW_API, "kind": "GatewayClass", "metadata": meta(name, None), "spec": {"controllerName": controller, **spec}}


def listener(name: str = "http", port: int = 8080, protocol: str = "HTTP", **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": protocol, **extra}


def gateway(name: str = "gw", ns: str = "default", listeners: list[dict[str, Any]] | None = None, cls: str = "traffic",
            created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": GW_API, "kind": "Gateway", "metadata": meta(name, ns, created),
            "spec": {"gatewayClassName": cls, "listeners": listeners if listeners is not None else [listener()], **spec}}


def route(name: str, rules: list[dict[str, Any]], ns: str = "default", kind: str = "HTTPRoute", hostnames: list[str] | None = None,
          parents: list[dict[str, Any]] | None = None, created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    spec: dict[str, Any] = {"parentRefs": parents if parents is not None else [{"name": "gw", "namespace": "default"}],
                            "rules": rules}
    if hostnames is not None:
        spec["hostnames"] = hostnames
    return {"apiVersion": GW_API, "kind": kind, "metadata": meta(name, ns, created), "spec": spec}


def rule(backend: str = "web", port: int = 80, matches: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"backendRefs": [{"name": backend, "port": port}], **extra}
    if matches is not None:
        out["matches"] = matches
    return out


def service(name: str, ns: str = "default", ports: tuple[int, ...] = (80,)) -> Service:
    return Service(ns, name, tuple(ServicePort(f"p{p}", p, p) for p in ports), cluster_ip="10.0.0.1")


CONVERT = {"GatewayClass": ir.convert_class, "Gateway": ir.convert_gateway, "HTTPRoute": ir.convert_http_route,
           "GRPCRoute": ir.convert_grpc_route, "ReferenceGrant": ir.convert_reference_grant}


def model(*objects: dict[str, Any], services: tuple[Service, ...] = (), secrets: tuple[dict[str, Any], ...] = (),
          namespaces: tuple[dict[str, Any], ...] = ()) -> Model:
    extra: dict[str, dict[tuple[str, str], Any]] = {}
    for raw in objects:
        obj = CONVERT[raw["kind"]](raw, None)
        extra.setdefault(raw["kind"], {})[(raw["metadata"].get("namespace", ""), raw["metadata"]["name"])] = obj
    for raw in secrets:
        extra.setdefault(ir.SECRET, {})[(raw["metadata"]["namespace"], raw["metadata"]["name"])] = ir.convert_secret(raw, None)
    for raw in namespaces:
        extra.setdefault(ir.NAMESPACE, {})[("", raw["metadata"]["name"])] = ir.convert_namespace(raw, None)
    return Model(services={s.key: s for s in services}, extra=extra)


def build(*objects: dict[str, Any], **kw: Any) -> plan.Plan:
    return plan.build(model(*objects, **kw), OPTIONS)


def base(*objects: dict[str, Any], gw: dict[str, Any] | None = None, **kw: Any) -> plan.Plan:
    kw.setdefault("services", (service("web"), service("other"), service("api")))
    return build(gclass(), gw or gateway(), *objects, **kw)


def vhost(p: plan.Plan, host: str = "*", port: int = 8080, chain: int = 0) -> t.VirtualHost:
    sp = next(x for x in p.table.ports if x.port == port)
    return next(v for v in sp.chains[chain].virtual_hosts if v.hostname == host)


def sources(vh: t.VirtualHost) -> list[str]:
    return [r.source for r in vh.routes]


def route_conds(p: plan.Plan, name: str, parent: int = 0) -> dict[str, Condition]:
    r = next(ps for rt, ps in p.routes if rt.meta.name == name)
    return {c.type: c for c in r[parent].conditions}


def listener_conds(p: plan.Plan, gw: str = "gw", name: str = "http") -> tuple[dict[str, Condition], plan.ListenerStatus]:
    st = next(g for g in p.gateways if g.gateway.meta.name == gw)
    ls = next(x for x in st.listeners if x.name == name)
    return {c.type: c for c in ls.conditions}, ls


def gw_conds(p: plan.Plan, gw: str = "gw") -> dict[str, Condition]:
    st = next(g for g in p.gateways if g.gateway.meta.name == gw)
    return {c.type: c for c in st.conditions}


# -- precedence -------------------------------------------------------------------------------------


def m(path: str = "/", typ: str = "PathPrefix", **extra: Any) -> dict[str, Any]:
    return {"path": {"type": typ, "value": path}, **extra}


def test_exact_beats_longer_prefix_and_prefixes_by_length() -> None:
    p = base(route("r", [rule(matches=[m("/a"), m("/a/b/c"), m("/a", "Exact"), m("/")])]))
    assert [(r.match.path_type, r.match.path) for r in vhost(p).routes] == [
        ("Exact", "/a"), ("PathPrefix", "/a/b/c"), ("PathPrefix", "/a"), ("PathPrefix", "/")]


def test_method_then_header_count_then_query_count() -> None:
    hdr = [{"name": "x-a", "value": "1"}]
    hdr2 = [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "2"}]
    q = [{"name": "q", "value": "1"}]
    p = base(route("r", [rule(matches=[
        m("/p", queryParams=q), m("/p", headers=hdr), m("/p", headers=hdr2), m("/p", method="GET"), m("/p"),
        m("/p", headers=hdr, queryParams=q)])]))
    got = [(r.match.method, len(r.match.headers), len(r.match.query)) for r in vhost(p).routes]
    assert got == [("GET", 0, 0), (None, 2, 0), (None, 1, 1), (None, 1, 0), (None, 0, 1), (None, 0, 0)]


def test_precedence_spans_every_rule_of_every_route() -> None:
    """A longer prefix in a younger route still wins over a shorter one in the oldest route."""
    p = base(route("old", [rule(matches=[m("/a")])], created="2026-01-01T00:00:00Z"),
             route("young", [rule(matches=[m("/a/b")])], created="2026-02-01T00:00:00Z"))
    assert sources(vhost(p)) == ["HTTPRoute/default/young/rule0/match0", "HTTPRoute/default/old/rule0/match0"]


def test_ties_oldest_route_then_name_then_rule_then_match_order() -> None:
    same = [rule(matches=[m("/x")]), rule("other", matches=[m("/x"), m("/x")])]
    p = base(route("b", same, created="2026-01-01T00:00:00Z"), route("a", same, created="2026-01-02T00:00:00Z"),
             route("c", same, created="2026-01-01T00:00:00Z"))
    assert sources(vhost(p)) == [
        "HTTPRoute/default/b/rule0/match0", "HTTPRoute/default/b/rule1/match0", "HTTPRoute/default/b/rule1/match1",
        "HTTPRoute/default/c/rule0/match0", "HTTPRoute/default/c/rule1/match0", "HTTPRoute/default/c/rule1/match1",
        "HTTPRoute/default/a/rule0/match0", "HTTPRoute/default/a/rule1/match0", "HTTPRoute/default/a/rule1/match1"]


def test_namespace_is_part_of_the_name_tie_breaker() -> None:
    gw = gateway(listeners=[listener(allowedRoutes={"namespaces": {"from": "All"}})])
    p = base(route("z", [rule(matches=[m("/x")])], ns="aaa"), route("a", [rule(matches=[m("/x")])], ns="bbb"), gw=gw,
             services=(service("web", "aaa"), service("web", "bbb")))
    assert sources(vhost(p)) == ["HTTPRoute/aaa/z/rule0/match0", "HTTPRoute/bbb/a/rule0/match0"]


def test_prefix_is_normalized_element_wise_and_default_match_is_prefix_root() -> None:
    p = base(route("r", [rule(matches=[m("/foo/")]), rule()]))
    assert [(r.match.path_type, r.match.path) for r in vhost(p).routes] == [("PathPrefix", "/foo"), ("PathPrefix", "/")]


def test_regex_between_exact_and_prefix() -> None:
    p = base(route("r", [rule(matches=[m("/a/b/c/d"), m("/r.*", "RegularExpression"), m("/e", "Exact")])]))
    assert [r.match.path_type for r in vhost(p).routes] == ["Exact", "RegularExpression", "PathPrefix"]


# -- GRPCRoute --------------------------------------------------------------------------------------


def grpc_rule(service_: str | None = None, method: str | None = None, typ: str = "Exact", **extra: Any) -> dict[str, Any]:
    mm: dict[str, Any] = {"type": typ}
    if service_:
        mm["service"] = service_
    if method:
        mm["method"] = method
    return rule("api", 80, matches=[{"method": mm, **extra}])


def test_grpc_method_matches_become_paths_and_backends_are_grpc() -> None:
    p = base(route("g", [grpc_rule("pkg.Echo", "Say"), grpc_rule("pkg.Echo"), grpc_rule(method="Say"),
                         grpc_rule("pkg\\..*", "S.*", typ="RegularExpression")], kind="GRPCRoute"))
    got = [(r.match.path_type, r.match.path, r.grpc) for r in vhost(p).routes]
    assert got == [("Exact", "/pkg.Echo/Say", True), ("PathPrefix", "/pkg.Echo", True),
                   ("RegularExpression", "/pkg\\..*/S.*", True), ("RegularExpression", "/[^/]+/Say", True)]
    assert p.protocols == (("default", "api", 80, "grpc"), )


def test_grpc_precedence_hostname_then_service_then_method_then_headers() -> None:
    gw = gateway(listeners=[listener(hostname="*.example.com")])
    wide = route("wide", [grpc_rule("a.B", "M")], kind="GRPCRoute", hostnames=["*.example.com"])
    exact = route("exact", [grpc_rule("a", "M")], kind="GRPCRoute", hostnames=["foo.example.com"], created="2026-03-01T00:00:00Z")
    hdr = route("hdr", [grpc_rule("a.B", "M", headers=[{"name": "x", "value": "1"}])], kind="GRPCRoute",
                hostnames=["*.example.com"], created="2026-03-01T00:00:00Z")
    p = base(wide, exact, hdr, gw=gw)
    assert sources(vhost(p, "foo.example.com")) == [
        "GRPCRoute/default/exact/rule0/match0", "GRPCRoute/default/hdr/rule0/match0", "GRPCRoute/default/wide/rule0/match0"]


# -- hostnames --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("listener_host", "route_hosts", "expected"), [
    (None, (), ("*",)),
    ("foo.example.com", (), ("foo.example.com",)),
    (None, ("a.com", "*.b.com"), ("a.com", "*.b.com")),
    ("*.example.com", ("foo.example.com", "a.b.example.com", "example.com", "x.net"), ("foo.example.com", "a.b.example.com")),
    ("foo.example.com", ("*.example.com",), ("foo.example.com",)),
    ("a.b.example.com", ("*.example.com",), ("a.b.example.com",)),
    ("*.example.com", ("*.foo.example.com",), ("*.foo.example.com",)),
    ("*.foo.example.com", ("*.example.com",), ("*.foo.example.com",)),
    ("foo.example.com", ("bar.example.com",), ()),
])
def test_hostname_intersection(listener_host: str | None, route_hosts: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert plan.intersect(listener_host, route_hosts) == expected


def test_no_intersecting_hostname_is_not_accepted() -> None:
    gw = gateway(listeners=[listener(hostname="foo.example.com")])
    p = base(route("r", [rule()], hostnames=["bar.example.com"]), route("ok", [rule()], hostnames=["*.example.com"]), gw=gw)
    c = route_conds(p, "r")["Accepted"]
    assert (c.status, c.reason) == (False, "NoMatchingListenerHostname")
    assert sources(vhost(p, "foo.example.com")) == ["HTTPRoute/default/ok/rule0/match0"]
    assert listener_conds(p)[1].attached_routes == 1


def test_most_specific_listener_owns_its_hostname() -> None:
    """Listener isolation: a route of the wildcard listener never sees requests of the exact listener."""
    gw = gateway(listeners=[listener("wild", hostname="*.example.com"), listener("foo", hostname="foo.example.com"),
                            listener("any")])
    on = [{"name": "gw", "namespace": "default", "sectionName": s} for s in ("wild", "foo", "any")]
    p = base(route("w", [rule()], parents=[on[0]]), route("f", [rule("other")], parents=[on[1]]),
             route("a", [rule("api")], parents=[on[2]], hostnames=["foo.example.com", "bar.example.com", "x.net"]), gw=gw)
    assert sources(vhost(p, "foo.example.com")) == ["HTTPRoute/default/f/rule0/match0"]
    assert sources(vhost(p, "*.example.com")) == ["HTTPRoute/default/w/rule0/match0"]
    assert sources(vhost(p, "x.net")) == ["HTTPRoute/default/a/rule0/match0"]
    assert [v.hostname for v in p.table.ports[0].chains[0].virtual_hosts] == ["foo.example.com", "x.net", "*.example.com", "*"]


def test_exact_virtual_host_carries_matching_wildcard_and_catch_all_routes_of_its_listener() -> None:
    p = base(route("exact", [rule(matches=[m("/e")])], hostnames=["foo.example.com"]),
             route("wild", [rule(matches=[m("/w/long")])], hostnames=["*.example.com"]),
             route("all", [rule(matches=[m("/")])]))
    assert sources(vhost(p, "foo.example.com")) == [
        "HTTPRoute/default/wild/rule0/match0", "HTTPRoute/default/exact/rule0/match0", "HTTPRoute/default/all/rule0/match0"]
    assert sources(vhost(p, "*.example.com")) == ["HTTPRoute/default/wild/rule0/match0", "HTTPRoute/default/all/rule0/match0"]
    assert sources(vhost(p, "*")) == ["HTTPRoute/default/all/rule0/match0"]


# -- allowedRoutes ----------------------------------------------------------------------------------


def ns_obj(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


@pytest.mark.parametrize(("allowed", "route_ns", "ok"), [
    (None, "default", True), (None, "team", False),
    ({"namespaces": {"from": "Same"}}, "team", False),
    ({"namespaces": {"from": "All"}}, "team", True),
    ({"namespaces": {"from": "Selector", "selector": {"matchLabels": {"shared": "yes"}}}}, "team", True),
    ({"namespaces": {"from": "Selector", "selector": {"matchLabels": {"shared": "yes"}}}}, "other", False),
    ({"namespaces": {"from": "Selector", "selector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["other"]}]}}}, "other", True),
    ({"namespaces": {"from": "All"}, "kinds": [{"kind": "GRPCRoute"}]}, "default", False),
    ({"namespaces": {"from": "All"}, "kinds": [{"kind": "HTTPRoute"}]}, "default", True),
])
def test_allowed_routes(allowed: dict[str, Any] | None, route_ns: str, ok: bool) -> None:
    lst = listener(**({"allowedRoutes": allowed} if allowed else {}))
    p = base(route("r", [rule()], ns=route_ns), gw=gateway(listeners=[lst]),
             services=(service("web", route_ns),), namespaces=(ns_obj("team", shared="yes"), ns_obj("other")))
    c = route_conds(p, "r")["Accepted"]
    assert (c.status, c.reason) == ((True, "Accepted") if ok else (False, "NotAllowedByListeners"))
    assert bool(vhost(p).routes) == ok
    assert listener_conds(p)[1].attached_routes == (1 if ok else 0)


def test_invalid_route_kinds_and_supported_kinds() -> None:
    lst = listener(allowedRoutes={"kinds": [{"kind": "TCPRoute"}, {"kind": "HTTPRoute"}]})
    conds, ls = listener_conds(base(gw=gateway(listeners=[lst])))
    assert (conds["ResolvedRefs"].status, conds["ResolvedRefs"].reason) == (False, "InvalidRouteKinds")
    assert ls.supported_kinds == ("HTTPRoute",)
    conds, ls = listener_conds(base())
    assert ls.supported_kinds == ("HTTPRoute", "GRPCRoute") and conds["ResolvedRefs"].status


def test_section_name_or_port_without_listener_is_no_matching_parent() -> None:
    p = base(route("s", [rule()], parents=[{"name": "gw", "sectionName": "nope"}]),
             route("p", [rule()], parents=[{"name": "gw", "port": 9999}]),
             route("ok", [rule()], parents=[{"name": "gw", "port": 8080, "sectionName": "http"}]))
    for name in ("s", "p"):
        c = route_conds(p, name)["Accepted"]
        assert (c.status, c.reason) == (False, "NoMatchingParent")
    assert route_conds(p, "ok")["Accepted"].status


def test_routes_of_other_controllers_gateways_are_not_ours() -> None:
    svc_parent = route("mesh", [rule()], parents=[{"group": "", "kind": "Service", "name": "web"}])
    other_gw = route("elsewhere", [rule()], parents=[{"name": "not-ours"}])
    p = base(svc_parent, other_gw, gateway("not-ours", cls="someone-else"))
    # A Service parent is the mesh's (GAMMA, mesh.py: this control plane is the mesh): it gets our entry.
    assert [(r.meta.name, [ps.ref.kind for ps in parents]) for r, parents in p.routes] == [("mesh", ["Service"])]
    assert [g.gateway.meta.name for g in p.gateways] == ["gw"]


# -- backends and ReferenceGrant --------------------------------------------------------------------


def grant(ns: str, from_ns: str, kind: str = "Service", from_kind: str = "HTTPRoute", name: str | None = None) -> dict[str, Any]:
    to: dict[str, Any] = {"group": "", "kind": kind}
    if name:
        to["name"] = name
    return {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant", "metadata": meta("g", ns),
            "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": from_kind, "namespace": from_ns}], "to": [to]}}


def cross(port: int = 80) -> dict[str, Any]:
    return route("x", [{"backendRefs": [{"name": "web", "namespace": "prod", "port": port}]}])


def test_cross_namespace_backend_needs_a_reference_grant() -> None:
    svcs = (service("web", "prod"),)
    refused = base(cross(), services=svcs)
    c = route_conds(refused, "x")
    assert (c["ResolvedRefs"].status, c["ResolvedRefs"].reason) == (False, "RefNotPermitted")
    assert c["Accepted"].status  # accepted; its backend's share answers 500
    (only,) = vhost(refused).routes
    assert only.backends == (t.Backend("prod", "web", 80, 1),)
    allowed = base(cross(), grant("prod", "default"), services=svcs)
    assert route_conds(allowed, "x")["ResolvedRefs"].status
    assert vhost(allowed).routes[0].backends[0].service == svcs[0]
    for wrong in (grant("prod", "elsewhere"), grant("prod", "default", name="nope"), grant("default", "default"),
                  grant("prod", "default", from_kind="GRPCRoute")):
        assert route_conds(base(cross(), wrong, services=svcs), "x")["ResolvedRefs"].reason == "RefNotPermitted", wrong


def test_backend_not_found_and_invalid_kind_and_weights() -> None:
    r = route("r", [{"backendRefs": [
        {"name": "web", "port": 80, "weight": 3}, {"name": "missing", "port": 80}, {"name": "web", "port": 81},
        {"name": "web", "port": 80, "weight": 0}, {"name": "x", "kind": "Bucket", "group": "s3", "port": 1}]}])
    p = base(r)
    c = route_conds(p, "r")["ResolvedRefs"]
    assert (c.status, c.reason) == (False, "BackendNotFound")
    assert "missing" in c.message and "no port 81" in c.message and "only core Services" in c.message
    (rt,) = vhost(p).routes
    assert [(b.name, b.port_number, b.weight, b.service is not None) for b in rt.backends] == [
        ("web", 80, 3, True), ("missing", 80, 1, False), ("web", 81, 1, False), ("x", 1, 1, False)]
    invalid_kind = base(route("k", [{"backendRefs": [{"name": "x", "kind": "Bucket", "group": "s3", "port": 1}]}]))
    assert route_conds(invalid_kind, "k")["ResolvedRefs"].reason == "InvalidKind"
    assert vhost(invalid_kind).routes[0].backends == (t.Backend("default", "x", 1, 1),)


def test_all_zero_weights_is_an_empty_backend_list() -> None:
    p = base(route("z", [{"backendRefs": [{"name": "web", "port": 80, "weight": 0}]}]))
    assert vhost(p).routes[0].backends == () and route_conds(p, "z")["ResolvedRefs"].status


def test_backends_of_attached_routes_are_http_ports() -> None:
    p = base(route("r", [rule(), {"backendRefs": [{"name": "api", "port": 80}],
                                  "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "other", "port": 80}}}]}]),
             route("unattached", [rule("other", 80)], parents=[{"name": "gw", "sectionName": "nope"}]))
    assert p.protocols == (("default", "api", 80, "http"), ("default", "other", 80, "http"), ("default", "web", 80, "http"))


# -- filters ----------------------------------------------------------------------------------------


def test_filters_to_table() -> None:
    filters = [
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-A", "value": "1"}],
                                                                     "add": [{"name": "x-b", "value": "2"}], "remove": ["X-C"]}},
        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-r", "value": "r"}]}},
        {"type": "URLRewrite", "urlRewrite": {"hostname": "Back.example.com", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}},
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "other", "port": 80}, "percent": 25}},
    ]
    p = base(route("f", [rule(matches=[m("/old")], filters=filters)]))
    (r,) = vhost(p).routes
    assert r.request_headers == t.HeaderChanges((("x-a", "1"),), (("x-b", "2"),), ("x-c",))
    assert r.response_headers == t.HeaderChanges((), (("x-r", "r"),), ())
    assert r.rewrite == t.Rewrite("back.example.com", "ReplacePrefixMatch", "/new")
    assert [(x.backend.name, x.percent) for x in r.mirrors] == [("other", 25.0)]
    assert r.backends[0].name == "web" and r.redirect is None


def test_redirect_has_no_backends() -> None:
    f = [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301, "port": 443}}]
    (r,) = vhost(base(route("rd", [rule(filters=f)]))).routes
    assert r.redirect == t.Redirect("https", None, 443, 301) and r.backends == ()


@pytest.mark.parametrize("bad", [
    {"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "Y", "name": "z"}},
    {"type": "CORS", "cors": {}},
    {"type": "RequestRedirect", "requestRedirect": {"statusCode": 418}},
    {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/x"}}},  # on Exact
    {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x", "value": "a\r\nb"}]}},
    {"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "bad name", "value": "v"}]}},
    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["x:y"]}},
    {"type": "RequestRedirect", "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/a b"}}},
])
def test_unsupported_filter_drops_only_its_rule(bad: dict[str, Any]) -> None:
    p = base(route("u", [rule(matches=[m("/bad", "Exact")], filters=[bad]), rule(matches=[m("/goodies")])]),
             route("other", [rule(matches=[m("/else")])]))
    c = route_conds(p, "u")["Accepted"]
    assert (c.status, c.reason) == (False, "UnsupportedValue") and "rule 0" in c.message
    assert sources(vhost(p)) == ["HTTPRoute/default/u/rule1/match0", "HTTPRoute/default/other/rule0/match0"]
    assert listener_conds(p)[1].attached_routes == 1  # only Accepted=True routes count


def test_grpc_route_rejects_http_only_filters() -> None:
    f = [{"type": "URLRewrite", "urlRewrite": {"hostname": "x.com"}}]
    p = base(route("g", [dict(grpc_rule("a.B", "M"), filters=f)], kind="GRPCRoute"))
    assert route_conds(p, "g")["Accepted"].reason == "UnsupportedValue" and vhost(p).routes == ()


def test_timeouts() -> None:
    (r,) = vhost(base(route("t", [rule(timeouts={"request": "1m30s", "backendRequest": "500ms"})]))).routes
    assert (r.timeout_ms, r.backend_timeout_ms) == (90_000, 500)
    p = base(route("bad", [rule(timeouts={"request": "1s", "backendRequest": "2s"})]))
    assert route_conds(p, "bad")["Accepted"].reason == "UnsupportedValue"


# -- listeners and Gateway conditions ---------------------------------------------------------------


def tls_secret(name: str = "cert", ns: str = "default", host: str = "foo.example.com", broken: bool = False) -> dict[str, Any]:
    import base64

    cert, key = make_cert(host)
    if broken:
        key = make_cert("other")[1]
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": name, "namespace": ns},
            "data": {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()}}


def https(refs: list[dict[str, Any]], name: str = "https", hostname: str | None = "foo.example.com", mode: str = "Terminate") -> dict[str, Any]:
    extra = {"hostname": hostname} if hostname is not None else {}
    return listener(name, 8443, "HTTPS", tls={"mode": mode, "certificateRefs": refs}, **extra)


def test_https_listener_with_secret() -> None:
    p = base(route("r", [rule()], parents=[{"name": "gw", "sectionName": "https"}]),
             gw=gateway(listeners=[https([{"name": "cert"}])]), secrets=(tls_secret(),))
    (sp,) = p.table.ports
    (chain,) = sp.chains
    assert (sp.protocol, chain.server_names, chain.secret) == ("HTTPS", ("foo.example.com",), ("default", "cert"))
    assert chain.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE KEY" in chain.key_pem
    conds, _ = listener_conds(p, name="https")
    assert conds["ResolvedRefs"].status and conds["Programmed"].status


@pytest.mark.parametrize(("refs", "secrets", "reason"), [
    ([{"name": "missing"}], (), "InvalidCertificateRef"),
    ([{"name": "cert"}], ("broken",), "InvalidCertificateRef"),
    ([{"name": "cert", "kind": "ConfigMap"}], ("ok",), "InvalidCertificateRef"),
    ([], (), "InvalidCertificateRef"),
    ([{"name": "cert", "namespace": "certs"}], ("other-ns",), "RefNotPermitted"),
])
def test_certificate_ref_reasons(refs: list[dict[str, Any]], secrets: tuple[str, ...], reason: str) -> None:
    made = tuple(tls_secret(ns="certs") if s == "other-ns" else tls_secret(broken=s == "broken") for s in secrets)
    p = base(gw=gateway(listeners=[https(refs), listener()]), secrets=made)
    conds, _ = listener_conds(p, name="https")
    assert (conds["ResolvedRefs"].status, conds["ResolvedRefs"].reason) == (False, reason)
    assert not conds["Programmed"].status
    assert [sp.port for sp in p.table.ports] == [8080]  # the HTTP listener is served all the same
    assert (gw_conds(p)["Accepted"].status, gw_conds(p)["Accepted"].reason) == (True, "ListenersNotValid")


def test_certificate_in_another_namespace_with_a_grant() -> None:
    g = grant("certs", "default", kind="Secret", from_kind="Gateway")
    p = base(g, gw=gateway(listeners=[https([{"name": "cert", "namespace": "certs"}])]), secrets=(tls_secret(ns="certs"),))
    assert listener_conds(p, name="https")[0]["ResolvedRefs"].status
    assert p.table.ports[0].chains[0].secret == ("certs", "cert")


@pytest.mark.parametrize(("lst", "reason"), [
    (listener(protocol="TCP"), "UnsupportedProtocol"),
    (listener(protocol="UDP"), "UnsupportedProtocol"),
    (listener(port=10000), "PortUnavailable"),
    (listener(port=0), "UnsupportedValue"),
    (listener(hostname="not a host"), "UnsupportedValue"),
    (https([{"name": "cert"}], mode="Passthrough"), "UnsupportedValue"),
])
def test_listener_not_accepted(lst: dict[str, Any], reason: str) -> None:
    p = base(gw=gateway(listeners=[lst]), secrets=(tls_secret(),))
    conds, _ = listener_conds(p, name=lst["name"])
    assert (conds["Accepted"].status, conds["Accepted"].reason) == (False, reason)
    assert (conds["Programmed"].status, conds["Programmed"].reason) == (False, "Invalid")
    assert p.table.ports == ()
    assert (gw_conds(p)["Accepted"].status, gw_conds(p)["Accepted"].reason) == (False, "ListenersNotValid")
    assert not gw_conds(p)["Programmed"].status


def test_listener_conflicts_first_gateway_wins() -> None:
    old = gateway("old", listeners=[listener("a", hostname="x.com"), listener("b", hostname="x.com")], created="2026-01-01T00:00:00Z")
    young = gateway("young", listeners=[listener("c", protocol="HTTPS", tls={"certificateRefs": [{"name": "cert"}]}),
                                        listener("d", hostname="y.com")], created="2026-02-01T00:00:00Z")
    p = build(gclass(), old, young, secrets=(tls_secret(),))
    a, _ = listener_conds(p, "old", "a")
    b, _ = listener_conds(p, "old", "b")
    c, _ = listener_conds(p, "young", "c")
    d, _ = listener_conds(p, "young", "d")
    assert not a["Conflicted"].status and a["Programmed"].status
    assert (b["Conflicted"].status, b["Conflicted"].reason, b["Programmed"].status) == (True, "HostnameConflict", False)
    assert (c["Conflicted"].status, c["Conflicted"].reason) == (True, "ProtocolConflict")
    assert d["Programmed"].status
    assert [v.hostname for v in p.table.ports[0].chains[0].virtual_hosts] == ["x.com", "y.com"]


def test_gateway_class_and_foreign_classes() -> None:
    p = build(gclass(), gclass("theirs", "example.com/other"), gclass("params", parametersRef={"group": "a", "kind": "B", "name": "c"}),
              gateway("on-params", cls="params"), gateway("theirs", cls="theirs"))
    got = {gc.name: (c[0].status, c[0].reason) for gc, c in p.classes}
    assert got == {"traffic": (True, "Accepted"), "params": (False, "InvalidParameters")}
    assert [(g.gateway.meta.name, g.conditions[0].reason) for g in p.gateways] == [("on-params", "Invalid")]


def test_gateway_addresses_are_not_supported() -> None:
    p = base(gw=gateway(addresses=[{"type": "IPAddress", "value": "1.2.3.4"}]))
    assert gw_conds(p)["Accepted"].reason == "UnsupportedAddress" and p.table.ports == ()


def test_controller_option() -> None:
    opts = argparse.Namespace(gateway_port=10000, gateway_class_controller="example.com/mine")
    p = plan.build(model(gclass(controller="example.com/mine"), gateway()), opts)
    assert [gc.name for gc, _ in p.classes] == ["traffic"] and p.table.ports


# -- bad objects ------------------------------------------------------------------------------------


def test_bad_objects_break_nothing_else() -> None:
    bad_route = {"apiVersion": GW_API, "kind": "HTTPRoute", "metadata": meta("bad"),
                 "spec": {"parentRefs": [{"name": "gw"}], "hostnames": [7, "UPPER_bad"], "rules": "nope"}}
    worse = {"apiVersion": GW_API, "kind": "HTTPRoute", "metadata": meta("worse"),
             "spec": {"parentRefs": "x", "rules": [{"matches": [{"path": {"type": "Exact", "value": 5}}, "x"],
                                                    "backendRefs": [{"port": "80"}, "x", {"name": "web", "weight": -1}]}]}}
    bad_match = route("badmatch", [rule(matches=[m("/r(?=x)", "RegularExpression")]), rule(matches=[m("/fine/x")])])
    bad_gw = {"apiVersion": GW_API, "kind": "Gateway", "metadata": meta("badgw"),
              "spec": {"gatewayClassName": "traffic", "listeners": [5, {"name": "l", "port": "80", "protocol": 3}]}}
    p = base(bad_route, worse, bad_match, bad_gw, route("good", [rule(matches=[m("/good")])]))
    assert route_conds(p, "bad")["Accepted"].reason == "UnsupportedValue"
    assert route_conds(p, "badmatch")["Accepted"].reason == "UnsupportedValue"
    assert sources(vhost(p)) == ["HTTPRoute/default/badmatch/rule1/match0", "HTTPRoute/default/good/rule0/match0"]
    st = next(g for g in p.gateways if g.gateway.meta.name == "badgw")
    assert not st.conditions[0].status
    assert gw_conds(p)["Programmed"].status


def test_plan_is_memoized_on_its_inputs() -> None:
    mdl = model(gclass(), gateway(), route("r", [rule()]), services=(service("web"),))
    first = plan.plan(mdl, OPTIONS)
    again = Model(services=dict(mdl.services), extra={k: dict(v) for k, v in mdl.extra.items()})
    assert plan.plan(again, OPTIONS) is first
    changed = Model(services={("default", "web"): service("web", ports=(80, 81))}, extra=again.extra)
    assert plan.plan(changed, OPTIONS) is not first


def test_http_and_grpc_routes_never_share_a_hostname_on_a_listener() -> None:
    """The older route keeps the hostname; the other kind is not attached there (it still is where it
    does not overlap)."""
    old = route("h", [rule(matches=[m("/h")])], hostnames=["*.example.com"], created="2026-01-01T00:00:00Z")
    clash = route("g", [grpc_rule("a.B", "M")], kind="GRPCRoute", hostnames=["foo.example.com"], created="2026-02-01T00:00:00Z")
    apart = route("g2", [grpc_rule("a.B", "M")], kind="GRPCRoute", hostnames=["grpc.example.net"], created="2026-02-01T00:00:00Z")
    p = base(old, clash, apart)
    c = route_conds(p, "g")["Accepted"]
    assert (c.status, c.reason) == (False, "NotAllowedByListeners") and "HTTPRoute default/h" in c.message
    assert route_conds(p, "h")["Accepted"].status and route_conds(p, "g2")["Accepted"].status
    assert sources(vhost(p, "*.example.com")) == ["HTTPRoute/default/h/rule0/match0"]
    assert "foo.example.com" not in [v.hostname for v in p.table.ports[0].chains[0].virtual_hosts]
    assert sources(vhost(p, "grpc.example.net")) == ["GRPCRoute/default/g2/rule0/match0"]
    # The GRPCRoute first (older): the HTTPRoute is the one refused.
    p = base(attrs_evolve_created(old, "2026-03-01T00:00:00Z"), clash)
    assert route_conds(p, "h")["Accepted"].reason == "NotAllowedByListeners" and route_conds(p, "g")["Accepted"].status


def attrs_evolve_created(raw: dict[str, Any], created: str) -> dict[str, Any]:
    return {**raw, "metadata": {**raw["metadata"], "creationTimestamp": created}}


@pytest.mark.parametrize("port", [15000, 8900])
def test_gateway_pod_ports_are_unavailable(port: int) -> None:
    conds, _ = listener_conds(base(gw=gateway(listeners=[listener(port=port)])))
    assert (conds["Accepted"].status, conds["Accepted"].reason) == (False, "PortUnavailable")


@pytest.mark.parametrize(("pattern", "ok"), [
    ("/r.*", True), ("/items/[0-9]+", True), ("/(a{1,20}){1,20}", False), ("/x(?=y)", False), ("/(", False), ("/(a)\\1", False),
])
def test_regex_envoy_would_reject_is_refused_before_it_reaches_envoy(pattern: str, ok: bool) -> None:
    """A regex Envoy rejects (RE2 syntax, program size > 100) would NACK the whole route configuration:
    its rule is refused (UnsupportedValue), the others are served."""
    p = base(route("rx", [rule(matches=[m(pattern, "RegularExpression")]), rule(matches=[m("/fine")])]))
    assert route_conds(p, "rx")["Accepted"].status is ok
    assert len(vhost(p).routes) == (2 if ok else 1)


@pytest.mark.parametrize(("pattern", "ok"), [("/r.*", True), ("/x{3,5}", True), ("/(a{1,20}){1,20}", False),
                                             ("/a{1,9}/b{2}", False), ("/(", False), ("/" + "a" * 90, False)])
def test_regex_check_without_google_re2(pattern: str, ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without google-re2 (a production install: it comes with the test extra), a conservative check
    stands in for the program size."""
    monkeypatch.setattr(ir, "_re2", None)
    assert (ir.valid_regex(pattern) == "") is ok


# -- arbitrary input --------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from trafficmgr.plugins.gateway_api import translate  # noqa: E402

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.sampled_from(
    ["", "/", "/a", "Exact", "PathPrefix", "RegularExpression", "web", "*.example.com", "a.example.com", "GET",
     "RequestHeaderModifier", "URLRewrite", "RequestRedirect", "RequestMirror", "ReplacePrefixMatch", "Service",
     "x-h", "(", "1s", "https", "All", "Selector", "Gateway", "gw", "default"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["name", "value", "type", "path", "headers", "queryParams", "method", "matches",
                                     "filters", "backendRefs", "port", "weight", "namespace", "kind", "group",
                                     "requestHeaderModifier", "urlRewrite", "requestRedirect", "requestMirror",
                                     "backendRef", "set", "add", "remove", "replacePrefixMatch", "replaceFullPath",
                                     "hostname", "statusCode", "scheme", "timeouts", "request", "sectionName"]),
                    inner, max_size=4)), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=_values, hostnames=_values, parents=_values)
def test_arbitrary_route_never_raises_and_never_breaks_the_good_route(rules: Any, hostnames: Any, parents: Any) -> None:
    weird = {"apiVersion": GW_API, "kind": "HTTPRoute", "metadata": meta("weird", created="2026-05-01T00:00:00Z"),
             "spec": {"parentRefs": parents, "hostnames": hostnames, "rules": rules}}
    good = route("good", [rule(matches=[m("/good/only")])], hostnames=["good.example.com"])
    p = base(good, weird)
    assert "HTTPRoute/default/good/rule0/match0" in sources(vhost(p, "good.example.com"))
    for sp in p.table.ports:
        translate._check_port(sp)  # the structural contract the translation enforces


_listener_values = st.recursive(st.one_of(_scalars, st.sampled_from(["HTTP", "HTTPS", "TCP", "Terminate", "Passthrough",
                                                                     "certificateRefs", "Secret", "cert"])),
                                lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
                                    ["name", "port", "protocol", "hostname", "tls", "mode", "certificateRefs", "allowedRoutes",
                                     "namespaces", "from", "selector", "matchLabels", "matchExpressions", "kinds", "kind",
                                     "group", "key", "operator", "values", "namespace"]), inner, max_size=4)), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(listeners=_listener_values, addresses=_values)
def test_arbitrary_gateway_never_raises_and_never_breaks_the_older_gateway(listeners: Any, addresses: Any) -> None:
    weird = {"apiVersion": GW_API, "kind": "Gateway", "metadata": meta("weird", created="2026-05-01T00:00:00Z"),
             "spec": {"gatewayClassName": "traffic", "listeners": listeners, "addresses": addresses}}
    p = base(route("r", [rule()]), weird, secrets=(tls_secret(),))
    assert sources(vhost(p)) == ["HTTPRoute/default/r/rule0/match0"]
    for sp in p.table.ports:
        translate._check_port(sp)


def test_several_certificate_refs_all_served_and_a_bad_one_reported() -> None:
    bar = tls_secret("bar", host="bar.example.com")
    p = base(gw=gateway(listeners=[https([{"name": "missing"}, {"name": "cert"}, {"name": "bar"}, {"name": "cert"}], hostname=None)]),
             secrets=(tls_secret(), bar))
    (chain,) = p.table.ports[0].chains
    assert [c.secret for c in chain.certificates] == [("default", "cert"), ("default", "bar")]
    conds, _ = listener_conds(p, name="https")
    assert (conds["ResolvedRefs"].status, conds["ResolvedRefs"].reason) == (False, "InvalidCertificateRef")
    assert "default/missing" in conds["ResolvedRefs"].message and conds["Programmed"].status
