"""Access logs: ``traffic.accesslog=on`` makes proxies write one JSON line per request to their stdout.

Who logs what:

- a **Service** labeled ``on``: every client sidecar logs the requests it sends to the Service (the
  redirected ``outbound`` listener and local mode's explicit proxy), and the ingress gateway logs the
  requests its routes (Ingress, Gateway API) send to it (``"direction"``: ``outbound`` / ``gateway``);
- a **Pod** (or its Deployment / StatefulSet / DaemonSet) labeled ``on``: the pod's own sidecar logs the
  requests arriving at the pod (its ``inbound`` listener, ``"direction": "inbound"``; needs inbound capture,
  so not in local mode), and client sidecars log requests addressed to the pod's IP when the pod has
  ``traffic.port.<port>`` labels of its own (the core then routes to it as a destination of kind Pod).

How only those requests log, although connection managers are shared (the gateway's, the explicit
proxy's, the inbound one; and an outbound chain's routes are the whole port's): the access log (one
stdout logger) is filtered by a CEL expression (Envoy's ``envoy.access_loggers.extension_filters.cel``) --

- outbound and gateway: the request's route carries this plugin's route metadata
  (``filter_metadata["trafficmgr.accesslog"]``, set by ``trafficmgr_route`` on routes to a labeled Service);
- inbound (one configuration for every sidecar): the proxy's node id (``<pod>.<namespace>``) is in the
  list of labeled pods, which a ``set_metadata`` HTTP filter of the inbound connection manager puts into
  the request's dynamic metadata (the list changes with labels, so it lives in a filter the core compares
  by content, never in a cached connection manager).

The access log sits in every shared connection manager (the explicit proxy's, the inbound one, the
gateway's) whether or not anything is labeled, as the fault and rate-limit plugins' no-op filters do, so
a label never changes them; a redirected outbound chain (one per destination) gets it only while its
destination is labeled. A Service label thus changes that Service's own chain and routes and nothing of
any other Service (Envoy drains only a changed filter chain). The cost without any label is one CEL
evaluation per request on the shared connection managers. A Pod label changes the inbound listener (the
pod list). The line format (:data:`FORMAT`) is documented field by field in the README ("Access logs").
"""

from __future__ import annotations

import json
import weakref
from typing import TYPE_CHECKING

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.set_metadata.v3 import set_metadata_pb2
from google.protobuf import struct_pb2

from trafficmgr.plugin import GATEWAY, SIDECAR, HttpFilter, LabelSpec, hookimpl, pack
from trafficmgr.plugin import labels as L

if TYPE_CHECKING:
    from envoy.config.route.v3.route_components_pb2 import Route
    from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
        HttpConnectionManager,
    )

    from trafficmgr.plugin import BuildContext, Labels, Model, NetworkFilter, Resource, Service

LABEL = "traffic.accesslog"
ON_KINDS = frozenset({L.SERVICE}) | L.POD_AND_WORKLOADS


@hookimpl
def trafficmgr_labels() -> list[LabelSpec]:
    return [LabelSpec(LABEL, ON_KINDS, L.choice("off", "on"), "off",
                      "on: one JSON line per request on the proxies' stdout (Service: client sidecars and the "
                      "gateway log requests to it; Pod: its own sidecar logs requests arriving at it)")]


#: The inbound ``set_metadata`` filter's name, also the metadata namespace of routes and requests.
NAMESPACE = "trafficmgr.accesslog"
#: Early, so that the inbound pod list is in the request's metadata whatever a later filter answers.
FILTER_ORDER = 50
LOGGER = "envoy.access_loggers.stdout"
CEL_FILTER = "envoy.access_loggers.extension_filters.cel"
#: The value of every line's ``"log"`` field: how ``trafficmgr proxies --access-log`` tells access-log lines
#: from Envoy's other output (bump the version when a field changes meaning).
LOG_PREFIX = "trafficmgr.accesslog/"
LOG_TYPE = f"{LOG_PREFIX}v1"

#: A route to a labeled destination: its metadata names it (the ``destination`` field of a line).
ROUTE_EXPRESSION = f"'{NAMESPACE}' in xds.route_metadata.filter_metadata"
#: The inbound side: this proxy is the sidecar of a labeled pod.
INBOUND_EXPRESSION = f"xds.node.id in metadata.filter_metadata['{NAMESPACE}'].pods"

#: One line per request (Envoy ``json_format``: a field that is exactly one command keeps its type, so
#: numbers are numbers; a value Envoy does not have is ``null``). ``direction`` is filled in per listener.
FORMAT: dict[str, str] = {
    "log": LOG_TYPE,
    "start_time": "%START_TIME%",
    "direction": "",
    "destination": f"%METADATA(ROUTE:{NAMESPACE}:destination)%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "trace_id": "%TRACE_ID%",
    "downstream_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "peer_identity": "%DOWNSTREAM_PEER_URI_SAN%",
    "upstream_identity": "%UPSTREAM_PEER_URI_SAN%",
}


def direction(role: str, listener_name: str) -> str:
    """``gateway`` for the gateway's connection managers, ``inbound`` for the sidecar's inbound one,
    ``outbound`` for the sidecar's others (the redirected chains and the explicit proxy)."""
    if role != SIDECAR:
        return "gateway"
    return "inbound" if listener_name == "inbound" else "outbound"


def access_log(expression: str, side: str) -> accesslog_pb2.AccessLog:
    """A stdout JSON access log (:data:`FORMAT`, ``direction`` = ``side``) for requests ``expression`` admits."""
    fmt = struct_pb2.Struct()
    fmt.update({**FORMAT, "direction": side})
    logger = stream_pb2.StdoutAccessLog()
    logger.log_format.json_format.CopyFrom(fmt)
    entry = accesslog_pb2.AccessLog(name=LOGGER, typed_config=pack(logger))
    entry.filter.extension_filter.name = CEL_FILTER
    entry.filter.extension_filter.typed_config.CopyFrom(pack(cel_pb2.ExpressionFilter(expression=expression)))
    return entry


def pods_filter(pods: tuple[str, ...]) -> set_metadata_pb2.Config:
    """The inbound filter putting the labeled pods' node ids into every request's dynamic metadata."""
    config = set_metadata_pb2.Config()
    value = struct_pb2.Struct()
    value.update({"pods": list(pods)})
    config.metadata.add(metadata_namespace=NAMESPACE, value=value)
    return config


def logged(labels: Labels) -> bool:
    """Whether ``labels`` (parsed) say ``traffic.accesslog=on``."""
    return bool(labels.value(LABEL, "off") == "on")


def destination(service: Service) -> str:
    """``Service/<namespace>/<name>`` (or ``Pod/...`` for a pod's own labeled ports)."""
    return f"{service.kind}/{service.namespace}/{service.name}"


class _Labeled:
    """The labeled pods of the model, kept in O(changed pods) per build (the model's ``delta``; a full
    scan when it is unknown)."""

    def __init__(self) -> None:
        self.pods: set[tuple[str, str]] = set()
        #: The model last applied, weakly (each model's delta is applied once; a Model is not kept across builds).
        self.seen: weakref.ref[Model] | None = None

    def update(self, model: Model) -> None:
        delta = model.delta
        if delta is None or self.seen is None:
            self.pods = {k for k, p in model.pods.items() if logged(p.labels) and p.live}
            return
        for key in delta.pods:
            pod = model.pods.get(key)
            (self.pods.add if pod is not None and logged(pod.labels) and pod.live else self.pods.discard)(key)


def _labeled(ctx: BuildContext) -> _Labeled:
    """The sidecar view's labeled pods, updated once per model."""
    labeled = ctx.memo.get(NAMESPACE)
    if not isinstance(labeled, _Labeled):
        labeled = ctx.memo[NAMESPACE] = _Labeled()
    if labeled.seen is None or labeled.seen() is not ctx.model:
        labeled.update(ctx.model)
        labeled.seen = weakref.ref(ctx.model)
    return labeled


@hookimpl
def trafficmgr_resources(role: str, ctx: BuildContext) -> list[Resource]:
    """Contributes nothing: called on every build of the sidecar view, it applies each model's delta to
    the labeled pods (whether or not the inbound listener is built this time)."""
    if role == SIDECAR:
        _labeled(ctx)
    return []


@hookimpl
def trafficmgr_network_filters(role: str, ctx: BuildContext) -> list[NetworkFilter | HttpFilter]:
    """Inbound: the ``set_metadata`` filter listing the node ids of labeled pods, while there are any
    (without it the inbound access log's expression is false)."""
    if role != "inbound":
        return []
    labeled = _labeled(ctx)
    if not labeled.pods:
        return []
    pods = tuple(sorted(f"{name}.{namespace}" for namespace, name in labeled.pods))
    memo = ctx.memo.get(f"{NAMESPACE}.inbound")
    if memo is None or memo[0] != pods:
        memo = ctx.memo[f"{NAMESPACE}.inbound"] = (pods, HttpFilter(NAMESPACE, FILTER_ORDER, pods_filter(pods)))
    return [memo[1]]


@hookimpl
def trafficmgr_http_connection_manager(hcm: HttpConnectionManager, role: str, listener_name: str,
                                       service: Service | None) -> None:
    """The filtered access log (depends on the arguments only): in every shared connection manager of the
    sidecar and gateway views (the explicit proxy's, the inbound one, the gateway's), and in a redirected
    outbound chain's only when the chain's destination is labeled ``on`` (one per destination: an access
    log in each would weigh about 1 KiB per Service in the outbound listener)."""
    if role not in (SIDECAR, GATEWAY):
        return
    if role == SIDECAR and service is not None and not logged(service.labels):
        return
    if any(a.name == LOGGER and a.filter.extension_filter.name == CEL_FILTER for a in hcm.access_log):
        return  # already there (a hook run again on the same message)
    side = direction(role, listener_name)
    hcm.access_log.append(access_log(INBOUND_EXPRESSION if side == "inbound" else ROUTE_EXPRESSION, side))


@hookimpl
def trafficmgr_route(route: Route, service: Service) -> None:
    """Routes to a labeled destination carry its name in this plugin's route metadata (sidecar and gateway)."""
    if logged(service.labels):
        route.metadata.filter_metadata[NAMESPACE].update({"destination": destination(service)})




def access_lines(text: str) -> list[str]:
    """The access-log lines of a proxy's output (its stdout and stderr mixed): JSON objects whose ``log``
    field is this plugin's (any version), in order, without their line ends. Envoy's own log lines, other
    JSON and partial lines (a line still being written) are left out."""
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("{") or LOG_PREFIX not in stripped:
            continue
        try:
            obj = json.loads(stripped)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("log"), str) and obj["log"].startswith(LOG_PREFIX):
            out.append(stripped)
    return out


__all__ = ["FORMAT", "LABEL", "LOG_TYPE", "NAMESPACE", "access_lines", "access_log", "destination", "direction"]
