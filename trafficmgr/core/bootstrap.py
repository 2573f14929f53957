"""Envoy bootstrap generation: ADS over gRPC to the trafficmgr xDS server.

The result is a JSON-able dict (Envoy reads JSON or YAML bootstraps). ``stats_config`` is left at
Envoy's defaults unless extra tags are asked for, so Prometheus names keep Envoy's default tag
extraction (e.g. cluster ``9080|default|reviews.outbound`` ->
``envoy_cluster_outbound_upstream_rq_completed{envoy_cluster_name="9080|default|reviews"}``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from trafficmgr.core.model import is_ip

XDS_CLUSTER = "xds_cluster"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _xds_address(host: str, port: int) -> dict[str, Any]:
    """``unix:/path`` -> a pipe address (reachable from another network namespace), else host:port."""
    if host.startswith("unix:"):
        return {"pipe": {"path": host[len("unix:"):]}}
    return _socket_address(host, port)


@attrs.frozen(slots=True)
class XdsTls:
    """Client TLS of the xDS connection: PEM files as Envoy reads them (paths inside Envoy's filesystem).

    ``cert``/``key``: the proxy's client certificate (for ``serve --xds-auth mtls`` its URI SAN is
    ``spiffe://<trust domain>/ns/<namespace>/sa/<serviceaccount>``); ``ca``: the CA the xDS server's
    certificate must chain to; ``sni``: the server name sent (default: the xDS host when it is a name)."""

    cert: str
    key: str
    ca: str
    sni: str | None = None


@attrs.frozen(slots=True)
class XdsIdentityTls:
    """Client TLS of the xDS connection with the proxy's **workload identity** (mesh identity): the
    certificate, key and trust bundle are the files of :mod:`trafficmgr.core.identity.files` below Envoy's
    working directory, read through file-based SDS (relative paths), so a renewal applies without a
    restart and one bootstrap fits every proxy; the xDS server's certificate must chain to the mesh trust
    bundle (the control plane's serving certificate is issued by the mesh CA). ``server_name``: the DNS
    name the server's certificate must carry, also sent as SNI (default: the xDS host, as :class:`XdsTls`)."""

    server_name: str | None = None


_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def xds_transport_socket(tls: XdsTls | XdsIdentityTls, xds_host: str, more_hosts: Sequence[str] = ()) -> dict[str, Any]:
    """The xDS cluster's ``transport_socket``: TLS with the client certificate, ALPN ``h2`` (gRPC), the
    server's chain checked against ``tls.ca`` (or the mesh trust bundle) and, for a TCP address, its SAN
    against the host (a DNS name or an IP of ``--xds-address``: another certificate of the same CA, e.g. a
    proxy's, cannot pose as the control plane; with several replicas, ``more_hosts``, any of their hosts).
    Over ``unix:`` only the chain is checked (the socket path names the server)."""
    from trafficmgr.core.identity import files

    san: list[dict[str, Any]] = []
    host = xds_host.strip("[]")
    server_name = tls.server_name if isinstance(tls, XdsIdentityTls) else None
    if server_name:
        san = [{"san_type": "DNS", "matcher": {"exact": server_name}}]
    elif not xds_host.startswith("unix:"):
        for h in dict.fromkeys([host, *(m.strip("[]") for m in more_hosts)]):
            san.append({"san_type": "IP_ADDRESS" if is_ip(h) else "DNS", "matcher": {"exact": h}})
    common: dict[str, Any]
    if isinstance(tls, XdsIdentityTls):
        default: dict[str, Any] = {"match_typed_subject_alt_names": san} if san else {}
        common = {
            "tls_certificate_sds_secret_configs": [files.sds_config(files.CERT_SECRET)],
            "combined_validation_context": {"default_validation_context": default,
                                            "validation_context_sds_secret_config": files.sds_config(files.BUNDLE_SECRET)},
        }
    else:
        validation: dict[str, Any] = {"trusted_ca": {"filename": tls.ca}}
        if san:
            validation["match_typed_subject_alt_names"] = san
        common = {
            "tls_certificates": [{"certificate_chain": {"filename": tls.cert}, "private_key": {"filename": tls.key}}],
            "validation_context": validation,
        }
    common["alpn_protocols"] = ["h2"]
    context: dict[str, Any] = {"@type": _UPSTREAM_TLS, "common_tls_context": common}
    explicit = server_name if isinstance(tls, XdsIdentityTls) else tls.sni
    sni = explicit if explicit is not None else ("" if xds_host.startswith("unix:") or is_ip(host) else host)
    if sni:
        context["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def bootstrap(
    node_id: str,
    node_cluster: str,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    admin_address: str = "127.0.0.1",
    delta: bool = False,
    xds_source_address: str | None = None,
    static_resources: Mapping[str, Any] | None = None,
    stats_tags: Sequence[Mapping[str, Any]] | None = None,
    runtime: Mapping[str, Any] | None = None,
    locality: Mapping[str, str] | None = None,
    node_metadata: Mapping[str, Any] | None = None,
    xds_retry_base_s: float = 0.25,
    xds_retry_max_s: float = 3.0,
    xds_tls: XdsTls | XdsIdentityTls | None = None,
    xds_more: Sequence[tuple[str, int]] = (),
    xds_prefer_first: bool = False,
) -> dict[str, Any]:
    """An Envoy v3 bootstrap fetching CDS and LDS (and through them EDS/RDS/SDS) over one ADS stream.

    - ``delta``: ``DELTA_GRPC`` (incremental xDS) instead of ``GRPC`` (state of the world).
    - ``xds_source_address``: the local address the xDS connection is made from (``upstream_bind_config``).
    - ``static_resources``: merged into ``static_resources`` (``clusters``/``listeners`` lists are
      appended after the xDS cluster).
    - ``stats_tags``: extra ``TagSpecifier`` dicts; default tags stay on.
    - ``runtime``: keys of the static runtime layer. There is no admin runtime layer: ``/runtime_modify``
      cannot change anything (nor could it from outside the pod: admin is on loopback, see
      :func:`add_stats_listener`).
    - ``xds_retry_*``: reconnect backoff of the ADS stream when the control plane is away (or the replica
      it was connected to died: the next attempt picks another address).
    - ``xds_more``: further control-plane replicas (host, port) besides ``xds_host:xds_port`` (outside a
      cluster; in one, the control plane's Service name balances over the replicas). All must be IPs, or
      all DNS names; not ``unix:``. Envoy picks one per stream (round robin over the addresses, from a
      random start); a stream that breaks is re-established, after the retry backoff, to the next one, and
      meanwhile Envoy keeps serving its config. With ``xds_tls`` the server's SAN may be any of them.
    - ``xds_prefer_first``: with ``xds_more``, connect to ``xds_host`` while it is up and to the others
      only while it is down (priorities, with a TCP health check of every address every 2 s: a dead one
      counts as down within ~2 s).
    - ``xds_tls``: mutual TLS to the xDS server (``serve --xds-auth mtls``), see :func:`xds_transport_socket`:
      :class:`XdsTls` (PEM file paths) or :class:`XdsIdentityTls` (the workload identity files, through
      SDS relative to Envoy's working directory).
    Admin ``admin_port`` 0 lets Envoy pick a port (read it with ``--admin-address-path``). Admin serves
    mutating endpoints (``/quitquitquit``, ``/logging``, ``/drain_listeners``): callers keep it on
    loopback (sidecars and the gateway: ``127.0.0.1:15000`` inside the pod's network namespace) and expose
    only the read-only stats with :func:`add_stats_listener`.
    """
    addresses = [(xds_host, xds_port), *xds_more]
    if xds_more:
        if any(h.startswith("unix:") for h, _ in addresses):
            raise ValueError("several xDS addresses must all be HOST:PORT (not unix:/path)")
        if len({is_ip(h.strip("[]")) for h, _ in addresses}) > 1:
            raise ValueError("several xDS addresses must all be IPs or all DNS names")
        twice = [f"{h}:{p}" for i, (h, p) in enumerate(addresses) if (h, p) in addresses[:i]]
        if twice:
            raise ValueError(f"{twice[0]} is listed twice")
    elif xds_prefer_first:
        raise ValueError("preferring the first xDS address needs more than one")
    if xds_prefer_first:
        endpoints = [{"priority": min(i, 1), "lb_endpoints": [{"endpoint": {"address": _xds_address(h, p)}}]}
                     for i, (h, p) in enumerate(addresses)]
    else:
        endpoints = [{"lb_endpoints": [{"endpoint": {"address": _xds_address(h, p)}} for h, p in addresses]}]
    xds_cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if is_ip(xds_host.strip("[]")) or xds_host.startswith("unix:") else "STRICT_DNS",
        "connect_timeout": "1s",
        # ADS is gRPC: HTTP/2 must be explicit, Envoy defaults upstreams to HTTP/1.1.
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "15s", "timeout": "5s"},
                    }
                },
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": endpoints,
        },
    }
    if xds_prefer_first:
        # Priority 1 takes over only when priority 0 is unhealthy: a TCP connect check tells (no payload;
        # the gRPC server just sees a connection open and close).
        xds_cluster["health_checks"] = [{"timeout": "1s", "interval": "2s", "no_traffic_interval": "2s",
                                         "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}}]
    if xds_tls is not None:
        xds_cluster["transport_socket"] = xds_transport_socket(xds_tls, xds_host, [h for h, _ in xds_more])
    if xds_source_address:
        xds_cluster["upstream_bind_config"] = {"source_address": {"address": xds_source_address, "port_value": 0}}

    statics: dict[str, Any] = {"clusters": [xds_cluster], "listeners": []}
    for key, value in (static_resources or {}).items():
        if key in ("clusters", "listeners"):
            statics[key] = statics[key] + list(value)
        else:
            statics[key] = value
    if not statics["listeners"]:
        del statics["listeners"]

    ads_source = {"ads": {}, "resource_api_version": "V3"}
    node: dict[str, Any] = {
        "id": node_id,
        "cluster": node_cluster,
        "locality": dict(locality) if locality is not None else {"region": "local", "zone": "local"},
    }
    if node_metadata:
        node["metadata"] = dict(node_metadata)

    config: dict[str, Any] = {
        "node": node,
        "admin": {"address": _socket_address(admin_address, admin_port)},
        "static_resources": statics,
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            "retry_policy": {
                                "retry_back_off": {
                                    "base_interval": f"{xds_retry_base_s}s",
                                    "max_interval": f"{xds_retry_max_s}s",
                                }
                            },
                        }
                    }
                ],
            },
            "cds_config": dict(ads_source),
            "lds_config": dict(ads_source),
        },
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": dict(runtime or {})},
            ]
        },
    }
    if stats_tags:
        config["stats_config"] = {"use_all_default_tags": True, "stats_tags": [dict(t) for t in stats_tags]}
    return config


#: Defaults of the Envoy admin (loopback of the pod's network namespace) and of the stats-only listener.
ADMIN_ADDRESS = "127.0.0.1"
ADMIN_PORT = 15000
STATS_PORT = 8900
#: The stats-only listener and the static cluster it forwards to (admin).
STATS_LISTENER = "stats"
STATS_CLUSTER = "envoy_admin"
#: The only admin paths the stats listener forwards (GET and HEAD; the query string is not part of the
#: match, so ``/stats/prometheus?usedonly`` works).
STATS_PATHS = ("/stats/prometheus", "/ready")
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def stats_listener(address: str, port: int, admin_address: str = ADMIN_ADDRESS,
                   admin_port: int = ADMIN_PORT) -> tuple[dict[str, Any], dict[str, Any]]:
    """(listener, cluster): the stats-only listener on ``address:port`` and the static cluster to admin.

    Why this listener is safe on the pod network (and 0.0.0.0 for the gateway): it is an HTTP connection
    manager with a fixed route table and no other filter. Only ``GET``/``HEAD`` of the exact paths
    :data:`STATS_PATHS` reach admin (the path is matched without its query string, after Envoy's path
    normalisation; both endpoints only read). Those paths with another method get 405, every other path
    (``/quitquitquit``, ``/logging``, ``/runtime_modify``, ``/drain_listeners``, ``/config_dump``,
    ``/clusters``, ...) gets a local 404 and never reaches admin; CONNECT and upgrades are not configured,
    so they are refused too. Admin itself stays on loopback of the pod's network namespace. What remains
    visible from the network is what Prometheus scrapes (stat names: cluster, listener and route names)
    and readiness.
    """
    if not 0 < admin_port < 65536:
        raise ValueError(f"the stats listener needs a fixed admin port (got {admin_port})")
    if not 0 < port < 65536:
        raise ValueError(f"stats port must be 1..65535 (got {port})")
    safe = {"name": ":method", "string_match": {"safe_regex": {"regex": "^(GET|HEAD)$"}}}
    routes: list[dict[str, Any]] = []
    for path in STATS_PATHS:
        routes.append({"match": {"path": path, "headers": [safe]},
                       "route": {"cluster": STATS_CLUSTER, "timeout": "30s"}})
        routes.append({"match": {"path": path}, "direct_response": {"status": 405},
                       "response_headers_to_add": [{"header": {"key": "allow", "value": "GET, HEAD"}}]})
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    listener = {
        "name": STATS_LISTENER,
        "address": _socket_address(address, port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": _HCM,
            "stat_prefix": STATS_LISTENER,
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "REJECT_REQUEST",
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
            "route_config": {"name": STATS_LISTENER, "virtual_hosts": [
                {"name": STATS_LISTENER, "domains": ["*"], "routes": routes}]},
        }}]}],
    }
    cluster = {
        "name": STATS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": STATS_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket_address(admin_address, admin_port)}}]}]},
    }
    return listener, cluster


def add_stats_listener(config: dict[str, Any], address: str, port: int = STATS_PORT) -> dict[str, Any]:
    """Add :func:`stats_listener` on ``address:port`` to the bootstrap ``config`` (in place; returned),
    forwarding to the admin address of ``config``. Raises ``ValueError`` when admin has no fixed port."""
    admin = config["admin"]["address"]["socket_address"]
    listener, cluster = stats_listener(address, port, admin["address"], admin["port_value"])
    statics = config.setdefault("static_resources", {})
    statics.setdefault("listeners", []).append(listener)
    statics.setdefault("clusters", []).append(cluster)
    return config


def write_bootstrap(path: str | os.PathLike[str], **kw: Any) -> dict[str, Any]:
    """Write :func:`bootstrap` ``(**kw)`` as JSON to ``path``; returns the dict."""
    config = bootstrap(**kw)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return config
