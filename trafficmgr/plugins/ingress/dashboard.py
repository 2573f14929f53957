"""The ingress plugin's rows of the dashboard's routes table (``trafficmgr_dashboard_routes``)."""

from __future__ import annotations

import argparse
from typing import Any

from trafficmgr.plugin import Model, hookimpl
from trafficmgr.plugins.ingress.ir import INGRESS, Backend, option, selected_ingresses


def _backend(backend: Backend | None) -> str:
    return f"{backend.service}:{backend.port}" if backend is not None else "(unsupported backend)"


@hookimpl
def trafficmgr_dashboard_routes(model: Model, options: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per Ingress: hosts (``*`` for a rule without host), one match per path (``<pathType>
    <path>``, ``default`` for ``defaultBackend``), backends ``service:port``, and the status: ``Accepted``
    when this gateway serves it (with what convert could not use), else why not (its class)."""
    served = {(i.namespace, i.name) for i in selected_ingresses(model, options)}
    klass = option(options, "ingress_class")
    rows = []
    for (namespace, name), ing in sorted((model.extra.get(INGRESS) or {}).items()):
        hosts, matches, backends = [], [], []
        for rule in ing.rules:
            host = rule.host or "*"
            if host not in hosts:
                hosts.append(host)
            for p in rule.paths:
                matches.append(f"{p.path_type} {p.path}")
                b = _backend(p.backend)
                if b not in backends:
                    backends.append(b)
        if ing.default_backend is not None:
            matches.append("default")
            if _backend(ing.default_backend) not in backends:
                backends.append(_backend(ing.default_backend))
        if (namespace, name) in served:
            status = "Accepted" + (f" ({'; '.join(ing.problems)})" if ing.problems else "")
        else:
            status = (f"not served: class {ing.class_name!r} is not {klass!r}" if ing.class_name
                      else f"not served: no class, and IngressClass {klass!r} is not the default")
        rows.append({"kind": "Ingress", "namespace": namespace, "name": name, "hosts": hosts, "matches": matches,
                     "backends": backends, "status": status})
    return rows
