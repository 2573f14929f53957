"""Labels the core itself owns: proxy enablement and port protocols (registered as plugin ``core``)."""

from __future__ import annotations

from trafficmgr import hookimpl
from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.model import PORT_PREFIX, PROTOCOLS

ENVOY_ENABLED = "traffic.envoy.enabled"
PORT = PORT_PREFIX + "<port>"


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(ENVOY_ENABLED, L.POD_AND_WORKLOADS, L.boolean(), False,
                  "run an Envoy sidecar for the pod; its outbound traffic then goes through Envoy"),
        LabelSpec(PORT, frozenset({L.SERVICE, L.POD}), L.choice(*PROTOCOLS), None,
                  "protocol of that port (without it: the port's appProtocol); traffic from a sidecar to a port with neither is blocked"),
    ]
