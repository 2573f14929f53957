"""Fault injection (sidecar traffic only): fixed delays and aborts per destination."""

from __future__ import annotations

from typing import TYPE_CHECKING

from envoy.extensions.filters.http.fault.v3 import fault_pb2

from trafficmgr.plugin import MAX_DURATION_MS, SIDECAR, HttpFilter, LabelSpec, hookimpl, pack, percent_fraction
from trafficmgr.plugin import labels as L

if TYPE_CHECKING:
    from envoy.config.route.v3.route_components_pb2 import VirtualHost

    from trafficmgr.plugin import BuildContext, Labels, Service, ServicePort

DELAY_TIME = "traffic.fault.delay.time"
DELAY_PERCENT = "traffic.fault.delay.percentage"
ABORT_STATUS = "traffic.fault.abort.status"
ABORT_PERCENT = "traffic.fault.abort.percentage"
ON = frozenset({L.POD, L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(DELAY_TIME, ON, L.integer(0, unit="ms"), 0, "fixed delay"),
        LabelSpec(DELAY_PERCENT, ON, L.number(0, 100), 0.0, "share of requests delayed"),
        LabelSpec(ABORT_STATUS, ON, L.integer(200, 599), 0, "abort status (503 when only the percentage is set)"),
        LabelSpec(ABORT_PERCENT, ON, L.number(0, 100), 0.0, "share of requests aborted"),
    ]


#: The HCM filter name; also the ``typed_per_filter_config`` key (Envoy ignores any other key silently).
FILTER_NAME = "envoy.filters.http.fault"
FILTER_ORDER = 100  # before the rate limits: an injected abort or delay is not admitted traffic
DEFAULT_ABORT_STATUS = 503


def fault_config(labels: Labels) -> fault_pb2.HTTPFault | None:
    """The fault filter config for ``labels``, or None when they inject nothing.

    A delay needs a time and a percentage > 0; an abort needs a percentage > 0 (status 503 unless
    ``traffic.fault.abort.status`` is set). A status or a time alone does nothing.
    """
    fault = fault_pb2.HTTPFault()
    delay_ms = labels.value(DELAY_TIME, 0)
    # Parts per million: 0.0001 % resolution; smaller shares round to 0, which injects nothing.
    delay = percent_fraction(labels.value(DELAY_PERCENT, 0.0))
    if delay_ms > 0 and delay.numerator > 0:
        fault.delay.fixed_delay.FromMilliseconds(min(delay_ms, MAX_DURATION_MS))
        fault.delay.percentage.CopyFrom(delay)
    abort = percent_fraction(labels.value(ABORT_PERCENT, 0.0))
    if abort.numerator > 0:
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
    config = fault_config(service.labels)
    if config is not None:
        vhost.typed_per_filter_config[FILTER_NAME].CopyFrom(pack(config))
