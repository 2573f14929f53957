"""Labels the core itself owns: proxy enablement and port protocols (registered as plugin ``core``)."""

from __future__ import annotations

from trafficmgr import hookimpl
from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.model import PORT_PREFIX

ENVOY_ENABLED = "traffic.envoy.enabled"
PORT = PORT_PREFIX + "<port>"


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(ENVOY_ENABLED, L.POD_AND_WORKLOADS, L.boolean(), False,
                  "run an Envoy sidecar for the pod; its outbound traffic then goes through Envoy"),
        LabelSpec(PORT, frozenset({L.SERVICE, L.POD}), L.choice("http", "tcp", "direct"), None,
                  "protocol of that port; traffic from a sidecar to an unlabeled port is blocked"),
    ]
