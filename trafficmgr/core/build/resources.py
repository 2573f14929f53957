"""Envoy message classes by type URL, and small constructors shared by the builder and plugins."""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from trafficmgr.core import cache

_CLASSES: dict[str, type[Message]] = {
    cache.CLUSTER: cluster_pb2.Cluster,
    cache.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    cache.LISTENER: listener_pb2.Listener,
    cache.ROUTE: route_pb2.RouteConfiguration,
    cache.SECRET: secret_pb2.Secret,
}


def message_class(type_url: str) -> type[Message]:
    """The generated class for an xDS resource type URL."""
    return _CLASSES[type_url]


def pack(msg: Message) -> any_pb2.Any:
    """Wrap ``msg`` in ``google.protobuf.Any``."""
    out = any_pb2.Any()
    out.Pack(msg)
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


def runtime_percent(percent: float, key: str = "") -> base_pb2.RuntimeFractionalPercent:
    """A runtime fractional percent of ``percent`` (0..100, float) in millionths."""
    return base_pb2.RuntimeFractionalPercent(
        default_value=fractional_percent(percent), runtime_key=key
    )


def fractional_percent(percent: float):  # -> envoy.type.v3.FractionalPercent
    from envoy.type.v3 import percent_pb2

    return percent_pb2.FractionalPercent(
        numerator=int(round(percent * 10000)), denominator=percent_pb2.FractionalPercent.MILLION
    )
