"""Circuit breaking, retries, timeouts, connect timeout and outlier detection."""

from __future__ import annotations

from trafficmgr import hookimpl
from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelSpec

RETRIES_MAX = "traffic.retries.max"
CONNECTION_MAX = "traffic.connection.max"
PENDING_MAX = "traffic.request.max-pending"
REQUEST_MAX = "traffic.request.max"
REQUEST_TIMEOUT = "traffic.request.timeout"
RETRIES_5XX = "traffic.retries.5xx"
RETRIES_CONNECT = "traffic.retries.connect-failure"
RETRIES_GATEWAY = "traffic.retries.gateway-error"
CONNECT_TIMEOUT = "traffic.connection.timeout"
OUTLIER_5XX = "traffic.outlier.consecutive-5xx"
SVC = frozenset({L.SERVICE})
ON = frozenset({L.POD, L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(RETRIES_MAX, SVC, L.integer(0), 0, "circuit breaker max concurrent retries (0 = Envoy default)"),
        LabelSpec(CONNECTION_MAX, SVC, L.integer(0), 0, "circuit breaker max connections"),
        LabelSpec(PENDING_MAX, SVC, L.integer(0), 0, "circuit breaker max pending requests"),
        LabelSpec(REQUEST_MAX, SVC, L.integer(0), 0, "circuit breaker max requests"),
        LabelSpec(REQUEST_TIMEOUT, ON, L.integer(0, unit="ms"), 0, "route timeout (0 = Envoy default)"),
        LabelSpec(RETRIES_5XX, ON, L.integer(0), 0, "retries on 5xx"),
        LabelSpec(RETRIES_CONNECT, ON, L.integer(0), 0, "retries on connect failure"),
        LabelSpec(RETRIES_GATEWAY, ON, L.integer(0), 0, "retries on gateway error"),
        LabelSpec(CONNECT_TIMEOUT, SVC, L.integer(1, unit="ms"), 60000, "upstream connect timeout"),
        LabelSpec(OUTLIER_5XX, SVC, L.integer(0), 0,
                  "eject an endpoint after this many consecutive 5xx (outlier detection)"),
    ]
