"""421 Misdirected Request on the gateway's SNI chains.

A TLS filter chain chosen by SNI serves only the hosts of its certificate (its ``server_names``, which
are the Ingress ``spec.tls[].hosts`` that chose it). A request on that connection for any other
``Host``/``:authority`` -- HTTP/2 connection coalescing by a browser, or plain Host spoofing to reach
another tenant's backend without its certificate -- gets ``421`` and is routed nowhere (RFC 9110
15.5.20: the client retries on a new connection, with the right SNI).

How (Envoy has no SNI/Host check of its own; this is the per-filter-chain route table Envoy's
maintainers and Contour use): every SNI chain's connection manager reads its own RouteConfiguration
``ingress|<chain name>`` holding only the virtual hosts for its certificate's hosts, each with exactly
the routes the shared ``ingress`` configuration has for those hosts, and a catch-all virtual host that
answers 421 with ``direct_response``. A wildcard certificate host ``*.d`` covers exactly one more DNS
label (as Kubernetes and TLS define it): Envoy's ``*.d`` domain also matches ``a.b.d``, so each route of
such a virtual host also requires that ``:authority`` has one label more, and the rest gets 421.

Chains without ``server_names`` (a default certificate: TLS without SNI or with a name no chain has)
keep the shared configuration: that certificate's hosts are not known. Plain HTTP has no certificate and
keeps the shared configuration too.

Cost: one more RouteConfiguration (RDS resource) per SNI chain, i.e. per TLS Secret; together they
repeat each TLS host's virtual host once (RDS bytes and Envoy memory at most about twice the shared
configuration when every host has TLS). A change of routes re-sends the shared and the affected chain
configurations, never the listener.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from trafficmgr.plugin import pack

MISDIRECTED = 421
MISDIRECTED_BODY = "trafficmgr: misdirected request: this host is not served by the TLS certificate of this connection\n"
CATCH_ALL_NAME = "misdirected"


def route_config_name(shared: str, chain_name: str) -> str:
    return f"{shared}|{chain_name}"


def one_label_regex(wildcard: str) -> str:
    """``*.foo.com`` -> a case-insensitive RE2 matching exactly one more DNS label (port stripped before)."""
    return r"(?i)^[^.]+" + re.escape(wildcard[1:]) + "$"


def _envoy_pick(host: str, by_domain: dict[str, route_components_pb2.VirtualHost]) -> route_components_pb2.VirtualHost | None:
    """The virtual host Envoy selects for a concrete ``host`` among ``by_domain`` (exact, then the
    longest ``*.suffix``, then ``*``)."""
    if host in by_domain:
        return by_domain[host]
    wildcards = sorted((d for d in by_domain if d.startswith("*.") and host.endswith(d[1:]) and len(host) > len(d) - 1),
                       key=len, reverse=True)
    if wildcards:
        return by_domain[wildcards[0]]
    return by_domain.get("*")


def _covered(host: str, cert_hosts: Iterable[str]) -> bool:
    """Whether a route-table domain ``host`` lies wholly inside the certificate hosts."""
    for c in cert_hosts:
        if host == c:
            return True
        if c.startswith("*.") and not host.startswith("*.") and host.endswith(c[1:]) and "." not in host[: -len(c) + 1]:
            return True
    return False


def chain_route_configuration(shared: route_pb2.RouteConfiguration, name: str,
                              cert_hosts: Iterable[str]) -> route_pb2.RouteConfiguration:
    """``shared`` restricted to ``cert_hosts`` (exact names and ``*.`` wildcards), the rest 421."""
    hosts = sorted({h.lower() for h in cert_hosts if h})
    rc = route_pb2.RouteConfiguration(name=name)
    rc.validate_clusters.CopyFrom(shared.validate_clusters)
    by_domain = {d: vh for vh in shared.virtual_hosts for d in vh.domains}
    used: set[str] = set()
    # 1. Shared virtual hosts whose domains lie inside the certificate: as they are.
    for vh in shared.virtual_hosts:
        domains = [d for d in vh.domains if d != "*" and _covered(d, hosts)]
        if not domains:
            continue
        out = rc.virtual_hosts.add()
        out.CopyFrom(vh)
        del out.domains[:]
        out.domains.extend(domains)
        used.update(domains)
        for d in domains:
            if d.startswith("*."):
                _only_one_label(out, d)
    # 2. Certificate hosts no shared domain names: the routes Envoy would pick for them in ``shared``.
    for h in hosts:
        if h in used:
            continue
        sample = ("x" + h[1:]) if h.startswith("*.") else h
        picked = _envoy_pick(sample, by_domain)
        out = rc.virtual_hosts.add(name=h, domains=[h])
        if picked is not None:
            out.routes.extend(picked.routes)
        if h.startswith("*."):
            _only_one_label(out, h)
        used.add(h)
    # 3. Everything else: not this certificate's host.
    catch_all = rc.virtual_hosts.add(name=CATCH_ALL_NAME, domains=["*"])
    catch_all.routes.append(_misdirected_route())
    return rc


def _only_one_label(vh: route_components_pb2.VirtualHost, wildcard: str) -> None:
    """Each route of ``vh`` also requires ``:authority`` to be one label under ``wildcard``; other
    hosts Envoy's wildcard lets in (``a.b.<domain>``) get 421."""
    regex = one_label_regex(wildcard)
    for r in vh.routes:
        if any(h.name == ":authority" and h.string_match.safe_regex.regex == regex for h in r.match.headers):
            continue
        h = r.match.headers.add(name=":authority")
        h.string_match.safe_regex.regex = regex
    vh.routes.append(_misdirected_route())


def _misdirected_route() -> route_components_pb2.Route:
    r = route_components_pb2.Route(name=CATCH_ALL_NAME)
    r.match.prefix = "/"
    r.direct_response.status = MISDIRECTED
    r.direct_response.body.inline_string = MISDIRECTED_BODY
    return r


def split_routes(lst: listener_pb2.Listener, shared: route_pb2.RouteConfiguration) -> list[route_pb2.RouteConfiguration]:
    """Point every TLS chain with ``server_names`` at its own route configuration (returned) built from
    ``shared``; the connection managers of other chains keep reading ``shared``."""
    out = []
    for chain in lst.filter_chains:
        names = list(chain.filter_chain_match.server_names)
        if chain.filter_chain_match.transport_protocol != "tls" or not names:
            continue
        name = route_config_name(shared.name, chain.name)
        for f in chain.filters:
            if not f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                continue
            hcm = hcm_pb2.HttpConnectionManager()
            f.typed_config.Unpack(hcm)
            if hcm.WhichOneof("route_specifier") != "rds" or hcm.rds.route_config_name != shared.name:
                continue
            hcm.rds.route_config_name = name
            f.typed_config.CopyFrom(pack(hcm))
            out.append(chain_route_configuration(shared, name, names))
    return out
