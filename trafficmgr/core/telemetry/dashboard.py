"""The dashboard's data (``GET /debug/dashboard/data``): golden signals, the service graph, proxies,
Warning Events and routes, as one JSON document (the contract is in the module docs of
:mod:`trafficmgr.core.telemetry`).

Every number comes from two real readings of the proxies' Envoy counters (:mod:`.scrape`): a rate is
``(newest - oldest) / seconds between them`` within the window; latency quantiles come from the
difference of the two readings' ``upstream_rq_time`` histograms. Without two readings, or without
requests in between, the number is ``None`` (JSON null), never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from trafficmgr.core.labels import LabelRegistry
from trafficmgr.core.model import GATEWAY, GATEWAY_CLUSTER, Endpoint, Model, normalize_ip
from trafficmgr.core.telemetry.columns import add_columns
from trafficmgr.core.telemetry.promtext import ClusterStats, Reading, quantile
from trafficmgr.core.telemetry.scrape import stats_url

#: Seconds two readings must be apart for a rate.
MIN_SPAN_S = 0.5


@attrs.frozen
class Target:
    """A proxy to read: its stats ``url``, the ``pod`` it runs for (``(namespace, name)``) and the node
    names (``ns/name``) its outbound requests are attributed to in the graph (its pod's Services, or
    ``<ns>/traffic-ingress`` for a gateway)."""

    url: str
    pod: tuple[str, str] | None
    callers: tuple[str, ...]


def pod_services(model: Model) -> dict[tuple[str, str], set[str]]:
    """``(namespace, pod) -> {"ns/service", ...}``: the Services whose endpoints include the pod."""
    out: dict[tuple[str, str], set[str]] = {}
    for (ns, name, _port), endpoints in model.endpoints.items():
        for ep in endpoints:
            if ep.pod:
                out.setdefault((ep.namespace or ns, ep.pod), set()).add(f"{ns}/{name}")
    return out


def _peer_ip(peer: str) -> str:
    from trafficmgr.core.xds.streams import parse_peer

    return normalize_ip(parse_peer(peer) if peer.startswith(("ipv4:", "ipv6:")) else peer)


def stats_targets(model: Model | None, streams: Iterable[Mapping[str, Any]], port: int) -> dict[str, Target]:
    """The proxies to read, by name: every live sidecar pod of ``model`` with an IP (node id
    ``<pod>.<ns>``; whichever replica holds its stream), and each gateway stream of ``streams`` whose peer
    address is a live pod's IP (``<node id>@<ip>``). Only pod IPs from the API are ever used: a proxy
    cannot point the control plane at another address."""
    if model is None or not port:
        return {}
    services = pod_services(model)
    targets: dict[str, Target] = {}
    by_ip: dict[str, tuple[str, str]] = {}
    for key, pod in model.pods.items():
        for ip in pod.holds_ips:
            by_ip[ip] = key
        if pod.sidecar and pod.holds_ips:
            targets[pod.node_id] = Target(stats_url(pod.holds_ips[0], port), key, tuple(sorted(services.get(key, ()))))
    for s in streams:
        if s.get("view") != GATEWAY:
            continue
        ip = _peer_ip(str(s.get("peer") or ""))
        owner = by_ip.get(ip)
        if owner is None:
            continue
        targets[f"{s.get('node_id')}@{ip}"] = Target(stats_url(ip, port), owner, (f"{owner[0]}/{GATEWAY_CLUSTER}",))
    return targets


@attrs.define
class _Delta:
    """Requests, 5xx and latency buckets between two readings, summed over proxies; ``rate`` sums each
    proxy's own ``requests / seconds`` (their spans differ a little)."""

    rate: float = 0.0
    total: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = attrs.field(factory=dict)

    def add(self, new: ClusterStats, old: ClusterStats | None, seconds: float) -> None:
        old = old or ClusterStats()
        if new.rq_total < old.rq_total:  # the proxy restarted: its counters began again
            return
        self.rate += (new.rq_total - old.rq_total) / seconds
        self.total += new.rq_total - old.rq_total
        self.errors += max(0.0, new.rq_5xx - old.rq_5xx)
        for bound, count in new.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + max(0.0, count - old.buckets.get(bound, 0.0))


def _span(history: Sequence[tuple[float, Reading]]) -> tuple[Reading, Reading, float] | None:
    if len(history) < 2:
        return None
    (t0, old), (t1, new) = history[0], history[-1]
    if t1 - t0 < MIN_SPAN_S:
        return None
    return old, new, t1 - t0


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def _signals(d: _Delta | None) -> dict[str, float | None]:
    if d is None:
        return {"rps": None, "error_rate": None, "p50_ms": None, "p99_ms": None}
    timed = d.buckets.get(math.inf, max(d.buckets.values(), default=0.0)) > 0
    return {"rps": _round(d.rate), "error_rate": _round(d.errors / d.total, 4) if d.total else None,
            "p50_ms": _round(quantile(0.5, d.buckets)) if timed else None,
            "p99_ms": _round(quantile(0.99, d.buckets)) if timed else None}


def _label_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, frozenset, set)):
        return ",".join(str(v) for v in value)
    return str(value)


#: ``(endpoints of the upstream rows, in order) -> columns``: the plugins' ``trafficmgr_dashboard_endpoint_columns``.
Columns = Callable[[tuple[Endpoint, ...]], Iterable[Any]]


def golden_signals(model: Model | None, targets: Mapping[str, Target], readings: Mapping[str, Sequence[tuple[float, Reading]]],
                   registry: LabelRegistry | None, traces_url: Any = None, columns: Columns | None = None,
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    """``(services, edges, upstream_columns)`` of the contract from the readings of ``targets``.
    ``traces_url``: a function ``(namespace, name) -> str | None`` giving a service's recent-traces URL, or
    None. ``columns``: asked once for the plugins' columns of the upstream rows (:mod:`.columns`)."""
    if model is None:
        return [], [], []
    per_service: dict[str, _Delta] = {}
    edges: dict[tuple[str, str], _Delta] = {}
    inbound: dict[tuple[str, str], tuple[float | None, float | None]] = {}
    for name, target in targets.items():
        span = _span(readings.get(name, ()))
        if span is None:
            continue
        old, new, seconds = span
        if target.pod is not None and new.inbound_total is not None and old.inbound_total is not None \
                and new.inbound_total >= old.inbound_total:
            total = new.inbound_total - old.inbound_total
            errors = max(0.0, (new.inbound_5xx or 0.0) - (old.inbound_5xx or 0.0))
            inbound[target.pod] = (_round(total / seconds), _round(errors / total, 4) if total else None)
        for cluster, stats in new.clusters.items():
            _port, _, rest = cluster.partition("|")
            callee_ns, _, callee_name = rest.removesuffix(".outbound").partition("|")
            callee = f"{callee_ns}/{callee_name}"
            per_service.setdefault(callee, _Delta()).add(stats, old.clusters.get(cluster), seconds)
            for caller in target.callers:
                edges.setdefault((caller, callee), _Delta()).add(stats, old.clusters.get(cluster), seconds)
    services: list[dict[str, Any]] = []
    shown: list[tuple[dict[str, Any], Endpoint]] = []  # every upstream row with its endpoint, in row order
    for (ns, name), svc in sorted(model.services.items()):
        if svc.kind != "Service":
            continue
        key = f"{ns}/{name}"
        labels = []
        for label_key, value in sorted(svc.labels.items()):
            spec = registry.spec(label_key) if registry is not None else None
            labels.append({"key": label_key, "value": _label_value(value), "plugin": spec.plugin if spec else ""})
        upstreams: dict[tuple[str, str], tuple[dict[str, Any], Endpoint]] = {}
        for port in svc.ports:
            for ep in model.endpoints_of(svc, port):
                pod = ep.pod or ""
                if (pod, ep.address) in upstreams:  # one row per pod, with the address of its first port
                    continue
                rps, error_rate = inbound.get((ep.namespace or ns, pod), (None, None)) if pod else (None, None)
                upstreams[(pod, ep.address)] = ({"pod": pod, "address": f"{ep.address}:{ep.port}", "rps": rps,
                                                 "error_rate": error_rate}, ep)
        shown.extend(upstreams[k] for k in sorted(upstreams))
        row = {"namespace": ns, "name": name, "labels": labels, **_signals(per_service.get(key)),
               "upstreams": [upstreams[k][0] for k in sorted(upstreams)],
               "traces_url": traces_url(ns, name) if traces_url is not None else None}
        services.append(row)
    edge_rows = [{"from": a, "to": b, "rps": _round(d.rate) or 0.0,
                  "error_rate": _round(d.errors / d.total, 4) if d.total else 0.0}
                 for (a, b), d in sorted(edges.items()) if d.total > 0]
    heads = add_columns([r for r, _ in shown], columns(tuple(ep for _, ep in shown))) if columns is not None else []
    return services, edge_rows, heads


def last_nacks(nacks: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``node id -> {"type", "error", "time"}``: each node's latest NACK in ``nacks`` (oldest first, as
    ``XdsServer.nacks()`` gives them), kept after later ACKs: the last thing a proxy refused."""
    out: dict[str, dict[str, Any]] = {}
    for n in nacks:
        out[str(n.get("node_id"))] = {"type": n.get("type"), "error": n.get("error"), "time": n.get("at")}
    return out


def proxy_rows(streams: Iterable[Mapping[str, Any]], nacks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The proxy-status rows plus ``last_nack`` (None when the node never NACKed since this replica started)."""
    last = last_nacks(nacks)
    return [{**s, "last_nack": last.get(str(s.get("node_id")))} for s in streams]
