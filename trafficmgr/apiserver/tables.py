"""Server-side ``meta.k8s.io/v1 Table`` rendering for kubectl's human-readable output."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from typing import Any

from .discovery import ResourceType

Column = tuple[str, str, int]  # name, type, priority
Row = Callable[[dict], list[Any]]


def human_age(ts: str | None, now: _dt.datetime | None = None) -> str:
    """kubectl-style short duration since ``ts`` (``5s``, ``3m12s``, ``4h``, ``2d``)."""
    if not ts:
        return "<unknown>"
    try:
        t = _dt.datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=_dt.UTC)
    except ValueError:
        return "<unknown>"
    now = now or _dt.datetime.now(_dt.UTC)
    s = max(0, int((now - t).total_seconds()))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    return f"{h // 24}d"


def _age(o: dict) -> str:
    return human_age(o["metadata"].get("creationTimestamp"))


def _pod_row(o: dict) -> list[Any]:
    spec, st = o.get("spec") or {}, o.get("status") or {}
    cs = st.get("containerStatuses") or []
    total = len(spec.get("containers") or [])
    ready = sum(1 for c in cs if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in cs)
    status = st.get("reason") or st.get("phase") or "Unknown"
    for c in cs:
        waiting = (c.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            status = waiting["reason"]
    gates = spec.get("readinessGates") or []
    return [o["metadata"]["name"], f"{ready}/{total}", status, restarts, _age(o), st.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>", st.get("nominatedNodeName") or "<none>",
            f"{len(gates)}/{len(gates)}" if gates else "<none>"]


def _svc_ports(spec: dict) -> str:
    out = []
    for p in spec.get("ports") or []:
        s = f"{p.get('port')}"
        if p.get("nodePort"):
            s += f":{p['nodePort']}"
        out.append(f"{s}/{p.get('protocol', 'TCP')}")
    return ",".join(out) or "<none>"


def _svc_row(o: dict) -> list[Any]:
    spec = o.get("spec") or {}
    ext = spec.get("externalIPs") or []
    lb = [i.get("ip") or i.get("hostname") for i in ((o.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []]
    if spec.get("type") == "ExternalName":
        external = spec.get("externalName", "<none>")
    elif lb or ext:
        external = ",".join([x for x in lb + ext if x])
    elif spec.get("type") == "LoadBalancer":
        external = "<pending>"
    else:
        external = "<none>"
    sel = spec.get("selector") or {}
    return [o["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP") or "<none>", external,
            _svc_ports(spec), _age(o), ",".join(f"{k}={v}" for k, v in sorted(sel.items())) or "<none>"]


def _containers(o: dict) -> tuple[str, str]:
    cs = ((((o.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")) or []
    return ",".join(c.get("name", "") for c in cs), ",".join(c.get("image", "") for c in cs)


def _selector(o: dict) -> str:
    ml = ((o.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(ml.items())) or "<none>"


def _deploy_row(o: dict) -> list[Any]:
    spec, st = o.get("spec") or {}, o.get("status") or {}
    names, images = _containers(o)
    return [o["metadata"]["name"], f"{st.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
            st.get("updatedReplicas", 0), st.get("availableReplicas", 0), _age(o), names, images, _selector(o)]


def _rs_row(o: dict) -> list[Any]:
    spec, st = o.get("spec") or {}, o.get("status") or {}
    names, images = _containers(o)
    return [o["metadata"]["name"], spec.get("replicas", 1), st.get("replicas", 0), st.get("readyReplicas", 0),
            _age(o), names, images, _selector(o)]


def _sts_row(o: dict) -> list[Any]:
    spec, st = o.get("spec") or {}, o.get("status") or {}
    names, images = _containers(o)
    return [o["metadata"]["name"], f"{st.get('readyReplicas', 0)}/{spec.get('replicas', 1)}", _age(o), names, images]


def _ds_row(o: dict) -> list[Any]:
    st = o.get("status") or {}
    ns = (((o.get("spec") or {}).get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
    names, images = _containers(o)
    return [o["metadata"]["name"], st.get("desiredNumberScheduled", 0), st.get("currentNumberScheduled", 0),
            st.get("numberReady", 0), st.get("updatedNumberScheduled", 0), st.get("numberAvailable", 0),
            ",".join(f"{k}={v}" for k, v in ns.items()) or "<none>", _age(o), names, images, _selector(o)]


def _ing_row(o: dict) -> list[Any]:
    spec = o.get("spec") or {}
    hosts = [r.get("host") for r in spec.get("rules") or [] if r.get("host")]
    lb = ((o.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    addr = ",".join(i.get("ip") or i.get("hostname") or "" for i in lb)
    ports = "80, 443" if spec.get("tls") else "80"
    return [o["metadata"]["name"], spec.get("ingressClassName") or "<none>", ",".join(hosts) or "*", addr,
            ports, _age(o)]


def _slice_row(o: dict) -> list[Any]:
    ports = ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>"
    addrs = [a for e in o.get("endpoints") or [] for a in e.get("addresses") or []]
    shown = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
    return [o["metadata"]["name"], o.get("addressType", ""), ports, shown or "<unset>", _age(o)]


def _ep_row(o: dict) -> list[Any]:
    eps = []
    for s in o.get("subsets") or []:
        for a in s.get("addresses") or []:
            for p in s.get("ports") or [{}]:
                eps.append(f"{a.get('ip')}:{p.get('port')}" if p.get("port") else a.get("ip"))
    return [o["metadata"]["name"], ",".join(eps[:3]) + (f" + {len(eps) - 3} more..." if len(eps) > 3 else "")
            or "<none>", _age(o)]


def _event_row(o: dict) -> list[Any]:
    io = o.get("involvedObject") or o.get("regarding") or {}
    last = o.get("lastTimestamp") or o.get("eventTime") or o["metadata"].get("creationTimestamp")
    return [human_age(last), o.get("type", ""), o.get("reason", ""),
            f"{str(io.get('kind', '')).lower()}/{io.get('name', '')}", o.get("message") or o.get("note", "")]


def _node_row(o: dict) -> list[Any]:
    conds = (o.get("status") or {}).get("conditions") or []
    ready = next((c for c in conds if c.get("type") == "Ready"), None)
    status = "Ready" if ready and ready.get("status") == "True" else "NotReady" if ready else "Unknown"
    version = ((o.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "")
    roles = [k.split("/", 1)[1] for k in (o["metadata"].get("labels") or {}) if k.startswith("node-role.kubernetes.io/")]
    return [o["metadata"]["name"], status, ",".join(roles) or "<none>", _age(o), version]


S, INT = "string", "integer"  # column types
TABLES: dict[str, tuple[list[Column], Row]] = {
    "pods": ([("Name", S, 0), ("Ready", S, 0), ("Status", S, 0), ("Restarts", INT, 0), ("Age", S, 0),
              ("IP", S, 1), ("Node", S, 1), ("Nominated Node", S, 1), ("Readiness Gates", S, 1)], _pod_row),
    "services": ([("Name", S, 0), ("Type", S, 0), ("Cluster-IP", S, 0), ("External-IP", S, 0), ("Port(s)", S, 0),
                  ("Age", S, 0), ("Selector", S, 1)], _svc_row),
    "deployments.apps": ([("Name", S, 0), ("Ready", S, 0), ("Up-to-date", INT, 0), ("Available", INT, 0),
                          ("Age", S, 0), ("Containers", S, 1), ("Images", S, 1), ("Selector", S, 1)], _deploy_row),
    "replicasets.apps": ([("Name", S, 0), ("Desired", INT, 0), ("Current", INT, 0), ("Ready", INT, 0), ("Age", S, 0),
                          ("Containers", S, 1), ("Images", S, 1), ("Selector", S, 1)], _rs_row),
    "statefulsets.apps": ([("Name", S, 0), ("Ready", S, 0), ("Age", S, 0), ("Containers", S, 1),
                           ("Images", S, 1)], _sts_row),
    "daemonsets.apps": ([("Name", S, 0), ("Desired", INT, 0), ("Current", INT, 0), ("Ready", INT, 0),
                         ("Up-to-date", INT, 0), ("Available", INT, 0), ("Node Selector", S, 0), ("Age", S, 0),
                         ("Containers", S, 1), ("Images", S, 1), ("Selector", S, 1)], _ds_row),
    "ingresses.networking.k8s.io": ([("Name", S, 0), ("Class", S, 0), ("Hosts", S, 0), ("Address", S, 0),
                                     ("Ports", S, 0), ("Age", S, 0)], _ing_row),
    "ingressclasses.networking.k8s.io": (
        [("Name", S, 0), ("Controller", S, 0), ("Parameters", S, 0), ("Age", S, 0)],
        lambda o: [o["metadata"]["name"], (o.get("spec") or {}).get("controller", ""), "<none>", _age(o)]),
    "endpointslices.discovery.k8s.io": ([("Name", S, 0), ("AddressType", S, 0), ("Ports", S, 0),
                                         ("Endpoints", S, 0), ("Age", S, 0)], _slice_row),
    "endpoints": ([("Name", S, 0), ("Endpoints", S, 0), ("Age", S, 0)], _ep_row),
    "events": ([("Last Seen", S, 0), ("Type", S, 0), ("Reason", S, 0), ("Object", S, 0), ("Message", S, 0)],
               _event_row),
    "events.events.k8s.io": ([("Last Seen", S, 0), ("Type", S, 0), ("Reason", S, 0), ("Object", S, 0),
                              ("Message", S, 0)], _event_row),
    "secrets": ([("Name", S, 0), ("Type", S, 0), ("Data", INT, 0), ("Age", S, 0)],
                lambda o: [o["metadata"]["name"], o.get("type", "Opaque"), len(o.get("data") or {}), _age(o)]),
    "configmaps": ([("Name", S, 0), ("Data", INT, 0), ("Age", S, 0)],
                   lambda o: [o["metadata"]["name"], len(o.get("data") or {}) + len(o.get("binaryData") or {}),
                              _age(o)]),
    "namespaces": ([("Name", S, 0), ("Status", S, 0), ("Age", S, 0)],
                   lambda o: [o["metadata"]["name"], (o.get("status") or {}).get("phase", "Active"), _age(o)]),
    "nodes": ([("Name", S, 0), ("Status", S, 0), ("Roles", S, 0), ("Age", S, 0), ("Version", S, 0)], _node_row),
    "customresourcedefinitions.apiextensions.k8s.io": (
        [("Name", S, 0), ("Created At", "date", 0)],
        lambda o: [o["metadata"]["name"], o["metadata"].get("creationTimestamp", "")]),
}
_DEFAULT: tuple[list[Column], Row] = ([("Name", S, 0), ("Age", S, 0)], lambda o: [o["metadata"]["name"], _age(o)])


def _partial(o: dict) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}


def table(rt: ResourceType, objs: list[dict], resource_version: str, include_object: str = "Metadata",
          columns: bool = True, spec: tuple[list[Column], Row] | None = None) -> dict:
    """Render ``objs`` as a Table; ``include_object`` is ``None``, ``Metadata`` or ``Object``; ``spec``:
    the columns and row function of a kind without an entry in ``TABLES`` (a custom resource's)."""
    cols, row_fn = spec or TABLES.get(rt.key, _DEFAULT)
    rows = []
    for o in objs:
        row: dict = {"cells": row_fn(o)}
        if include_object == "Object":
            row["object"] = o
        elif include_object != "None":
            row["object"] = _partial(o)
        rows.append(row)
    defs = [{"name": n, "type": t, "format": "name" if n == "Name" else "", "description": n, "priority": p}
            for n, t, p in cols] if columns else []
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": defs, "rows": rows}
