"""Gateway API (``gateway.networking.k8s.io``) on the shared gateway proxies (node cluster ``traffic-ingress``).

- GatewayClasses whose ``controllerName`` is ``--gateway-class-controller`` (default
  ``trafficmgr.io/gateway-controller``) are ours; their Gateways are served by the same gateway proxies as
  Ingresses: each distinct listener port is one Envoy listener ``gateway_api|<port>`` on
  ``--gateway-address`` (no Deployment per Gateway: no RBAC to create workloads; the chart exposes the ports).
- HTTPRoute and GRPCRoute (v1), ReferenceGrant (v1beta1) for cross-namespace backendRefs and
  certificateRefs, HTTPS listeners (TLS ``Terminate``) with ``kubernetes.io/tls`` Secrets.
- ``plan.py`` validates and orders everything into a :class:`table.Table` and the status conditions;
  ``translate.py`` spells the table in Envoy's terms; ``status.py`` writes GatewayClass, Gateway and route
  status as the specification defines it.
- Mesh routes (GAMMA, ``mesh.py``): HTTPRoutes/GRPCRoutes whose parentRef is a Service in their own
  namespace replace that Service port's default route in every sidecar (``trafficmgr_service_routes``);
  a consumer route (parent Service in another namespace) does so in the sidecars of its own namespace only.
- Backends of attached routes count as ``http`` ports (GRPCRoute backends as ``grpc``: HTTP/2 upstream);
  the backend Services' label policies apply through ``ctx.apply_route_hooks`` in the translation.

Builds on the ingress plugin (``TRAFFICMGR_DEPENDS``): its ``--gateway-address``, ``--gateway-port`` (a
Gateway listener on that port is refused: ``PortUnavailable``), ``--gateway-service`` and
``--gateway-namespace`` (whose addresses are each Gateway's ``status.addresses``, and whose ports say which
Gateway listener ports clients can reach: a listener on another port is ``Programmed`` False ``Pending``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trafficmgr.plugin import GATEWAY, SIDECAR, Model, ObjectStatus, WatchKind, hookimpl
from trafficmgr.plugins.gateway_api import ir, mesh, plan, status, translate
from trafficmgr.plugins.gateway_api.dashboard import trafficmgr_dashboard_routes as trafficmgr_dashboard_routes  # hook

if TYPE_CHECKING:
    from trafficmgr.plugin import BuildContext, Resource, ServiceRoutes

TRAFFICMGR_DEPENDS = ("ingress",)


@hookimpl
def trafficmgr_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command != "serve":  # only the control plane reads Gateway API objects
        return
    group = parser.add_argument_group("gateway_api plugin")
    group.add_argument("--gateway-class-controller", default=plan.DEFAULT_CONTROLLER,
                       help=f"GatewayClass controllerName served by the gateway (default {plan.DEFAULT_CONTROLLER})")


def referenced_secrets(extra: Mapping[str, Mapping[tuple[str, str], Any]]) -> set[tuple[str, str]]:
    """Only Secrets some Gateway listener names in ``tls.certificateRefs`` are in the model (whether the
    reference is permitted is the plan's question: a forbidden Secret is never served)."""
    out = set()
    for gw in (extra.get(ir.GATEWAY) or {}).values():
        for lst in gw.listeners:
            for ref in lst.certificate_refs:
                out.add((ref.namespace or gw.meta.namespace, ref.name))
    return out


@hookimpl
def trafficmgr_watch_kinds() -> list[WatchKind]:
    return [
        WatchKind(ir.GATEWAY_CLASS, ir.API_V1, "gatewayclasses", ir.convert_class, namespaced=False),
        WatchKind(ir.GATEWAY, ir.API_V1, "gateways", ir.convert_gateway),
        WatchKind(ir.HTTP_ROUTE, ir.API_V1, "httproutes", ir.convert_http_route),
        WatchKind(ir.GRPC_ROUTE, ir.API_V1, "grpcroutes", ir.convert_grpc_route),
        WatchKind(ir.REFERENCE_GRANT, ir.API_V1BETA1, "referencegrants", ir.convert_reference_grant),
        # A second Secret watch under this plugin's own key (the tls plugin has its own for Ingresses).
        WatchKind(ir.SECRET, "v1", "secrets", ir.convert_secret, field_selector=f"type={ir.TLS_TYPE}", keep=referenced_secrets),
        # Namespace labels, for allowedRoutes.namespaces.from Selector.
        WatchKind(ir.NAMESPACE, "v1", "namespaces", ir.convert_namespace, namespaced=False),
    ]


@hookimpl
def trafficmgr_port_protocols(model: Model, options: argparse.Namespace) -> list[tuple[str, str, int | str, str]]:
    """Backends (and mirror targets) of attached routes: ``http`` for HTTPRoute, ``grpc`` for GRPCRoute
    (the same list object while the plan is the same: callers read it, never change it)."""
    global _protocols
    result = plan.plan(model, options)
    if _protocols is None or _protocols[0] is not result:
        _protocols = (result, list(result.protocols))
    return _protocols[1]


_protocols: tuple[object, list[tuple[str, str, int | str, str]]] | None = None


@hookimpl
def trafficmgr_resources(role: str, ctx: BuildContext) -> list[Resource]:
    """Listeners, route configurations and Secrets of the gateway view (``translate.resources``)."""
    if role != GATEWAY:
        return []
    table = plan.table(ctx.model, ctx.options)
    if not table.ports:
        return []
    return translate.resources(table, ctx)


@hookimpl
def trafficmgr_service_routes(role: str, ctx: BuildContext) -> list[ServiceRoutes]:
    """Mesh routes (GAMMA: routes whose parent is a Service) for the sidecar view (``mesh.py``)."""
    if role != SIDECAR:
        return []
    mesh_table = plan.plan(ctx.model, ctx.options).mesh
    return mesh.service_routes(mesh_table, ctx) if mesh_table or ctx.memo.get(mesh.MEMO) else []


#: The last status answer and what it was made from: the plan object and the gateway's addresses.
_last_status: tuple[object, list[dict[str, str]], list[ObjectStatus]] | None = None


@hookimpl
def trafficmgr_object_status(model: Model, options: argparse.Namespace) -> list[ObjectStatus]:
    """GatewayClass, Gateway and route status (only what differs from what the objects have).

    Called after every published build, most of them for pod or endpoint changes: while the plan is the
    same object (no Gateway API object, backend Service or option changed: a status write changes the
    object's resourceVersion, so it makes a new plan) and the gateway's addresses are the same, the last
    answer stands (no O(objects) JSON work, and the same condition times)."""
    global _last_status
    result = plan.plan(model, options)
    addresses = status.gateway_addresses(model, options)
    if _last_status is not None and _last_status[0] is result and _last_status[1] == addresses:
        return _last_status[2]
    answer = status.statuses(result, model, options)
    _last_status = (result, addresses, answer)
    return answer


__all__ = ["TRAFFICMGR_DEPENDS"]
