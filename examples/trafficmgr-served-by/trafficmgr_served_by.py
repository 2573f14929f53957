"""Example trafficmgr plugin: label a Service ``traffic.served-by=<token>`` and every HTTP response from
it through a sidecar carries ``x-served-by: <token>``.

One label declaration and one mutate-in-place hook; nothing happens when the label is absent.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from trafficmgr.plugin import LabelSpec, hookimpl, labels

LABEL = "traffic.served-by"
HEADER = "x-served-by"


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [
        LabelSpec(LABEL, frozenset({labels.SERVICE}), labels.token("a header value token"), "",
                  f"adds response header {HEADER}: <value> to every route to the service"),
    ]


@hookimpl
def trafficmgr_virtual_host(vhost, service, port, ctx) -> None:  # noqa: ANN001 - see trafficmgr.core.hookspecs
    value = service.labels.value(LABEL)
    if not value:
        return
    for route in vhost.routes:
        if any(h.header.key == HEADER for h in route.response_headers_to_add):
            continue  # never add it twice
        option = route.response_headers_to_add.add()
        option.header.key = HEADER
        option.header.value = value
        option.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
