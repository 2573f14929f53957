"""Zipkin tracing on sidecar and gateway HTTP connection managers."""

from __future__ import annotations

from trafficmgr import hookimpl
from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelSpec

ENABLED = "traffic.tracing.enabled"
SAMPLING = "traffic.tracing.sampling"
ON = frozenset({L.POD, L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(ENABLED, ON, L.boolean(), False,
                  "trace requests to or from Envoy-enabled pods of this service (Zipkin)"),
        LabelSpec(SAMPLING, ON, L.number(0, 100), 100.0, "sampling percentage"),
    ]
