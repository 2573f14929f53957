"""The public plugin API: everything a trafficmgr plugin may import, and nothing else.

Plugins (built-in and third-party) import from this module only; ``trafficmgr.core`` is internal and
changes without notice. The hook contract itself is ``trafficmgr.core.hookspecs`` (documented in
docs/plugins.md)::

    from trafficmgr.plugin import LabelSpec, hookimpl, labels

    @hookimpl
    def trafficmgr_labels():
        return [LabelSpec("traffic.example.header", frozenset({labels.SERVICE}), labels.token(), "", "adds a header")]

    @hookimpl
    def trafficmgr_virtual_host(vhost, service, port, role):
        value = service.labels.value("traffic.example.header")
        if value:
            vhost.response_headers_to_add.add().header.key = value

A module attribute ``TRAFFICMGR_REQUIRES = ">=0.2,<0.3"`` declares the trafficmgr versions a plugin
supports; ``TRAFFICMGR_DEPENDS = ("ingress",)`` the plugins it builds on (selecting it without them is
a startup error).
"""

from __future__ import annotations

from trafficmgr import __version__, hookimpl
from trafficmgr.core import labels
from trafficmgr.core.argtypes import int_at_least, listen_port, port, positive_seconds
from trafficmgr.core.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Resource
from trafficmgr.core.contrib import (
    ALL_CHAINS,
    ORDER_DEFAULT,
    ORDER_ROUTER,
    TCP_CHAINS,
    HttpFilter,
    NetworkFilter,
    ObjectStatus,
    ServiceRoutes,
    WatchKind,
)
from trafficmgr.core.corelabels import ENVOY_ENABLED
from trafficmgr.core.identity import files as identity_files
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.model import (
    DIRECT,
    GATEWAY,
    GRPC,
    HTTP,
    HTTP2,
    HTTP_PROTOCOLS,
    PORT_PREFIX,
    SHARED,
    SIDECAR,
    TCP,
    Endpoint,
    Labels,
    Model,
    ObjectRef,
    Pod,
    Service,
    ServicePort,
    is_ip,
    load_balancer_addresses,
)
from trafficmgr.core.protos import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    HCM_FILTER,
    MAX_DURATION_MS,
    TCP_PROXY_FILTER,
    UINT32_MAX,
    ads_config_source,
    duration_ms,
    fraction,
    pack,
    percent_fraction,
    socket_address,
    uint32,
)
from trafficmgr.core.tlspem import tls_pem_error
from trafficmgr.core.translate.context import BuildContext, EndpointPair

__all__ = [
    "ALL_CHAINS", "CLUSTER", "DEFAULT_CONNECT_TIMEOUT_MS", "DIRECT", "ENDPOINT", "ENVOY_ENABLED", "GATEWAY", "GRPC", "HCM_FILTER",
    "HTTP", "HTTP2", "HTTP_PROTOCOLS", "LISTENER", "MAX_DURATION_MS", "ORDER_DEFAULT", "ORDER_ROUTER", "PORT_PREFIX", "ROUTE", "SECRET",
    "SHARED", "SIDECAR", "TCP", "TCP_CHAINS", "TCP_PROXY_FILTER", "UINT32_MAX", "BuildContext", "Endpoint", "EndpointPair",
    "HttpFilter", "LabelSpec", "Labels", "Model", "NetworkFilter", "ObjectRef", "ObjectStatus", "Pod", "Resource", "Service",
    "ServicePort", "ServiceRoutes", "WatchKind", "__version__", "ads_config_source", "duration_ms", "fraction", "hookimpl",
    "identity_files", "int_at_least", "is_ip", "labels", "listen_port", "load_balancer_addresses", "pack", "percent_fraction",
    "port", "positive_seconds",
    "socket_address", "tls_pem_error", "uint32",
]
