"""Envoy protobuf helpers shared by the translators and plugins: one place for each constructor and limit.

The lowest layer of the core next to the model: it imports only generated ``xds-protos`` code.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

TYPE_PREFIX = "type.googleapis.com/"
#: Largest value of a ``uint32`` field (Envoy's thresholds, token buckets).
UINT32_MAX = 2**32 - 1
#: Longest duration we emit: ten years. Larger label values only risk overflow in Envoy's arithmetic.
MAX_DURATION_MS = 10 * 365 * 24 * 3600 * 1000
#: Envoy's own upstream connect timeout default is 5 s; ours (and the seed's) is 60 s.
DEFAULT_CONNECT_TIMEOUT_MS = 60_000
HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"

_CLASSES: dict[str, type[Message]] = {
    TYPE_PREFIX + cls.DESCRIPTOR.full_name: cls
    for cls in (cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment, listener_pb2.Listener,
                route_pb2.RouteConfiguration, secret_pb2.Secret)
}


def message_class(type_url: str) -> type[Message]:
    """The generated class for an xDS resource type URL (KeyError for any other)."""
    return _CLASSES[type_url]


def pack(msg: Message) -> any_pb2.Any:
    """Wrap ``msg`` in ``google.protobuf.Any``."""
    out = any_pb2.Any()
    out.Pack(msg, deterministic=True)  # map fields (Struct) in a stable order: equal configs, equal bytes
    return out


def duration_ms(ms: int | float) -> duration_pb2.Duration:
    """A Duration of ``ms`` milliseconds."""
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(ms))
    return d


def uint32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def socket_address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))


def ads_config_source() -> config_source_pb2.ConfigSource:
    """``{ads: {}, resource_api_version: V3}``: fetch the resource over the ADS stream."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _packed_protocol_options(configure: str) -> any_pb2.Any:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    if configure == "http2":
        options.explicit_http_config.http2_protocol_options.SetInParent()
    else:
        options.use_downstream_protocol_config.http_protocol_options.SetInParent()
        options.use_downstream_protocol_config.http2_protocol_options.SetInParent()
    return pack(options)


# Packed once: every cluster of a kind carries the same options (copied, never changed in place).
_HTTP2_OPTIONS = _packed_protocol_options("http2")
_DOWNSTREAM_OPTIONS = _packed_protocol_options("downstream")


def http2_upstream(cluster: cluster_pb2.Cluster) -> None:
    """Upstream connections of ``cluster`` speak HTTP/2 (h2c without TLS): gRPC and ``http2`` ports."""
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_HTTP2_OPTIONS)


def downstream_protocol_upstream(cluster: cluster_pb2.Cluster) -> None:
    """Upstream connections of ``cluster`` speak what the client spoke (HTTP/1.1 or HTTP/2): ``http``
    ports, so an h2c client reaches an HTTP/2 server as HTTP/2 and an HTTP/1.1 client stays HTTP/1.1."""
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_DOWNSTREAM_OPTIONS)


def http1_variant(cluster: cluster_pb2.Cluster) -> bool:
    """Turn a cluster that uses the downstream protocol into one that always speaks HTTP/1.1 upstream
    (other protocol options kept); False when ``cluster`` does not use the downstream protocol."""
    packed = cluster.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS)
    if packed is None:
        return False
    options = http_protocol_options_pb2.HttpProtocolOptions()
    packed.Unpack(options)
    if not options.HasField("use_downstream_protocol_config"):
        return False
    options.explicit_http_config.http_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(options))
    return True


def fraction(numerator: int, denominator: str = "MILLION") -> percent_pb2.FractionalPercent:
    """A FractionalPercent ``numerator / denominator`` (``HUNDRED``, ``TEN_THOUSAND`` or ``MILLION``).

    Pick the denominator the consumer needs: Envoy's tracing compares against ``request id % 10000``
    (use ``TEN_THOUSAND``), fault injection draws per million."""
    return percent_pb2.FractionalPercent(
        numerator=numerator, denominator=percent_pb2.FractionalPercent.DenominatorType.Value(denominator))


def percent_fraction(percent: float, denominator: str = "MILLION") -> percent_pb2.FractionalPercent:
    """``percent`` (0..100, float) as a FractionalPercent over ``denominator``, rounded to its resolution."""
    scale = {"HUNDRED": 1, "TEN_THOUSAND": 100, "MILLION": 10_000}[denominator]
    return fraction(int(round(percent * scale)), denominator)
