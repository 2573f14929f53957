"""The plan's conditions -> ``ObjectStatus`` writes (``trafficmgr_object_status``).

- GatewayClass ``conditions``; Gateway ``conditions``, ``listeners`` and ``addresses`` (the gateway
  Service's, as Ingress status); route ``parents`` (our entries, one per parentRef to a Gateway of ours,
  with ``controllerName`` and the parentRef echoed; other controllers' entries are kept as they are).
- Each condition carries ``observedGeneration`` (the object's ``metadata.generation``) and
  ``lastTransitionTime``, kept from the current condition of the same type while its status is the same.
- Condition types we do not own are kept. Nothing is written when the desired status equals the current
  one apart from ``lastTransitionTime``; nothing is written over a condition whose ``observedGeneration``
  is newer than the object we saw (our copy is stale; the next build sees the new one).
- A desired status is remembered per object and resource version, so the same build result yields the
  same bytes (the core writes each ``(path, resourceVersion, status)`` once).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from trafficmgr.plugin import Model, ObjectStatus, is_ip
from trafficmgr.plugins.gateway_api.ir import API_V1, GROUP, Gateway, Meta, Route
from trafficmgr.plugins.gateway_api.plan import PROGRAMMED, Condition, GatewayStatus, ParentStatus, Plan, controller_name
from trafficmgr.plugins.ingress.ir import option as ingress_option

OWNED_CLASS = ("Accepted",)
OWNED_GATEWAY = ("Accepted", "Programmed")
_lock = threading.Lock()
_remembered: dict[str, tuple[str, str, dict[str, Any]]] = {}
_MAX_REMEMBERED = 20000


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(desired: Iterable[Condition], current: Iterable[Mapping[str, Any]], generation: int,
                owned: Iterable[str] | None = None, stamp: str = "") -> list[dict[str, Any]]:
    """Desired conditions as API dicts, merged into ``current``: types in ``owned`` (default: the desired
    ones) are ours; every other current condition is kept in place."""
    current = [c for c in current if isinstance(c, Mapping)]
    by_type = {c.get("type"): c for c in current}
    want = {c.type: c for c in desired}
    ours = set(owned or ()) | set(want)
    out: list[dict[str, Any]] = [dict(c) for c in current if c.get("type") not in ours]
    for c in desired:
        status = "True" if c.status else "False"
        old = by_type.get(c.type)
        kept = old is not None and old.get("status") == status and old.get("lastTransitionTime")
        out.append({"type": c.type, "status": status, "reason": c.reason, "message": c.message[:32768],
                    "observedGeneration": generation, "lastTransitionTime": kept or stamp or now()})
    return out


def _strip(value: Any) -> Any:
    """``value`` without ``lastTransitionTime`` anywhere (for comparing), as canonical JSON."""
    def walk(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: walk(x) for k, x in v.items() if k != "lastTransitionTime"}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v
    return json.dumps(walk(value), sort_keys=True)


def _stale(current: Iterable[Mapping[str, Any]], generation: int) -> bool:
    return any(isinstance(c.get("observedGeneration"), int) and c["observedGeneration"] > generation for c in current)


def _emit(path: str, meta: Meta, desired: dict[str, Any], current: dict[str, Any], ref: Any) -> ObjectStatus | None:
    """An ObjectStatus when ``desired`` differs from ``current`` (ignoring transition times); the same
    dict again for the same object version and content."""
    semantic = _strip(desired)
    if semantic == _strip(current):
        return None
    with _lock:
        old = _remembered.get(path)
        if old is not None and old[0] == meta.resource_version and old[1] == semantic:
            desired = old[2]
        else:
            if len(_remembered) >= _MAX_REMEMBERED:
                _remembered.clear()
            _remembered[path] = (meta.resource_version, semantic, desired)
    return ObjectStatus(path, desired, meta.resource_version, ref)


def gateway_addresses(model: Model, options: argparse.Namespace) -> list[dict[str, str]]:
    """The gateway Service's load-balancer addresses, else its ClusterIP (``--gateway-service``); without
    that Service, ``--gateway-address`` when it is one specific IP (local mode's 127.0.0.1: the listeners
    are bound there), else none."""
    svc = model.services.get((str(ingress_option(options, "gateway_namespace")), str(ingress_option(options, "gateway_service"))))
    if svc is None:
        bound = str(ingress_option(options, "gateway_address"))
        specific = is_ip(bound) and not ipaddress.ip_address(bound).is_unspecified
        return [{"type": "IPAddress", "value": bound}] if specific else []
    found = svc.load_balancer or ((svc.cluster_ip,) if svc.cluster_ip else ())
    return [{"type": "IPAddress", "value": a} if is_ip(a) else {"type": "Hostname", "value": a} for a in found]


def _gateway(st: GatewayStatus, addresses: list[dict[str, str]], options: argparse.Namespace) -> ObjectStatus | None:
    gw: Gateway = st.gateway
    gen = gw.meta.generation
    if _stale(gw.conditions, gen):
        return None
    stamp = now()
    conds = list(st.conditions)
    if not addresses and conds[1].type == PROGRAMMED and conds[1].status:
        service = f"{ingress_option(options, 'gateway_namespace')}/{ingress_option(options, 'gateway_service')}"
        conds[1] = Condition(PROGRAMMED, False, "AddressNotAssigned",
                             f"the gateway Service {service} (--gateway-service) has no address yet")
    listeners = []
    current = {ls.get("name"): ls for ls in gw.listener_status}
    for ls in st.listeners:
        old = current.get(ls.name) or {}
        listeners.append({
            "name": ls.name,
            "supportedKinds": [{"group": GROUP, "kind": k} for k in ls.supported_kinds],
            "attachedRoutes": ls.attached_routes,
            "conditions": _conditions(ls.conditions, old.get("conditions") or [], gen, stamp=stamp),
        })
    desired = {"addresses": addresses if st.listeners else [],
               "conditions": _conditions(conds, gw.conditions, gen, OWNED_GATEWAY, stamp),
               "listeners": listeners}
    current_status = {"addresses": [dict(a) for a in gw.addresses], "conditions": [dict(c) for c in gw.conditions],
                      "listeners": [dict(ls) for ls in gw.listener_status]}
    path = f"/apis/{API_V1}/namespaces/{gw.meta.namespace}/gateways/{gw.meta.name}"
    return _emit(path, gw.meta, desired, current_status, gw.ref)


def statuses(result: Plan, model: Model, options: argparse.Namespace) -> list[ObjectStatus]:
    """Every status write the plan asks for (only those that differ from the objects' current status)."""
    out: list[ObjectStatus | None] = []
    controller = controller_name(options)
    for gc, conds in result.classes:
        if _stale(gc.conditions, gc.meta.generation):
            continue
        desired = {"conditions": _conditions(conds, gc.conditions, gc.meta.generation, OWNED_CLASS)}
        out.append(_emit(f"/apis/{API_V1}/gatewayclasses/{gc.name}", gc.meta, desired,
                         {"conditions": [dict(c) for c in gc.conditions]}, gc.ref))
    addresses = gateway_addresses(model, options)
    out.extend(_gateway(st, addresses, options) for st in result.gateways)
    live: set[str] = set()
    for route, parents in result.routes:
        plural = "httproutes" if route.kind == "HTTPRoute" else "grpcroutes"
        path = f"/apis/{API_V1}/namespaces/{route.meta.namespace}/{plural}/{route.meta.name}"
        live.add(path)
        with _lock:
            old_answer = _route_answers.get(path)
        if old_answer is not None and old_answer[0] is route and old_answer[1] == parents and old_answer[2] == controller:
            out.append(old_answer[3])  # the same object version and conditions: the same answer, no JSON work
            continue
        answer = _route_status(route, parents, controller, path)
        with _lock:
            _route_answers[path] = (route, parents, controller, answer)
        out.append(answer)
    with _lock:
        for gone in [p for p in _route_answers if p not in live]:
            del _route_answers[gone]
    return [s for s in out if s is not None]


#: The last answer per route path: (route object, its parent statuses, controller, answer). A route's
#: status is a function of those alone, so a build that changed one route recomputes one route's JSON.
_route_answers: dict[str, tuple[Route, tuple[ParentStatus, ...], str, ObjectStatus | None]] = {}


def _route_status(route: Route, parents: tuple[ParentStatus, ...], controller: str, path: str) -> ObjectStatus | None:
    """One route's ``status.parents`` write (None: nothing to write)."""
    gen = route.meta.generation
    old_ours = {json.dumps(p.get("parentRef"), sort_keys=True): p for p in route.parents
                if p.get("controllerName") == controller}
    others = [dict(p) for p in route.parents if p.get("controllerName") != controller]
    if any(_stale(p.get("conditions") or [], gen) for p in old_ours.values()):
        return None
    stamp = now()
    ours = []
    for ps in parents:
        ref = ps.ref.to_dict()
        old = old_ours.get(json.dumps(ref, sort_keys=True)) or {}
        ours.append({"parentRef": ref, "controllerName": controller,
                     "conditions": _conditions(ps.conditions, old.get("conditions") or [], gen, stamp=stamp)})
    desired = {"parents": others + ours}
    return _emit(path, route.meta, desired, {"parents": [dict(p) for p in route.parents]}, route.ref)
