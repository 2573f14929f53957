"""Rate limits (sidecar traffic only): bandwidth per client sidecar and local request rate."""

from __future__ import annotations

from trafficmgr import hookimpl
from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelSpec

BANDWIDTH = "traffic.rate.limit"
REQUEST_RATE = "traffic.request.rate"
ON = frozenset({L.POD, L.SERVICE})


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(BANDWIDTH, ON, L.integer(0, unit="KiB/s"), 0, "bandwidth limit per client sidecar (Envoy's limit_kbps)"),
        LabelSpec(REQUEST_RATE, ON, L.integer(0, unit="requests/s"), 0,
                  "local request rate limit per client sidecar; excess gets 429"),
    ]
