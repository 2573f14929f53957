"""Hand-made Gateway API route tables for the translation tests (``test_gateway_api_translate.py``, goldens,
and ``test_gateway_api_envoy.py``, a real gateway Envoy), and a test-only plugin that serves one.

:class:`TablePlugin` stands in for the gateway_api plugin's Kubernetes side: its ``trafficmgr_resources``
hands a fixed Table (made from the model's Services, so backends are real model objects) to
``translate.resources``, and its ``trafficmgr_port_protocols`` declares the backends' protocols as the
plugin does (``http``; ``grpc`` for the gRPC backend).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from trafficmgr.core.plugins import PluginHost
from trafficmgr.plugin import GATEWAY, Model, hookimpl
from trafficmgr.plugins.gateway_api import translate
from trafficmgr.plugins.gateway_api.table import (
    EXACT,
    MATCH_REGEX,
    REGEX,
    Backend,
    Chain,
    HeaderChanges,
    KeyMatch,
    Match,
    Mirror,
    Redirect,
    Rewrite,
    Route,
    ServedPort,
    Table,
    VirtualHost,
)

SERVICES = ("web", "api", "canary", "mirror", "labelled")
GRPC_SERVICE = "grpc"
HTTP_PORT, GRPC_PORT = 8080, 9090
ECHO = "/trafficmgr.echo.Echo/Echo"


def manifests(ips: dict[str, str], grpc_target_port: int = GRPC_PORT, http_target_port: int = HTTP_PORT) -> str:
    """Services (one port each) and one ready Pod per Service at ``ips[name]``; ``labelled`` carries
    circuit_breaker labels (a route hook must apply them); ``other/web`` exists in namespace ``other``."""
    docs = []
    for name in (*SERVICES, GRPC_SERVICE):
        port, target = (GRPC_PORT, grpc_target_port) if name == GRPC_SERVICE else (HTTP_PORT, http_target_port)
        labels = "{traffic.retries.5xx: '3', traffic.request.timeout: '9000'}" if name == "labelled" else "{}"
        docs.append(f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: p, port: {port}, targetPort: {target}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-1, namespace: default, labels: {{app: {name}}}}}
spec: {{nodeName: node-1, containers: [{{name: app, image: {name}}}]}}
status: {{phase: Running, podIP: {ips[name]}, conditions: [{{type: Ready, status: "True"}}]}}
""")
    return "---".join(docs)


def backend(model: Model, name: str, weight: int = 1, namespace: str = "default") -> Backend:
    """A usable backend: the model's Service ``name`` and its one port."""
    svc = model.services[(namespace, name)]
    return Backend(namespace, name, svc.ports[0].port, weight, svc, svc.ports[0])


def missing(weight: int = 1) -> Backend:
    """An unusable backend (a Service that does not exist): its share gets 500."""
    return Backend("default", "nowhere", 80, weight)


def to(model: Model, *names: str) -> tuple[Backend, ...]:
    return tuple(backend(model, n) for n in names)


def prefix(path: str, **kw: Any) -> Match:
    return Match("PathPrefix", path, **kw)


def http_routes(model: Model) -> tuple[VirtualHost, ...]:
    """The plain HTTP port's virtual hosts: every match kind, in precedence order, and every filter."""
    b = lambda *n: to(model, *n)  # noqa: E731
    matches = VirtualHost("match.example.com", (
        Route(Match(EXACT, "/exact"), b("web"), source="HTTPRoute/default/m/rule0/match0"),
        Route(prefix("/prefix/long"), b("api"), source="HTTPRoute/default/m/rule1/match0"),
        Route(prefix("/prefix/"), b("web"), source="HTTPRoute/default/m/rule2/match0"),
        Route(Match(REGEX, "/re/[0-9]+"), b("api"), source="HTTPRoute/default/m/rule3/match0"),
        # Two routes a request can match both of: the first (the plan's precedence) wins.
        Route(prefix("/", headers=(KeyMatch("X-Env", "canary"),)), b("canary"), source="HTTPRoute/default/m/rule4/match0"),
        Route(prefix("/", headers=(KeyMatch("x-ver", "v[0-9]", MATCH_REGEX),)), b("api"), source="HTTPRoute/default/m/rule5/match0"),
        Route(prefix("/", query=(KeyMatch("q", "yes"),)), b("canary"), source="HTTPRoute/default/m/rule6/match0"),
        Route(prefix("/", query=(KeyMatch("n", "[0-9]+", MATCH_REGEX),)), b("api"), source="HTTPRoute/default/m/rule7/match0"),
        Route(prefix("/", method="POST"), b("api"), source="HTTPRoute/default/m/rule8/match0"),
        Route(prefix("/"), b("web"), source="HTTPRoute/default/m/rule9/match0"),
    ))
    wildcard = VirtualHost("*.wild.example.com", (Route(prefix("/"), b("api"), source="HTTPRoute/default/w/rule0/match0"),))
    f = "HTTPRoute/default/f/rule"
    filters = VirtualHost("filters.example.com", (
        Route(prefix("/redirect-https"), redirect=Redirect(scheme="https", status_code=301), source=f + "0/match0"),
        Route(prefix("/redirect-host"), redirect=Redirect(hostname="other.example.com", port=8443, status_code=302,
                                                          path_type="ReplaceFullPath", path="/new"), source=f + "1/match0"),
        Route(prefix("/redirect-prefix"), redirect=Redirect(status_code=308, path_type="ReplacePrefixMatch", path="/moved"),
              source=f + "2/match0"),
        Route(prefix("/redirect-same-port"), redirect=Redirect(status_code=303), source=f + "3/match0"),
        Route(prefix("/redirect-http-port"), redirect=Redirect(scheme="http", port=80, status_code=307), source=f + "4/match0"),
        Route(prefix("/rewrite-prefix"), b("web"), rewrite=Rewrite("rewritten.example.com", "ReplacePrefixMatch", "/new"),
              source=f + "5/match0"),
        Route(prefix("/rewrite-strip"), b("web"), rewrite=Rewrite(None, "ReplacePrefixMatch", "/"), source=f + "6/match0"),
        Route(prefix("/rewrite-full"), b("web"), rewrite=Rewrite(None, "ReplaceFullPath", "/full"), source=f + "7/match0"),
        Route(prefix("/headers"), b("web"),
              request_headers=HeaderChanges(set=(("X-Set", "set-value"), ("Host", "set-host.example.com")),
                                            add=(("X-Add", "added"),), remove=("X-Remove",)),
              response_headers=HeaderChanges(set=(("X-Backend", "replaced"),), add=(("X-Resp-Add", "r"),),
                                             remove=("Content-Type",)),
              source=f + "8/match0"),
        Route(prefix("/mirror-all"), b("web"), mirrors=(Mirror(backend(model, "mirror")),), source=f + "9/match0"),
        Route(prefix("/mirror-half"), b("web"), mirrors=(Mirror(backend(model, "mirror"), 50.0), Mirror(missing())),
              source=f + "10/match0"),
        Route(prefix("/timeouts"), b("web"), timeout_ms=2000, backend_timeout_ms=500, source=f + "11/match0"),
        Route(prefix("/weights"), (backend(model, "web", 3), backend(model, "api", 1)), source=f + "12/match0"),
        Route(prefix("/partial"), (backend(model, "web", 1), missing(1)), source=f + "13/match0"),
        Route(prefix("/invalid"), (missing(1),), source=f + "14/match0"),
        Route(prefix("/no-backends"), (), source=f + "15/match0"),
        Route(prefix("/labelled"), b("labelled"), source=f + "16/match0"),
        Route(prefix("/labelled-timeout"), b("labelled"), timeout_ms=1500, source=f + "17/match0"),
    ))
    grpc = VirtualHost("grpc.example.com", (
        Route(Match(EXACT, ECHO), b(GRPC_SERVICE), grpc=True, source="GRPCRoute/default/g/rule0/match0"),
        Route(Match(REGEX, r"/trafficmgr\.echo\.Echo/Str[a-z]+"), b(GRPC_SERVICE), grpc=True,
              source="GRPCRoute/default/g/rule1/match0"),
    ))
    catch_all = VirtualHost("*", (Route(prefix("/"), b("web"), source="HTTPRoute/default/all/rule0/match0"),))
    return (matches, wildcard, filters, grpc, *rewrite_hosts(model), catch_all)


#: The specification's ReplacePrefixMatch table (HTTPPathModifier): (matched prefix, replacement) ->
#: {request path: modified path}. One virtual host per pair: ``rw<i>.example.com``.
REPLACE_PREFIX_CASES: tuple[tuple[str, str, dict[str, str]], ...] = tuple(
    (matched, repl, {"/foo/bar": "/xyz/bar" if repl.strip("/") else "/bar",
                     "/foo": "/xyz" if repl.strip("/") else "/",
                     "/foo/": "/xyz/" if repl.strip("/") else "/"})
    for matched in ("/foo", "/foo/") for repl in ("/xyz", "/xyz/", "", "/")
) + (("/", "/xyz", {"/bar": "/xyz/bar"}), ("/", "/", {"/bar": "/bar"}))


def rewrite_hosts(model: Model) -> tuple[VirtualHost, ...]:
    return tuple(
        VirtualHost(f"rw{i}.example.com", (Route(prefix(matched), to(model, "web"), rewrite=Rewrite(None, "ReplacePrefixMatch", repl),
                                                 source=f"HTTPRoute/default/rw{i}/rule0/match0"),))
        for i, (matched, repl, _) in enumerate(REPLACE_PREFIX_CASES)
    )


def https_chains(model: Model, pems: dict[str, tuple[bytes, bytes]]) -> tuple[Chain, ...]:
    """Three TLS chains: two by SNI (exact, wildcard) and a default certificate (any other SNI, or none),
    whose Secret lives in another namespace; ``pems[name] = (certificate, key)``."""
    b = lambda *n: to(model, *n)  # noqa: E731
    return (
        Chain("shop", (VirtualHost("shop.example.com", (Route(prefix("/"), b("web"), source="HTTPRoute/default/shop/rule0/match0"),)),),
              server_names=("shop.example.com",), secret=("default", "shop-tls"), cert_pem=pems["shop"][0], key_pem=pems["shop"][1]),
        Chain("blog", (VirtualHost("*.blog.example.com", (Route(prefix("/"), b("api"), source="HTTPRoute/default/blog/rule0/match0"),)),),
              server_names=("*.blog.example.com",), secret=("default", "blog-tls"), cert_pem=pems["blog"][0], key_pem=pems["blog"][1]),
        Chain("default", (VirtualHost("*", (Route(prefix("/"), b("canary"), source="HTTPRoute/default/any/rule0/match0"),)),),
              secret=("certs", "default-tls"), cert_pem=pems["default"][0], key_pem=pems["default"][1]),
    )


def full_table(model: Model, http_port: int, https_port: int, pems: dict[str, tuple[bytes, bytes]]) -> Table:
    """One HTTP port and one HTTPS port exercising every Table field."""
    return Table((
        ServedPort(http_port, "HTTP", (Chain("http", http_routes(model)),)),
        ServedPort(https_port, "HTTPS", https_chains(model, pems)),
    ))


class TablePlugin:
    """Test-only plugin: serves ``make_table(model)`` to the gateway view through ``translate.resources``."""

    def __init__(self, make_table: Callable[[Model], Table]) -> None:
        self.make_table = make_table

    @hookimpl
    def trafficmgr_port_protocols(self, model: Model, options: argparse.Namespace) -> list[tuple[str, str, int | str, str]]:
        out: list[tuple[str, str, int | str, str]] = [("default", n, HTTP_PORT, "http") for n in SERVICES]
        return out + [("default", GRPC_SERVICE, GRPC_PORT, "grpc")]

    @hookimpl
    def trafficmgr_resources(self, role: str, ctx: Any) -> list[Any]:
        if role != GATEWAY:
            return []
        return translate.resources(self.make_table(ctx.model), ctx)


def plugins(make_table: Callable[[Model], Table]) -> PluginHost:
    """The built-in plugins the translation works with (ingress: edge settings and options;
    circuit_breaker: route hooks) plus a :class:`TablePlugin`."""
    return PluginHost.load(["ingress", "circuit_breaker"], extra=[("gateway_api_table", TablePlugin(make_table))])


def options(**kw: Any) -> argparse.Namespace:
    from trafficmgr.core.translate.builder import default_options

    opts = default_options()
    opts.gateway_address = "127.0.0.1"
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts
