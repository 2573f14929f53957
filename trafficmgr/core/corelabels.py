"""Labels the core itself owns: proxy enablement, port protocols and sidecar scopes (registered as plugin ``core``)."""

from __future__ import annotations

import re

from trafficmgr import hookimpl
from trafficmgr.core import labels as L
from trafficmgr.core.labels import LabelSpec
from trafficmgr.core.model import PORT_PREFIX, PROTOCOLS

ENVOY_ENABLED = "traffic.envoy.enabled"
PORT = PORT_PREFIX + "<port>"
#: The sidecar's view (see :mod:`trafficmgr.core.translate.scopes`).
SCOPE = "traffic.scope"
SCOPE_NAMESPACES = "traffic.scope.namespaces"
MESH = "mesh"
NAMESPACE = "namespace"
SEPARATOR = "_"  # namespace names (DNS-1123 labels) cannot contain it; a label value can
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def parse_namespaces(raw: str) -> tuple[str, ...]:
    """``a_b_c`` -> ``("a", "b", "c")`` (sorted, duplicates dropped); ValueError naming the bad part."""
    parts = raw.split(SEPARATOR)
    for part in parts:
        if not _DNS_LABEL.fullmatch(part):
            raise ValueError(f"{part!r} is not a namespace name: must be namespace names separated by _ "
                             "(lower-case letters, digits and -, e.g. shop_payments)")
    return tuple(sorted(set(parts)))


SCOPE_KINDS = frozenset({L.NAMESPACE}) | L.POD_AND_WORKLOADS


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(ENVOY_ENABLED, L.POD_AND_WORKLOADS, L.boolean(), False,
                  "run an Envoy sidecar for the pod; its outbound traffic then goes through Envoy"),
        LabelSpec(PORT, frozenset({L.SERVICE, L.POD}), L.choice(*PROTOCOLS), None,
                  "protocol of that port (without it: the port's appProtocol); traffic from a sidecar to a port with neither is blocked"),
        LabelSpec(SCOPE, SCOPE_KINDS, L.choice(MESH, NAMESPACE), MESH,
                  "the sidecar's view: mesh (every service) or namespace (the services of its own namespace and of "
                  "traffic.scope.namespaces, and the backends of their mesh routes; other destinations get a 404 naming "
                  "the scope); the pod's or workload's label wins over its Namespace's"),
        LabelSpec(SCOPE_NAMESPACES, SCOPE_KINDS,
                  L.Parser(parse_namespaces, "namespace names separated by _ (e.g. shop_payments)"), None,
                  "with traffic.scope=namespace: the other namespaces the sidecar sees; the pod's or workload's label "
                  "wins over its Namespace's"),
    ]
