"""Circuit breaking, retries, timeouts, connect timeout and outlier detection.

On ``grpc`` ports: ``traffic.retries.grpc`` retries the gRPC statuses CANCELLED, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED and UNAVAILABLE (ignored on other ports, where it would only raise the retry count of
the HTTP conditions), and ``traffic.request.timeout`` bounds each call or stream, also capping the
client's own ``grpc-timeout`` (see :func:`trafficmgr_route`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from envoy.config.core.v3 import base_pb2

from trafficmgr.plugin import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    GRPC,
    MAX_DURATION_MS,
    UINT32_MAX,
    LabelSpec,
    ObjectRef,
    hookimpl,
)
from trafficmgr.plugin import labels as L

if TYPE_CHECKING:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster
    from envoy.config.route.v3.route_components_pb2 import Route

    from trafficmgr.plugin import BuildContext, Service, ServicePort

RETRIES_MAX = "traffic.retries.max"
CONNECTION_MAX = "traffic.connection.max"
PENDING_MAX = "traffic.request.max-pending"
REQUEST_MAX = "traffic.request.max"
REQUEST_TIMEOUT = "traffic.request.timeout"
RETRIES_5XX = "traffic.retries.5xx"
RETRIES_CONNECT = "traffic.retries.connect-failure"
RETRIES_GATEWAY = "traffic.retries.gateway-error"
RETRIES_GRPC = "traffic.retries.grpc"
CONNECT_TIMEOUT = "traffic.connection.timeout"
OUTLIER_5XX = "traffic.outlier.consecutive-5xx"
SVC = frozenset({L.SERVICE})
ON = frozenset({L.POD, L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(RETRIES_MAX, SVC, L.count(), 0, "circuit breaker max concurrent retries (0 = Envoy default)"),
        LabelSpec(CONNECTION_MAX, SVC, L.count(), 0, "circuit breaker max connections"),
        LabelSpec(PENDING_MAX, SVC, L.count(), 0, "circuit breaker max pending requests"),
        LabelSpec(REQUEST_MAX, SVC, L.count(), 0, "circuit breaker max requests"),
        LabelSpec(REQUEST_TIMEOUT, ON, L.duration(), 0,
                  "route timeout (0 = none: a request or stream ends when idle for 5 min); on grpc ports it also caps the client's grpc-timeout"),
        LabelSpec(RETRIES_5XX, ON, L.count(), 0, "retries on 5xx"),
        LabelSpec(RETRIES_CONNECT, ON, L.count(), 0, "retries on connect failure"),
        LabelSpec(RETRIES_GATEWAY, ON, L.count(), 0, "retries on gateway error"),
        LabelSpec(RETRIES_GRPC, ON, L.count(), 0,
                  "retries of gRPC calls failing with CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or "
                  "UNAVAILABLE (grpc ports only)"),
        LabelSpec(CONNECT_TIMEOUT, SVC, L.duration(1), DEFAULT_CONNECT_TIMEOUT_MS, "upstream connect timeout"),
        LabelSpec(OUTLIER_5XX, SVC, L.count(), 0,
                  "eject an endpoint after this many consecutive 5xx (outlier detection)"),
    ]


# Protobuf limits: counts are UInt32Value and Envoy keeps durations as int64 milliseconds. The declarations
# above (L.count(), L.duration()) clamp larger label values (with a TrafficConfigClamped Event); the min()
# below only guards the constants and values that come from elsewhere.

# Outlier detection. Ejection on consecutive 5xx happens as soon as the threshold is reached (Envoy does
# not wait for ``interval``); ``interval`` only bounds how late an ejected endpoint comes back (it is
# checked on each sweep). A short base ejection lets a recovered pod rejoin quickly (Envoy multiplies it
# by the number of times the host was ejected, up to 300 s). At most half a service is ever ejected, so
# a failure shared by every pod (say, a broken dependency) cannot eject everything; Envoy still ejects
# one host when that is more than the percentage (a 1-pod service). Success-rate ejection stays off.
OUTLIER_INTERVAL_MS = 1000
OUTLIER_BASE_EJECTION_MS = 10000
OUTLIER_MAX_EJECTION_PERCENT = 50

# Retry conditions (Envoy's ``retry_on`` names) in the order they appear in ``retry_on``.
RETRY_CONDITIONS = ((RETRIES_5XX, "5xx"), (RETRIES_CONNECT, "connect-failure"), (RETRIES_GATEWAY, "gateway-error"))
# The gRPC ones (grpc ports only). Envoy reads the status from the response headers, so it retries a call
# that failed before the server sent anything (a "trailers-only" response, which is how a gRPC server
# answers a call it rejects at once); a failure after response metadata or a message is passed on.
GRPC_RETRY_CONDITIONS = ((RETRIES_GRPC, "cancelled,deadline-exceeded,resource-exhausted,unavailable"),)
#: The reason of the Warning Event for a gRPC label on an object without a grpc port.
REASON_IGNORED = "TrafficLabelIgnored"


def _ms(duration: Any, ms: int) -> None:
    duration.FromMilliseconds(min(ms, MAX_DURATION_MS))


@hookimpl
def trafficmgr_cluster(cluster: Cluster, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """Circuit-breaker thresholds (only those > 0), connect timeout and outlier detection.

    The cluster is shared by sidecars and gateways, so these apply to both.
    """
    labels = service.labels
    thresholds = {
        "max_retries": labels.value(RETRIES_MAX, 0),
        "max_connections": labels.value(CONNECTION_MAX, 0),
        "max_pending_requests": labels.value(PENDING_MAX, 0),
        "max_requests": labels.value(REQUEST_MAX, 0),
    }
    if any(v > 0 for v in thresholds.values()):
        t = cluster.circuit_breakers.thresholds.add(priority=base_pb2.DEFAULT)
        for field, value in thresholds.items():
            if value > 0:
                getattr(t, field).value = min(value, UINT32_MAX)
    timeout = labels.value(CONNECT_TIMEOUT)
    if timeout is not None:
        _ms(cluster.connect_timeout, timeout)
    consecutive = labels.value(OUTLIER_5XX, 0)
    if consecutive > 0:
        od = cluster.outlier_detection
        od.consecutive_5xx.value = min(consecutive, UINT32_MAX)
        _ms(od.interval, OUTLIER_INTERVAL_MS)
        _ms(od.base_ejection_time, OUTLIER_BASE_EJECTION_MS)
        od.max_ejection_percent.value = OUTLIER_MAX_EJECTION_PERCENT


@hookimpl
def trafficmgr_route(route: Route, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """Request timeout and retry policy, for sidecar and gateway routes alike.

    ``retry_on`` lists every condition whose label is > 0; ``num_retries`` is the largest of them. The
    gRPC conditions count on ``grpc`` ports only.

    On a ``grpc`` port the core sets ``max_stream_duration`` (``grpc_timeout_header_max: 0s``: the
    client's ``grpc-timeout`` is honoured). With that field present Envoy ignores the route ``timeout``
    altogether and bounds the stream by ``max_stream_duration`` instead, or by the client's
    ``grpc-timeout`` capped at ``grpc_timeout_header_max``. So the request timeout is set in all three:
    a call or stream lasts at most the label's time, a shorter client deadline still wins, and Envoy
    forwards the effective deadline upstream in ``grpc-timeout``.
    """
    labels = service.labels
    grpc = port.protocol == GRPC
    timeout = labels.value(REQUEST_TIMEOUT, 0)
    if timeout > 0:
        _ms(route.route.timeout, timeout)
        if grpc or route.route.HasField("max_stream_duration"):
            _ms(route.route.max_stream_duration.max_stream_duration, timeout)
            _ms(route.route.max_stream_duration.grpc_timeout_header_max, timeout)
    grpc_retries = labels.value(RETRIES_GRPC, 0)
    if grpc_retries > 0 and not any(p.protocol == GRPC for p in service.ports):
        ctx.report(ObjectRef(service.kind, service.namespace, service.name, service.uid),
                   f"{RETRIES_GRPC}={grpc_retries} is ignored: the {service.kind} has no grpc port "
                   f"(traffic.port.<port>=grpc or appProtocol: grpc)", REASON_IGNORED)
    conditions = RETRY_CONDITIONS + (GRPC_RETRY_CONDITIONS if grpc else ())
    retries = [(cond, labels.value(key, 0)) for key, cond in conditions]
    retries = [(cond, n) for cond, n in retries if n > 0]
    if retries:
        policy = route.route.retry_policy
        policy.retry_on = ",".join(cond for cond, _ in retries)
        policy.num_retries.value = min(max(n for _, n in retries), UINT32_MAX)
