"""Tracing (Zipkin or OpenTelemetry) on sidecar and gateway HTTP connection managers.

Two providers (``--tracing-provider``): ``zipkin`` (the default, kept for compatibility) needs
``trafficmgr serve --zipkin-address host:port`` and becomes cluster ``zipkin`` (JSON API v2, B3 headers);
``opentelemetry`` needs ``--otlp-address host:port`` and becomes cluster ``otlp`` (OTLP over gRPC, h2c;
W3C ``traceparent``/``tracestate`` headers). Without the provider's address the labels do nothing and one
log line says so. A connection manager that serves one
service port (sidecar outbound chains) traces only when that service has ``traffic.tracing.enabled``;
a shared one (the gateway's, the sidecars' ``inbound`` one) has tracing on with 0 % sampling: on the
gateway the routes of traced services carry their own sampling, and a sidecar's inbound side reports the
server span of every call its caller sampled (Envoy's Zipkin tracer follows ``x-b3-sampled``).
Applications must propagate the trace headers (B3 ``x-b3-*`` for Zipkin, ``traceparent``/``tracestate``
for OpenTelemetry, and ``x-request-id``) from incoming to outgoing requests for spans to join one trace, as
with Istio. Envoy 1.40's OpenTelemetry tracer reads and writes only the W3C headers (no B3).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.trace.v3 import opentelemetry_pb2, zipkin_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from trafficmgr.plugin import SIDECAR, LabelSpec, duration_ms, hookimpl, int_at_least, pack, percent_fraction, socket_address
from trafficmgr.plugin import labels as L

if TYPE_CHECKING:
    from envoy.config.route.v3.route_components_pb2 import Route
    from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
        HttpConnectionManager,
    )

    from trafficmgr.plugin import BuildContext, Resource, Service, ServicePort

log = logging.getLogger(__name__)

ENABLED = "traffic.tracing.enabled"
SAMPLING = "traffic.tracing.sampling"
ON = frozenset({L.POD, L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(ENABLED, ON, L.boolean(), False,
                  "trace requests to or from Envoy-enabled pods of this service (Zipkin or OpenTelemetry)"),
        LabelSpec(SAMPLING, ON, L.number(0, 100), 100.0, "sampling percentage"),
    ]


ZIPKIN = "zipkin"
OPENTELEMETRY = "opentelemetry"
PROVIDERS = (ZIPKIN, OPENTELEMETRY)
COLLECTOR_CLUSTER = "zipkin"
COLLECTOR_ENDPOINT = "/api/v2/spans"
TRACER = "envoy.tracers.zipkin"
OTLP_CLUSTER = "otlp"
OTLP_TRACER = "envoy.tracers.opentelemetry"
#: The resource ``service.name`` of OTLP spans, per view (views are shared by many proxies, so the
#: proxy itself is named by the ``node_id`` attribute Envoy puts on every span).
OTLP_SERVICE_NAME = "trafficmgr-{role}"
#: Envoy's own defaults for the span buffers (runtime keys below): flush every 5 spans or 5 s.
DEFAULT_FLUSH_SPANS = 5
DEFAULT_FLUSH_INTERVAL_MS = 5000
RUNTIME_FLUSH_SPANS = "tracing.zipkin.min_flush_spans"
RUNTIME_FLUSH_INTERVAL = "tracing.zipkin.flush_interval_ms"
OTLP_RUNTIME_FLUSH_SPANS = "tracing.opentelemetry.min_flush_spans"
OTLP_RUNTIME_FLUSH_INTERVAL = "tracing.opentelemetry.flush_interval_ms"

_warned_no_collector = False


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536 or any(c in host for c in "/ "):
        raise ValueError(f"{text!r} is not host:port (for example zipkin.tracing:9411)")
    return host, int(port_text)


def _address_arg(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


@hookimpl
def trafficmgr_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    # serve builds the collector cluster from the address; agent and bootstrap write the address (the
    # sidecar's service name) and the flushing into the bootstraps they make.
    group = parser.add_argument_group("tracing plugin")
    group.add_argument("--tracing-provider", choices=PROVIDERS, default=ZIPKIN,
                       help="span format and headers: zipkin (JSON API v2, B3 headers; the default) or "
                            "opentelemetry (OTLP/gRPC, W3C traceparent)")
    group.add_argument("--zipkin-address", type=_address_arg, metavar="HOST:PORT",
                       help="Zipkin collector (API v2) that Envoys send spans to; without it tracing labels do nothing")
    group.add_argument("--otlp-address", type=_address_arg, metavar="HOST:PORT",
                       help="OpenTelemetry collector (OTLP gRPC, plaintext h2c) for --tracing-provider opentelemetry")
    if command == "serve":
        return
    # --tracing-flush-* name what applies to either provider; --zipkin-flush-* are the older spellings (one
    # option each, sharing the destination, so an error names the option the user typed).
    for name, dest, default, metavar, text in (
            ("flush-spans", "zipkin_flush_spans", DEFAULT_FLUSH_SPANS, "N",
             f"Envoy sends buffered spans every N spans (bootstrap runtime of the selected provider; "
             f"default {DEFAULT_FLUSH_SPANS})"),
            ("flush-interval", "zipkin_flush_interval", DEFAULT_FLUSH_INTERVAL_MS, "MS",
             f"... or every MS milliseconds (bootstrap runtime; default {DEFAULT_FLUSH_INTERVAL_MS})")):
        group.add_argument(f"--tracing-{name}", dest=dest, type=int_at_least(1), default=default, metavar=metavar, help=text)
        group.add_argument(f"--zipkin-{name}", dest=dest, type=int_at_least(1), default=default, metavar=metavar,
                           help=f"the same as --tracing-{name}")

def provider(options: argparse.Namespace) -> str:
    """The selected provider (``zipkin`` unless ``--tracing-provider opentelemetry``)."""
    return OPENTELEMETRY if getattr(options, "tracing_provider", None) == OPENTELEMETRY else ZIPKIN


def collector(options: argparse.Namespace) -> tuple[str, int] | None:
    """The selected provider's collector address (``--zipkin-address`` or ``--otlp-address``), or None (no
    option, or a malformed one: logged)."""
    option = "otlp_address" if provider(options) == OPENTELEMETRY else "zipkin_address"
    text = getattr(options, option, None)
    if not text:
        return None
    try:
        return parse_address(text)
    except ValueError as exc:
        log.error("tracing disabled: --%s %s", option.replace("_", "-"), exc)
        return None


def traced(service: Service) -> bool:
    return bool(service.labels.value(ENABLED, False))


def _sampling(service: Service) -> float:
    return float(service.labels.value(SAMPLING, 100.0))


def _warn_no_collector() -> None:
    global _warned_no_collector
    if not _warned_no_collector:
        _warned_no_collector = True
        log.warning("services are labeled %s=true but trafficmgr serve has no --zipkin-address "
                    "(or --tracing-provider opentelemetry and no --otlp-address): tracing is off", ENABLED)


def collector_cluster(host: str, port: int, name: str = COLLECTOR_CLUSTER) -> cluster_pb2.Cluster:
    """STATIC for an IP address, STRICT_DNS for a name. The ``otlp`` cluster speaks HTTP/2 (gRPC)."""
    c = cluster_pb2.Cluster(name=name, connect_timeout=duration_ms(1000))
    try:
        ipaddress.ip_address(host)
        c.type = cluster_pb2.Cluster.STATIC
    except ValueError:
        c.type = cluster_pb2.Cluster.STRICT_DNS
        c.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    c.load_assignment.cluster_name = name
    lb = c.load_assignment.endpoints.add().lb_endpoints.add()
    lb.endpoint.address.CopyFrom(socket_address(host, port))
    if name == OTLP_CLUSTER:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        options.explicit_http_config.http2_protocol_options.SetInParent()
        c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(pack(options))
    return c


@hookimpl
def trafficmgr_resources(ctx: BuildContext) -> list[Resource]:
    """The collector cluster (``zipkin`` or ``otlp``), in every view, when the provider's address is set."""
    address = collector(ctx.options)
    if address is None:
        return []
    name = OTLP_CLUSTER if provider(ctx.options) == OPENTELEMETRY else COLLECTOR_CLUSTER
    memo = ctx.memo.get("tracing.collector")
    if memo is None or memo[0] != (address, name):
        memo = ((address, name), ctx.resource(collector_cluster(*address, name=name), name))
        ctx.memo["tracing.collector"] = memo
    return [memo[1]]


def _provider(hcm: HttpConnectionManager, ctx: BuildContext) -> None:
    if provider(ctx.options) == OPENTELEMETRY:
        otel = opentelemetry_pb2.OpenTelemetryConfig(service_name=OTLP_SERVICE_NAME.format(role=ctx.role))
        otel.grpc_service.envoy_grpc.cluster_name = OTLP_CLUSTER
        otel.grpc_service.timeout.CopyFrom(duration_ms(1000))
        hcm.tracing.provider.name = OTLP_TRACER
        hcm.tracing.provider.typed_config.CopyFrom(pack(otel))
        return
    zipkin = zipkin_pb2.ZipkinConfig(
        collector_cluster=COLLECTOR_CLUSTER,
        collector_endpoint=COLLECTOR_ENDPOINT,
        collector_endpoint_version=zipkin_pb2.ZipkinConfig.HTTP_JSON,
    )
    hcm.tracing.provider.name = TRACER
    hcm.tracing.provider.typed_config.CopyFrom(pack(zipkin))


@hookimpl
def trafficmgr_http_connection_manager(hcm: HttpConnectionManager, service: Service | None, ctx: BuildContext) -> None:
    """Tracing (the selected provider): for one traced service (``service``) at its sampling; for a shared connection
    manager (any role, ``service`` None) on with 0 % sampling, so that only routes of traced services are
    sampled."""
    if service is not None and not traced(service):
        return
    if collector(ctx.options) is None:
        if service is not None:
            _warn_no_collector()
        return
    _provider(hcm, ctx)
    if service is not None:
        hcm.tracing.random_sampling.value = _sampling(service)
    else:
        hcm.tracing.random_sampling.value = 0.0
        hcm.tracing.client_sampling.value = 0.0


@hookimpl
def trafficmgr_route(route: Route, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """Routes to a traced service carry its sampling (it overrides a shared connection manager's 0 %)."""
    if not traced(service) or collector(ctx.options) is None:
        return
    # TEN_THOUSAND, not MILLION: Envoy compares against (request id % 10000), so with a MILLION
    # denominator any share above 1 % would sample every request.
    route.tracing.random_sampling.CopyFrom(percent_fraction(_sampling(service), "TEN_THOUSAND"))


@hookimpl
def trafficmgr_bootstrap(bootstrap: dict[str, Any], role: str, options: argparse.Namespace) -> None:
    """Span buffer flushing of the selected provider (static runtime: Envoy reads it at startup) and, for
    sidecars whose node cluster is generic, the node id as the Zipkin service name (Envoy reports its node
    cluster)."""
    otel = provider(options) == OPENTELEMETRY
    changed: dict[str, int] = {}
    for key, option, default in ((OTLP_RUNTIME_FLUSH_SPANS if otel else RUNTIME_FLUSH_SPANS, "zipkin_flush_spans",
                                  DEFAULT_FLUSH_SPANS),
                                 (OTLP_RUNTIME_FLUSH_INTERVAL if otel else RUNTIME_FLUSH_INTERVAL, "zipkin_flush_interval",
                                  DEFAULT_FLUSH_INTERVAL_MS)):
        value = int(getattr(options, option, default))
        if value != default:
            changed[key] = value
    if changed:
        for layer in bootstrap.setdefault("layered_runtime", {}).setdefault("layers", []):
            if "static_layer" in layer:
                layer["static_layer"].update(changed)
                break
        else:
            bootstrap["layered_runtime"]["layers"].insert(0, {"name": "static", "static_layer": changed})
    node = bootstrap.get("node") or {}
    if role == SIDECAR and node.get("id") and node.get("cluster") in (None, "", SIDECAR) and collector(options):
        node["cluster"] = node["id"]


def traces_url(collector_url: str, namespace: str, name: str, limit: int = 10) -> str:
    """The built-in collector's query for the recent traces that reached Service ``namespace/name``
    (``trafficmgr zipkin``: ``GET /api/v2/traces?meshService=<name>.<namespace>``, which matches spans whose
    ``upstream_cluster`` tag is one of the Service's outbound clusters, ``<port>|<namespace>|<name>.outbound``,
    whichever provider sent them). ``collector_url`` is the collector's base URL (``http://127.0.0.1:9411``)."""
    from urllib.parse import urlencode

    query = urlencode({"meshService": f"{name}.{namespace}", "limit": limit})
    return f"{collector_url.rstrip('/')}/api/v2/traces?{query}"


__all__ = ["COLLECTOR_CLUSTER", "ENABLED", "OPENTELEMETRY", "OTLP_CLUSTER", "SAMPLING", "ZIPKIN", "collector",
           "collector_cluster", "parse_address", "provider", "traced", "traces_url"]
