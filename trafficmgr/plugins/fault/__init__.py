"""Fault injection (sidecar traffic only): fixed delays and aborts per destination."""

from __future__ import annotations

from trafficmgr import hookimpl
from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelSpec

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
