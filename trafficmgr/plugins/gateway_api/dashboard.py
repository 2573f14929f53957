"""The gateway_api plugin's rows of the dashboard's routes table (``trafficmgr_dashboard_routes``)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from trafficmgr.plugin import Model, hookimpl
from trafficmgr.plugins.gateway_api.ir import GRPC_ROUTE, HTTP_ROUTE, BackendRef, Route, RouteMatch


def _match(m: RouteMatch, kind: str) -> str:
    if kind == GRPC_ROUTE:
        text = "/".join(p for p in (m.grpc_service, m.grpc_method) if p) or "any method"
    else:
        text = f"{m.path_type} {m.path}" + (f" {m.method}" if m.method else "")
    extra = [f"header {h.name}{'~' if h.type != 'Exact' else '='}{h.value}" for h in m.headers]
    extra += [f"query {q.name}{'~' if q.type != 'Exact' else '='}{q.value}" for q in m.query]
    return " ".join([text, *extra])


def _backend(b: BackendRef, namespace: str) -> str:
    name = b.name if (b.namespace or namespace) == namespace else f"{b.namespace}/{b.name}"
    kind = "" if b.kind == "Service" and not b.group else f"{b.kind} "
    return f"{kind}{name}{f':{b.port}' if b.port is not None else ''} (weight {b.weight})"


def _status(route: Route) -> str:
    """What the route's ``status.parents`` says (as written by the controllers, ours included): per
    parent, Accepted or the reason it is not; problems the plugin found while reading it."""
    parts = []
    for parent in route.parents:
        ref = parent.get("parentRef") if isinstance(parent, Mapping) else None
        name = ref.get("name", "?") if isinstance(ref, Mapping) else "?"
        conds = {c.get("type"): c for c in parent.get("conditions") or () if isinstance(c, Mapping)}
        accepted = conds.get("Accepted") or {}
        text = "Accepted" if accepted.get("status") == "True" else f"not accepted ({accepted.get('reason') or 'no condition'})"
        resolved = conds.get("ResolvedRefs") or {}
        if resolved and resolved.get("status") != "True":
            text += f", refs not resolved ({resolved.get('reason')})"
        parts.append(f"{name}: {text}")
    if route.problems:
        parts.append("problems: " + "; ".join(route.problems))
    return "; ".join(parts) or "no status yet"


@hookimpl
def trafficmgr_dashboard_routes(model: Model, options: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per HTTPRoute and GRPCRoute: hostnames (``*`` when none), one match per rule match,
    backends ``[ns/]service:port (weight w)``, and the status its parents report."""
    rows = []
    for kind in (HTTP_ROUTE, GRPC_ROUTE):
        for (namespace, name), route in sorted((model.extra.get(kind) or {}).items()):
            matches: list[str] = []
            backends: list[str] = []
            for rule in route.rules:
                matches.extend(_match(m, kind) for m in rule.matches)
                for b in rule.backends:
                    text = _backend(b, namespace)
                    if text not in backends:
                        backends.append(text)
            rows.append({"kind": kind, "namespace": namespace, "name": name, "hosts": list(route.hostnames) or ["*"],
                         "matches": matches, "backends": backends, "status": _status(route)})
    return rows
