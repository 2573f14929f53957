"""Fault injection (sidecar traffic only): fixed delays and aborts per destination.

An abort answers with an HTTP status, or on a ``grpc`` port with the gRPC status of
``traffic.fault.abort.grpc-status`` when it is set (Envoy's abort is one or the other). On other ports
that label is ignored: Envoy answers a plain HTTP request aborted with a gRPC status ``200 OK``, which an
HTTP client would take for a success, so one Service with an HTTP and a gRPC port aborts each the way its
clients understand. A label that can have no effect (the object has no ``grpc`` port) is reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from envoy.extensions.filters.http.fault.v3 import fault_pb2

from trafficmgr.plugin import (
    GRPC,
    SIDECAR,
    HttpFilter,
    LabelSpec,
    ObjectRef,
    hookimpl,
    pack,
    percent_fraction,
)
from trafficmgr.plugin import labels as L

if TYPE_CHECKING:
    from envoy.config.route.v3.route_components_pb2 import VirtualHost

    from trafficmgr.plugin import BuildContext, Labels, Service, ServicePort

DELAY_TIME = "traffic.fault.delay.time"
DELAY_PERCENT = "traffic.fault.delay.percentage"
ABORT_STATUS = "traffic.fault.abort.status"
ABORT_PERCENT = "traffic.fault.abort.percentage"
ABORT_GRPC_STATUS = "traffic.fault.abort.grpc-status"
ON = frozenset({L.POD, L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(DELAY_TIME, ON, L.duration(), 0, "fixed delay"),
        LabelSpec(DELAY_PERCENT, ON, L.number(0, 100), 0.0, "share of requests delayed"),
        LabelSpec(ABORT_STATUS, ON, L.integer(200, 599), 0, "abort status (503 when only the percentage is set)"),
        LabelSpec(ABORT_PERCENT, ON, L.number(0, 100), 0.0, "share of requests aborted"),
        LabelSpec(ABORT_GRPC_STATUS, ON, L.integer(0, 16), None,
                  "gRPC status of an abort on grpc ports (wins over the HTTP status there; ignored on other ports)"),
    ]


#: The HCM filter name; also the ``typed_per_filter_config`` key (Envoy ignores any other key silently).
FILTER_NAME = "envoy.filters.http.fault"
FILTER_ORDER = 100  # before the rate limits: an injected abort or delay is not admitted traffic
DEFAULT_ABORT_STATUS = 503
#: The reason of the Warning Event for a gRPC label on an object without a grpc port.
REASON_IGNORED = "TrafficLabelIgnored"


def fault_config(labels: Labels, grpc: bool = False) -> fault_pb2.HTTPFault | None:
    """The fault filter config for ``labels``, or None when they inject nothing.

    A delay needs a time and a percentage > 0; an abort needs a percentage > 0 (status 503 unless
    ``traffic.fault.abort.status`` is set). A status or a time alone does nothing. For a ``grpc`` port
    (``grpc=True``) an abort returns ``traffic.fault.abort.grpc-status`` when it is set, whatever the HTTP
    status; without it Envoy maps the HTTP status to a gRPC one for gRPC clients (503 -> UNAVAILABLE).
    """
    fault = fault_pb2.HTTPFault()
    delay_ms = labels.value(DELAY_TIME, 0)
    # Parts per million: 0.0001 % resolution; smaller shares round to 0, which injects nothing.
    delay = percent_fraction(labels.value(DELAY_PERCENT, 0.0))
    if delay_ms > 0 and delay.numerator > 0:
        fault.delay.fixed_delay.FromMilliseconds(delay_ms)  # at most MAX_DURATION_MS: clamped by L.duration()
        fault.delay.percentage.CopyFrom(delay)
    abort = percent_fraction(labels.value(ABORT_PERCENT, 0.0))
    if abort.numerator > 0:
        grpc_status = labels.value(ABORT_GRPC_STATUS) if grpc else None
        if grpc_status is not None:
            fault.abort.grpc_status = grpc_status
        else:
            fault.abort.http_status = labels.value(ABORT_STATUS, 0) or DEFAULT_ABORT_STATUS
        fault.abort.percentage.CopyFrom(abort)
    if not fault.HasField("delay") and not fault.HasField("abort"):
        return None
    return fault


@hookimpl
def trafficmgr_http_filters(ctx: BuildContext) -> list[HttpFilter]:
    """A no-op fault filter in sidecar connection managers only (the ingress gateway ignores faults)."""
    if ctx.role != SIDECAR:
        return []
    return [HttpFilter(FILTER_NAME, FILTER_ORDER, fault_pb2.HTTPFault())]


@hookimpl
def trafficmgr_virtual_host(vhost: VirtualHost, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """Configure the fault filter for traffic to ``service`` (sidecar virtual hosts only)."""
    if ctx.role != SIDECAR:
        return
    grpc_status = service.labels.value(ABORT_GRPC_STATUS)
    if grpc_status is not None and not any(p.protocol == GRPC for p in service.ports):
        ctx.report(ObjectRef(service.kind, service.namespace, service.name, service.uid),
                   f"{ABORT_GRPC_STATUS}={grpc_status} is ignored: the {service.kind} has no grpc port "
                   f"(traffic.port.<port>=grpc or appProtocol: grpc); aborts answer with an HTTP status", REASON_IGNORED)
    config = fault_config(service.labels, grpc=port.protocol == GRPC)
    if config is not None:
        vhost.typed_per_filter_config[FILTER_NAME].CopyFrom(pack(config))
