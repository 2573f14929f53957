"""Clusters and ClusterLoadAssignments: one cluster per served service port, shared by every view.

A ``direct`` port is a STATIC cluster to the service address, a headless service's port an ORIGINAL_DST
cluster, anything else an EDS cluster whose assignment lists the ready endpoints. Plugins mutate both
through ``trafficmgr_cluster`` and ``trafficmgr_endpoints`` (role ``shared``).
"""

from __future__ import annotations

import attrs
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from trafficmgr.core import cache
from trafficmgr.core.model import DIRECT, HTTP, HTTP2_UPSTREAM, Service, ServicePort
from trafficmgr.core.protos import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    ads_config_source,
    downstream_protocol_upstream,
    duration_ms,
    http2_upstream,
    socket_address,
)
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.core.translate.hooks import Hooks
from trafficmgr.core.translate.memo import Memo
from trafficmgr.core.translate.services import Changes, ServiceState


def is_eds(svc: Service, port: ServicePort) -> bool:
    return port.protocol != DIRECT and not svc.headless


@attrs.frozen(slots=True)
class ServiceClusters:
    """The cluster and assignment resources of one destination."""

    clusters: tuple[cache.Resource, ...]
    assignments: tuple[cache.Resource, ...]


class ClusterTranslator:
    """Builds the shared cluster and endpoint :class:`~trafficmgr.core.cache.TypeSet` pair in
    O(changed services): the previous sets are derived with the changed resources."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self._clusters: Memo[str, cache.Resource] = Memo("clusters")
        self._assignments: Memo[str, cache.Resource] = Memo("assignments")
        self._out: dict[tuple[str, str], ServiceClusters] = {}
        self._shared: dict[str, cache.TypeSet] | None = None

    def translate(self, changes: Changes, ctx: BuildContext) -> dict[str, cache.TypeSet]:
        if self._shared is not None and not changes.any:
            return self._shared
        before = {old.key: self._out.pop(old.key) for old in changes.removed if old.key in self._out}
        for state in changes.removed:
            self._forget(before.get(state.key))
        cluster_changes: dict[str, cache.Resource | None] = {}
        assignment_changes: dict[str, cache.Resource | None] = {}
        for old, new in changes.replaced:
            prev = self._out.get(new.key) if old is not None else None
            out = self._service(new, ctx)
            self._out[new.key] = out
            if prev is not None:
                gone = {r.name for r in prev.clusters} - {r.name for r in out.clusters}
                self._clusters.drop(gone)
                self._assignments.drop(gone)
            _diff(cluster_changes, prev.clusters if prev else (), out.clusters)
            _diff(assignment_changes, prev.assignments if prev else (), out.assignments)
        for out in before.values():
            _diff(cluster_changes, out.clusters, ())
            _diff(assignment_changes, out.assignments, ())
        if self._shared is None:
            outs = [self._out[s.key] for s in changes.states]
            self._shared = {
                cache.CLUSTER: cache.TypeSet(cache.CLUSTER, [r for o in outs for r in o.clusters]),
                cache.ENDPOINT: cache.TypeSet(cache.ENDPOINT, [r for o in outs for r in o.assignments]),
            }
        else:
            self._shared = {
                cache.CLUSTER: self._shared[cache.CLUSTER].derive(cluster_changes),
                cache.ENDPOINT: self._shared[cache.ENDPOINT].derive(assignment_changes),
            }
        return self._shared

    def _forget(self, out: ServiceClusters | None) -> None:
        if out is not None:
            self._clusters.drop(r.name for r in out.clusters)
            self._assignments.drop(r.name for r in out.assignments)

    def _service(self, state: ServiceState, ctx: BuildContext) -> ServiceClusters:
        svc = state.svc
        clusters: list[cache.Resource] = []
        assignments: list[cache.Resource] = []
        for port in state.ports():
            name = svc.cluster_name(port)
            clusters.append(self._clusters.get(name, (svc, port), self._cluster, svc, port, name, ctx))
            if is_eds(svc, port):
                endpoints = ctx.model.endpoints_of(svc, port)
                assignments.append(self._assignments.get(name, (svc, port, endpoints), self._assignment, svc, port, name, ctx))
        return ServiceClusters(tuple(clusters), tuple(assignments))

    def _cluster(self, svc: Service, port: ServicePort, name: str, ctx: BuildContext) -> cache.Resource:
        c = cluster_pb2.Cluster(name=name, connect_timeout=duration_ms(DEFAULT_CONNECT_TIMEOUT_MS))
        refs: list[tuple[str, str]] = []
        if port.protocol == DIRECT:
            c.type = cluster_pb2.Cluster.STATIC
            c.load_assignment.cluster_name = name
            if svc.cluster_ip:
                lb = c.load_assignment.endpoints.add().lb_endpoints.add()
                lb.endpoint.address.CopyFrom(socket_address(svc.cluster_ip, port.port))
        elif svc.headless:
            c.type = cluster_pb2.Cluster.ORIGINAL_DST
            c.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
        else:
            c.type = cluster_pb2.Cluster.EDS
            c.eds_cluster_config.eds_config.CopyFrom(ads_config_source())
            refs.append((cache.ENDPOINT, name))
        if port.protocol in HTTP2_UPSTREAM:
            http2_upstream(c)
        elif port.protocol == HTTP:
            downstream_protocol_upstream(c)
        self.hooks.cluster(c, svc, port, ctx)
        return ctx.resource(c, name, refs)

    def _assignment(self, svc: Service, port: ServicePort, name: str, ctx: BuildContext) -> cache.Resource:
        ready = tuple(e for e in ctx.model.endpoints_of(svc, port) if e.ready)
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        loc = cla.endpoints.add()
        loc.locality.zone = "default"
        for ep in ready:
            # Fields set in place: no temporary Address message and copy per endpoint (the cold build's
            # largest cost per endpoint).
            sa = loc.lb_endpoints.add().endpoint.address.socket_address
            sa.address, sa.port_value = ep.address, ep.port
        self.hooks.endpoints(cla, svc, port, ready, ctx)
        return ctx.resource(cla, name)


def _diff(changes: dict[str, cache.Resource | None], before: tuple[cache.Resource, ...],
          after: tuple[cache.Resource, ...]) -> None:
    """Record in ``changes`` what differs between one destination's resources before and after."""
    names = {r.name: r for r in before}
    for r in after:
        if names.pop(r.name, None) is not r:
            changes[r.name] = r
    for name in names:
        changes.setdefault(name, None)
