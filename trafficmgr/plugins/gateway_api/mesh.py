"""Gateway API for the mesh (GAMMA): HTTPRoutes and GRPCRoutes whose parentRef is a Service.

A producer route (in the Service's own namespace) with a parentRef ``{group: "", kind: Service, name,
port?}`` applies to every request a sidecar sends to that Service (``port`` given: that Service port only;
``sectionName``: the port of that name). A consumer route (a parentRef to a Service in another namespace)
applies only to the sidecars of pods in the route's own namespace (GEP-1294 "Namespace boundaries"), and
for them replaces the producer routes of that Service port: GEP-1294 "Multiple routes for a Service":
"Requests from a namespace with consumer routes will utilize the (possibly merged) set of routes in the
consumer namespace; requests from other namespaces will utilize the (possibly merged) set of routes in
the producer namespace", merging only within each group. Its items carry ``caller_namespace`` (the core
builds those sidecars a view of their own). Its rules replace the Service port's default
route in the sidecar's virtual host (``trafficmgr_service_routes``): matches, filters, timeouts and
weighted backendRefs, in the same precedence as on a Gateway (every route attached to that Service port
together; HTTPRoutes or GRPCRoutes, not both: the older route's kind keeps the port, as the specification
rules for a listener hostname, and a route of the other kind there is ``Accepted`` False); a request
that matches no rule gets 404 (GAMMA: once routes are bound to a Service, they define its routing).
Hostnames do not apply to Service parents (GAMMA: the Service is the host).

Status per Service parent (our ``controllerName``): ``Accepted`` True, or False with
``NoMatchingParent`` (no such Service, or no such port) or ``NotAllowedByListeners`` (a consumer route
on a port the Service's owner did not enable: a consumer route implies no protocol for another
namespace's Service), and ``ResolvedRefs`` as for Gateway parents (backends in other namespaces need a
ReferenceGrant, for consumer routes too; the parent Service does not).

The parent Service port and the backends count as ``http`` ports (``grpc`` for GRPCRoute), as implied
protocols (a port labelled ``traffic.port.N`` keeps its label: a ``tcp`` or ``direct`` port gets no HTTP
routes, and a route whose parent has only such ports is ``Accepted`` False ``NotAllowedByListeners``).

Label policies (``trafficmgr_route``: retries, timeouts, hashing): a route with one backend gets that
backend Service's, as on the gateway; a weighted route (several backends) gets the *parent* Service's
(the one clients address: its retries/timeouts are what its callers asked for), applied once to the
route. A route's own ``timeouts`` win over a label's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trafficmgr.plugin import Service, ServiceRoutes
from trafficmgr.plugins.gateway_api import table as t
from trafficmgr.plugins.gateway_api import translate
from trafficmgr.plugins.gateway_api.ir import ParentRef

if TYPE_CHECKING:
    from trafficmgr.plugin import BuildContext

SERVICE = "Service"
SERVICE_GROUPS = ("", "core")
#: (namespace, service, port, caller namespace) -> the table routes of that Service port, in precedence
#: order; the caller namespace is ``""`` for producer routes (every caller), else the consumer routes' namespace.
MeshKey = tuple[str, str, int, str]


def is_service_parent(ref: ParentRef) -> bool:
    """A parentRef to a core Service (GAMMA); the group must be given as ``""`` (or ``core``)."""
    return ref.kind == SERVICE and ref.group in SERVICE_GROUPS


def table(entries: Mapping[MeshKey, list[tuple[tuple[Any, ...], t.Route]]]) -> tuple[tuple[MeshKey, tuple[t.Route, ...]], ...]:
    """Each Service port's routes in precedence order, by key (sorted)."""
    return tuple((key, tuple(tr for _, tr in sorted(entries[key], key=lambda e: e[0]))) for key in sorted(entries))


# -- translation -------------------------------------------------------------------------------------

MEMO = "gateway_api.mesh"
LAST = "gateway_api.mesh.last"


def service_routes(mesh: tuple[tuple[MeshKey, tuple[t.Route, ...]], ...], ctx: BuildContext) -> list[ServiceRoutes]:
    """The Envoy routes of each Service port with mesh routes (``trafficmgr_service_routes``), from the
    plan's mesh table; a Service port's item is reused (the same objects) while its table routes and its
    Service are unchanged, so the core neither reserializes nor rebuilds its virtual host."""
    memo: dict[MeshKey, tuple[tuple[t.Route, ...], Service, ServiceRoutes]] = ctx.memo.setdefault(MEMO, {})
    # The same mesh table as the last build and a delta that names none of its Services: the same list
    # (O(changed Services), not O(mesh routes), per build).
    last = ctx.memo.get(LAST)
    delta = ctx.model.delta
    if last is not None and last[0] is mesh and delta is not None and last[1].isdisjoint(delta.services):
        return last[2]  # type: ignore[no-any-return]
    ctx.memo.pop(LAST, None)  # set again only when this build's list is complete (a failure leaves none)
    out: list[ServiceRoutes] = []
    live = set()
    for key, routes in mesh:
        ns, name, number, caller = key
        svc = ctx.model.services.get((ns, name))
        port = next((p for p in svc.ports if p.port == number), None) if svc is not None else None
        if svc is None or port is None:
            continue
        live.add(key)
        old = memo.get(key)
        if old is not None and old[1] is svc and old[0] == routes:
            out.append(old[2])
            continue
        grpc = any(r.grpc for r in routes)
        policy = translate.effective(t.Backend(ns, name, number, 1, svc, port), grpc)
        served = t.ServedPort(number, "HTTP", ())  # redirects keep the Service port unless they name one
        item = ServiceRoutes(ns, name, number, tuple(translate.routes(served, routes, ctx, policy)), caller or None)
        memo[key] = (routes, svc, item)
        out.append(item)
    for key in [k for k in memo if k not in live]:
        del memo[key]
    ctx.memo[LAST] = (mesh, frozenset((k[0], k[1]) for k, _ in mesh), out)
    return out

