"""Control-plane metrics whose label values could come from users: each stays a fixed set (review of issue 20).

- ``trafficmgr_snapshots_rejected_total`` once had the view name as its label: a scoped view is
  ``sidecar~<id>``, one per distinct ``traffic.scope``, so users' labels minted series. Here 50 scoped
  views, built by the real builder from 50 namespaces with ``traffic.scope: namespace`` pods, are refused
  by the real consistency gate (each snapshot made dangling first) and the counter gains the one value
  ``sidecar-scoped``; each view's name is still in its log line and in ``last_error``.
- ``trafficmgr_label_errors_total{kind,label}`` once had the label key as written: ``traffic.port.<port>``
  keys allowed 65535 series per kind (and any text between ``traffic.port.`` and the end). Here 300 invalid
  port keys on one Service count under the one declared key ``traffic.port.<port>``; keys no plugin
  declares are not counted at all.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from trafficmgr.core import cache, metrics
from trafficmgr.core.controlplane import ControlPlane
from trafficmgr.core.kube.assemble import CORE_KINDS
from trafficmgr.core.model import SIDECAR
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.scopes import view_name

KINDS = {k.kind: k for k in CORE_KINDS}
SCOPES = 50


def _series(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of counter ``name`` (``<name>_total``): sorted label pairs -> value."""
    out = {}
    for family in metrics.REGISTRY.collect():
        if family.name == name:
            for s in family.samples:
                if s.name == f"{name}_total":
                    out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _mesh(namespaces: int) -> dict[str, list[dict[str, Any]]]:
    """``namespaces`` namespaces ``team-<i>``, each with a Service and one pod labeled ``traffic.scope:
    namespace``: one scoped sidecar view per namespace."""
    out: dict[str, list[dict[str, Any]]] = {"Namespace": [], "Service": [], "Pod": []}
    for i in range(namespaces):
        ns = f"team-{i}"
        out["Namespace"].append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "uid": f"n{i}"}})
        out["Service"].append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": ns, "uid": f"s{i}", "labels": {"traffic.port.8080": "http"}},
            "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}", "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 8080}]}})
        out["Pod"].append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": ns, "uid": f"p{i}", "resourceVersion": "1",
                         "labels": {"app": "web", "traffic.scope": "namespace"}},
            "spec": {"nodeName": "n"}, "status": {"phase": "Running", "podIP": f"10.244.{i // 250}.{i % 250 + 1}"}})
    return out


def _dangling(snap: cache.Snapshot) -> cache.Snapshot:
    """``snap`` without its endpoint assignments: every EDS cluster then references missing endpoints."""
    types = {t: list(ts.resources.values()) for t, ts in snap.types.items()}
    types[cache.ENDPOINT] = []
    return cache.Snapshot.build(types)


def test_fifty_rejected_scoped_views_count_under_one_role(caplog: pytest.LogCaptureFixture) -> None:
    cp = ControlPlane(PluginHost.load([]))
    for kind, items in _mesh(SCOPES).items():
        cp.assembler.apply("RELIST", KINDS[kind], items)
    model = cp.assembler.model()
    scoped = {view_name((f"team-{i}",)) for i in range(SCOPES)}
    build = cp.builder.build

    def gate_refuses_scoped_views(m: Any) -> dict[str, cache.Snapshot]:
        snaps = build(m)
        assert scoped <= set(snaps), sorted(snaps)  # the real builder made the 50 scoped views
        return {v: (_dangling(s) if v in scoped else s) for v, s in snaps.items()}

    cp.builder.build = gate_refuses_scoped_views  # type: ignore[method-assign,assignment]
    before = _series("trafficmgr_snapshots_rejected")
    caplog.set_level(logging.ERROR, logger="trafficmgr.core.controlplane")
    cp.publish_model(model)

    after = _series("trafficmgr_snapshots_rejected")
    grown = {labels: value - before.get(labels, 0.0) for labels, value in after.items() if value != before.get(labels, 0.0)}
    assert grown == {(("role", "sidecar-scoped"),): SCOPES}, grown
    assert {dict(labels)["role"] for labels in after} <= set(metrics.PROXY_ROLES)
    assert cp.cache.get(SIDECAR) is not None and all(cp.cache.get(v) is None for v in scoped)
    # Which view, and why, is still told: in each log line, and the last one in last_error.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(f"view {v!r}" in logged for v in scoped)
    assert "references missing endpoints" in cp.last_error and any(f"view {v!r}" in cp.last_error for v in scoped)


def _service(labels: dict[str, str], uid: str = "svc-1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "uid": uid, "resourceVersion": "1", "labels": labels},
            "spec": {"clusterIP": "10.96.0.9", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 8080}]}}


def test_many_port_keys_count_under_the_declared_key() -> None:
    cp = ControlPlane(PluginHost.load([]))
    labels = {f"traffic.port.{port}": "not-a-protocol" for port in range(20000, 20300)}  # invalid values
    labels |= {f"traffic.port.x{i}": "http" for i in range(20)}  # not a port number in the key
    labels |= {f"traffic.made-up.{i}": "1" for i in range(20)}  # declared by no plugin: ignored
    errors: list[Any] = []
    cp.assembler.on_label_errors = errors.extend
    before = _series("trafficmgr_label_errors")
    cp.assembler.apply("RELIST", KINDS["Service"], [_service(labels)])

    assert len(errors) == 320 and {e.key for e in errors} >= {"traffic.port.20000", "traffic.port.x0"}  # each reported
    after = _series("trafficmgr_label_errors")
    grown = {labels: value - before.get(labels, 0.0) for labels, value in after.items() if value != before.get(labels, 0.0)}
    assert grown == {(("kind", "Service"), ("label", "traffic.port.<port>")): 320}, grown
    # No raw key was minted as a label value, by this test or any earlier one in the process (the series
    # other tests minted come from plugins this host did not load, so they are checked by shape, not by set).
    raw = {dict(labels)["label"] for labels in after if re.fullmatch(r"traffic\.(port\.\w+|made-up\.\d+)", dict(labels)["label"])}
    assert raw == set(), sorted(raw)
