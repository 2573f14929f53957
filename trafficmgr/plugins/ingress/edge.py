"""Edge-proxy settings of the gateway (never of sidecars), after Envoy's "Configuring Envoy as an edge
proxy" best practices: the gateway takes connections from the internet, so client input is untrusted.

Connection manager (every chain of the gateway listener: the TLS chains copy the plain chain's):

- ``normalize_path`` + ``merge_slashes``: ``//a/../b`` is routed *and forwarded* as ``/b``, so the
  gateway's path matching and the backend see the same path (no path-confusion past a prefix rule).
- ``path_with_escaped_slashes_action`` (``--gateway-escaped-slashes``, default UNESCAPE_AND_REDIRECT:
  browsers follow the redirect, so ``/a%2F..%2Fb`` cannot mean two things).
- ``headers_with_underscores_action: REJECT_REQUEST`` (400): backends that treat ``_`` and ``-`` alike
  cannot be handed a header that bypassed a check on its ``-`` spelling.
- ``use_remote_address`` (the gateway already set it): x-forwarded-for gets the client's address
  appended and client-sent ``x-envoy-*`` headers are not trusted; ``--gateway-xff-trusted-hops N`` when
  the gateway sits behind N proxies that append to x-forwarded-for (default 0: a client's own
  x-forwarded-for is kept in the header but never taken as the client address).
- HTTP/2: at most ``--gateway-max-concurrent-streams`` (100) streams per connection, 64 KiB initial
  stream window, 1 MiB connection window (what one client can make Envoy buffer).
- ``request_headers_timeout`` (``--gateway-request-headers-timeout``, 10 s: slow-loris headers) and the
  connection ``idle_timeout`` (``--gateway-idle-timeout``, 3600 s); the stream idle timeout (300 s) is
  every connection manager's (``core/translate/http.py``).
- Listener ``per_connection_buffer_limit_bytes``: 32 KiB.

Bootstrap (``trafficmgr bootstrap --node-cluster traffic-ingress``, and local mode's gateway): an
overload manager with a fixed-heap monitor (``--gateway-max-heap-bytes``: shrink the heap at 95 %, stop
accepting requests at 98 %) and a global downstream connection limit (``--gateway-max-connections``).
"""

from __future__ import annotations

import argparse
from typing import Any

from envoy.config.core.v3 import protocol_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from trafficmgr.plugin import int_at_least, positive_seconds

MAX_CONCURRENT_STREAMS = 100
INITIAL_STREAM_WINDOW = 64 * 1024
INITIAL_CONNECTION_WINDOW = 1024 * 1024
REQUEST_HEADERS_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 3600.0
BUFFER_LIMIT = 32 * 1024
ESCAPED_SLASHES = "UNESCAPE_AND_REDIRECT"
ESCAPED_SLASHES_CHOICES = ("KEEP_UNCHANGED", "REJECT_REQUEST", "UNESCAPE_AND_REDIRECT", "UNESCAPE_AND_FORWARD")
#: 384 MiB: 3/4 of the chart's gateway memory limit (512Mi), so Envoy sheds load before the kernel kills it.
MAX_HEAP_BYTES = 384 * 1024 * 1024
MIN_HEAP_BYTES = 16 * 1024 * 1024
MAX_CONNECTIONS = 50000
SHRINK_HEAP_AT = 0.95
STOP_ACCEPTING_AT = 0.98

FIXED_HEAP = "envoy.resource_monitors.fixed_heap"
DOWNSTREAM_CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"

#: Option name -> default (read with :func:`value`; the options may come without them, e.g. in tests).
DEFAULTS: dict[str, Any] = {
    "gateway_max_concurrent_streams": MAX_CONCURRENT_STREAMS,
    "gateway_request_headers_timeout": REQUEST_HEADERS_TIMEOUT_S,
    "gateway_idle_timeout": IDLE_TIMEOUT_S,
    "gateway_escaped_slashes": ESCAPED_SLASHES,
    "gateway_xff_trusted_hops": 0,
    "gateway_max_heap_bytes": MAX_HEAP_BYTES,
    "gateway_max_connections": MAX_CONNECTIONS,
}


def value(options: argparse.Namespace, name: str) -> Any:
    got = getattr(options, name, None)
    return DEFAULTS[name] if got is None else got


def add_serve_arguments(group: argparse._ArgumentGroup) -> None:
    """The connection-manager settings (``trafficmgr serve`` builds the gateway's listener)."""
    group.add_argument("--gateway-max-concurrent-streams", type=int_at_least(1), default=MAX_CONCURRENT_STREAMS,
                       help=f"HTTP/2 streams per client connection on the gateway (default {MAX_CONCURRENT_STREAMS})")
    group.add_argument("--gateway-request-headers-timeout", type=positive_seconds, default=REQUEST_HEADERS_TIMEOUT_S,
                       help="seconds a client has to send a request's headers (default 10)")
    group.add_argument("--gateway-idle-timeout", type=positive_seconds, default=IDLE_TIMEOUT_S,
                       help="seconds a client connection without requests stays open (default 3600)")
    group.add_argument("--gateway-escaped-slashes", choices=ESCAPED_SLASHES_CHOICES, default=ESCAPED_SLASHES,
                       help="what the gateway does with %%2F / %%5C in paths (default UNESCAPE_AND_REDIRECT; "
                            "REJECT_REQUEST for gRPC-only gateways, KEEP_UNCHANGED for backends that need them)")
    group.add_argument("--gateway-xff-trusted-hops", type=int_at_least(0), default=0,
                       help="proxies in front of the gateway that append to x-forwarded-for (default 0: the "
                            "TCP peer is the client)")


def add_bootstrap_arguments(group: argparse._ArgumentGroup) -> None:
    """The overload manager's limits (``trafficmgr bootstrap`` writes them into the gateway's bootstrap)."""
    group.add_argument("--gateway-max-heap-bytes", type=int_at_least(MIN_HEAP_BYTES), default=MAX_HEAP_BYTES,
                       help=f"gateway Envoy heap limit for the overload manager (default {MAX_HEAP_BYTES}, 384 MiB; "
                            "set it to about 3/4 of the container's memory limit)")
    group.add_argument("--gateway-max-connections", type=int_at_least(1), default=MAX_CONNECTIONS,
                       help=f"client connections the gateway Envoy accepts in total (default {MAX_CONNECTIONS})")


def harden_hcm(hcm: hcm_pb2.HttpConnectionManager, options: argparse.Namespace) -> None:
    """Apply the edge settings of the module docstring to the gateway's connection manager."""
    hcm.use_remote_address.value = True
    hops = int(value(options, "gateway_xff_trusted_hops"))
    if hops:
        hcm.xff_num_trusted_hops = hops
    hcm.normalize_path.value = True
    hcm.merge_slashes = True
    hcm.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.PathWithEscapedSlashesAction.Value(
        str(value(options, "gateway_escaped_slashes")))
    common = hcm.common_http_protocol_options
    common.headers_with_underscores_action = protocol_pb2.HttpProtocolOptions.REJECT_REQUEST
    common.idle_timeout.FromMilliseconds(round(float(value(options, "gateway_idle_timeout")) * 1000))
    hcm.request_headers_timeout.FromMilliseconds(round(float(value(options, "gateway_request_headers_timeout")) * 1000))
    h2 = hcm.http2_protocol_options
    h2.max_concurrent_streams.value = int(value(options, "gateway_max_concurrent_streams"))
    h2.initial_stream_window_size.value = INITIAL_STREAM_WINDOW
    h2.initial_connection_window_size.value = INITIAL_CONNECTION_WINDOW


def harden_listener(lst: listener_pb2.Listener) -> None:
    """What one client connection may make Envoy buffer (read and write side)."""
    lst.per_connection_buffer_limit_bytes.value = BUFFER_LIMIT


def overload_manager(options: argparse.Namespace) -> dict[str, Any]:
    """The bootstrap's ``overload_manager`` (JSON): heap monitor + actions, global connection limit."""
    heap = int(value(options, "gateway_max_heap_bytes"))
    connections = int(value(options, "gateway_max_connections"))

    def trigger(at: float) -> list[dict[str, Any]]:
        return [{"name": FIXED_HEAP, "threshold": {"value": at}}]

    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {"name": FIXED_HEAP, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": str(heap)}},
            {"name": DOWNSTREAM_CONNECTIONS, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                         "DownstreamConnectionsConfig",
                "max_active_downstream_connections": str(connections)}},
        ],
        "actions": [
            {"name": "envoy.overload_actions.shrink_heap", "triggers": trigger(SHRINK_HEAP_AT)},
            {"name": "envoy.overload_actions.stop_accepting_requests", "triggers": trigger(STOP_ACCEPTING_AT)},
        ],
    }


def add_overload_manager(bootstrap: dict[str, Any], options: argparse.Namespace) -> None:
    """Merge :func:`overload_manager` into ``bootstrap`` (monitors or actions of the same name already
    there are kept: whoever set them knew better)."""
    mine = overload_manager(options)
    om = bootstrap.setdefault("overload_manager", {})
    om.setdefault("refresh_interval", mine["refresh_interval"])
    for key in ("resource_monitors", "actions"):
        present = {m.get("name") for m in om.get(key, [])}
        om.setdefault(key, []).extend(m for m in mine[key] if m["name"] not in present)
