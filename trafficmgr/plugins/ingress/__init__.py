"""Ingress gateway: gateway Envoys (node cluster ``traffic-ingress``) serve every Ingress of class
``traffic`` (``--ingress-class``; Ingresses without a class too when that IngressClass is the default).

- Hosts (exact and ``*.wildcard``), paths (``Exact``, ``Prefix``, ``ImplementationSpecific`` = plain string
  prefix), ``defaultBackend``, service ports by number or name; backends count as ``http`` ports.
- The backends' service policies (lb, retries, timeouts, circuit breaking, tracing) apply through
  ``trafficmgr_route``; fault injection and rate limits are sidecar-only.
- One listener (``--gateway-port``, default 10000) serves plain HTTP; the tls plugin adds SNI chains.
- ``status.loadBalancer.ingress`` of served Ingresses = the gateway Service's address.
- Edge settings (``edge.py``: path normalisation, underscores rejected, HTTP/2 limits, timeouts) on the
  gateway's connection manager, and an overload manager in gateway bootstraps (``trafficmgr_bootstrap``).
- TLS chains with ``server_names`` get their own route configuration: hosts outside the chain's
  certificate get 421 (``misdirected.py``).

For plugins that declare ``TRAFFICMGR_DEPENDS = ("ingress",)`` (tls): the names in ``__all__`` below.
The gateway listener (``LISTENER``) goes through ``trafficmgr_listener`` hooks with that listener name,
and is rebuilt only when a plugin-watched object (any ``WatchKind``) or a backend Service changes: a
dependent that changes it must derive its change from those alone.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from trafficmgr.plugin import GATEWAY, Model, ObjectStatus, WatchKind, hookimpl, is_ip, listen_port
from trafficmgr.plugins.ingress import edge, gateway
from trafficmgr.plugins.ingress.dashboard import trafficmgr_dashboard_routes as trafficmgr_dashboard_routes  # hook
from trafficmgr.plugins.ingress.gateway import LISTENER, PLAIN_CHAIN, served
from trafficmgr.plugins.ingress.ir import (
    DEFAULTS,
    HOST_RE,
    INGRESS,
    INGRESS_CLASS,
    Ingress,
    convert_class,
    convert_ingress,
    option,
    selected_ingresses,
)

if TYPE_CHECKING:
    from trafficmgr.plugin import BuildContext, Resource

#: The gateway's node cluster: ``trafficmgr bootstrap`` passes it as the role (the chart's gateway pod).
GATEWAY_NODE_CLUSTER = "traffic-ingress"


@hookimpl
def trafficmgr_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "bootstrap":  # the gateway's bootstrap: its overload manager (edge.py)
        edge.add_bootstrap_arguments(parser.add_argument_group("ingress plugin (gateway bootstrap only)"))
        return
    if command != "serve":  # only the control plane builds the gateway's configuration
        return
    group = parser.add_argument_group("ingress plugin")
    group.add_argument("--ingress-class", default=DEFAULTS["ingress_class"],
                       help="IngressClass served by the gateway (default traffic)")
    group.add_argument("--gateway-port", type=listen_port, default=DEFAULTS["gateway_port"],
                       help="gateway listener port, plain HTTP and TLS (default 10000)")
    group.add_argument("--gateway-address", default=DEFAULTS["gateway_address"],
                       help="gateway listener address (default 0.0.0.0)")
    group.add_argument("--gateway-service", default=DEFAULTS["gateway_service"],
                       help="the gateway's Service, whose address goes into Ingress status (default traffic-ingress)")
    group.add_argument("--gateway-namespace", default=DEFAULTS["gateway_namespace"],
                       help="namespace of --gateway-service (default $POD_NAMESPACE or default)")
    edge.add_serve_arguments(group)


@hookimpl
def trafficmgr_bootstrap(bootstrap: dict[str, Any], role: str, options: argparse.Namespace) -> None:
    """Gateway Envoys (role ``gateway``, or node cluster ``traffic-ingress`` from ``trafficmgr bootstrap``)
    get the edge overload manager: a heap limit and a global downstream connection limit. Sidecars
    do not (their load is bounded by their own pod)."""
    if role not in (GATEWAY, GATEWAY_NODE_CLUSTER):
        return
    edge.add_overload_manager(bootstrap, options)


@hookimpl
def trafficmgr_watch_kinds() -> list[WatchKind]:
    return [
        WatchKind(INGRESS, "networking.k8s.io/v1", "ingresses", convert_ingress),
        WatchKind(INGRESS_CLASS, "networking.k8s.io/v1", "ingressclasses", convert_class, namespaced=False),
    ]


@hookimpl
def trafficmgr_port_protocols(model: Model, options: argparse.Namespace) -> list[tuple[str, str, int | str, str]]:
    """Backends of served Ingresses are HTTP ports."""
    return gateway.backends(model, options)


@hookimpl
def trafficmgr_resources(role: str, ctx: BuildContext) -> list[Resource]:
    if role != GATEWAY:
        return []
    return gateway.resources(ctx)


@hookimpl
def trafficmgr_object_status(model: Model, options: argparse.Namespace) -> list[ObjectStatus]:
    """``status.loadBalancer.ingress`` of each served Ingress = the gateway Service's load-balancer
    addresses, else its ClusterIP (nothing is written while that Service does not exist)."""
    svc = model.services.get((str(option(options, "gateway_namespace")), str(option(options, "gateway_service"))))
    if svc is None:
        return []
    addresses = svc.load_balancer or ((svc.cluster_ip,) if svc.cluster_ip else ())
    if not addresses:
        return []
    desired = [{"ip": a} if is_ip(a) else {"hostname": a} for a in addresses]
    out = []
    served = selected_ingresses(model, options)
    for ing in served:
        if tuple(ing.lb_status) == tuple(addresses):
            continue
        out.append(ObjectStatus(_path(ing), {"loadBalancer": {"ingress": desired}}, ing.resource_version, ing.ref))
    # An Ingress this gateway stopped serving (its class changed) must not keep showing our address.
    served_keys = {(i.namespace, i.name) for i in served}
    for key, ing in (model.extra.get(INGRESS) or {}).items():
        if key not in served_keys and ing.lb_status and tuple(ing.lb_status) == tuple(addresses):
            out.append(ObjectStatus(_path(ing), {"loadBalancer": {"ingress": None}}, ing.resource_version, ing.ref))
    return out


def _path(ing: Any) -> str:
    return f"/apis/networking.k8s.io/v1/namespaces/{ing.namespace}/ingresses/{ing.name}"


__all__ = ["HOST_RE", "INGRESS", "LISTENER", "PLAIN_CHAIN", "Ingress", "served"]
