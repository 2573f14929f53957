"""The coordinator: model -> one snapshot per role, through the per-output translators.

Plan, then translate (Contour's shape): ``services`` works out what changed, ``plan`` decides the
sidecars' outbound side without protobufs, and one translator per Envoy output builds the resources:
``clusters`` (clusters + endpoints, shared by every view), ``sidecar_outbound``, ``sidecar_inbound``,
``explicit_proxy``; plugins add theirs (the ingress gateway) through ``trafficmgr_resources``. Every
translator memoizes its products on their inputs, so a change to one pod re-translates and
re-serializes only the ClusterLoadAssignment it affects.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from google.protobuf.message import Message

from trafficmgr.core import cache, metrics
from trafficmgr.core.model import GATEWAY, ROLES, SHARED, SIDECAR, Model, ObjectRef
from trafficmgr.core.plugins import PluginHost
from trafficmgr.core.translate.clusters import ClusterTranslator
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.core.translate.explicit_proxy import ExplicitProxyTranslator
from trafficmgr.core.translate.gateway_clusters import GatewayClusters
from trafficmgr.core.translate.hooks import Hooks
from trafficmgr.core.translate.http import HttpFilters
from trafficmgr.core.translate.memo import Memo
from trafficmgr.core.translate.plan import Planner
from trafficmgr.core.translate.scopes import ScopedViews
from trafficmgr.core.translate.services import ServiceTable
from trafficmgr.core.translate.sidecar_inbound import InboundTranslator, inbound_port
from trafficmgr.core.translate.sidecar_outbound import OutboundTranslator

log = logging.getLogger(__name__)


def default_options() -> argparse.Namespace:
    return argparse.Namespace(sidecar_port=10000, sidecar_address="0.0.0.0", explicit_proxy=False, sidecar_inbound_port=15006)


@attrs.define
class BuildStats:
    """What the last build did (for benchmarks, logs and ``/debug/build``)."""

    seconds: float = 0.0
    serialized: dict[str, int] = attrs.field(factory=dict)
    resources: int = 0

    @property
    def total_serialized(self) -> int:
        return sum(self.serialized.values())


class Builder:
    """Builds one :class:`~trafficmgr.core.cache.Snapshot` per role from a :class:`Model`.

    ``build(model)`` is cheap to call repeatedly: unchanged IR objects reuse their resources. Not
    thread-safe: call it from one thread at a time.
    """

    def __init__(self, plugins: PluginHost, options: argparse.Namespace | None = None,
                 reporter: Callable[[ObjectRef, str, str], None] | None = None) -> None:
        self.plugins = plugins
        self.options = options or default_options()
        for key, value in vars(default_options()).items():
            if not hasattr(self.options, key):
                setattr(self.options, key, value)
        self.reporter = reporter or (lambda ref, msg, reason: log.warning("%s: %s", ref, msg))
        self.stats = BuildStats()
        hooks = Hooks(plugins)
        self.hooks = hooks
        self.services = ServiceTable(plugins, self.options, self.reporter)
        self.planner = Planner()
        self.filters = HttpFilters(hooks)
        self.clusters = ClusterTranslator(hooks)
        self.outbound = OutboundTranslator(hooks, self.filters, self.options)
        self.inbound = InboundTranslator(hooks, self.filters, self.options)
        self.proxy = ExplicitProxyTranslator(hooks, self.filters)
        self.gateway_clusters = GatewayClusters()
        self._memos: dict[str, dict[str, Any]] = {role: {} for role in (SHARED, *ROLES)}
        self._resources: dict[tuple[str, str], cache.Resource] = {}
        self._extras: Memo[tuple[str, str], cache.TypeSet] = Memo("view extras")
        self._previous: dict[str, cache.Snapshot] = {}
        #: Scoped sidecar views (``traffic.scope``), made from the sidecar view's products; their own
        #: resources (scoped listener, route configurations) are kept per view.
        self.scoped = ScopedViews(self.outbound, bool(self.options.explicit_proxy))
        self._view_resources: dict[str, dict[tuple[str, str], cache.Resource]] = {}

    def build(self, model: Model) -> dict[str, cache.Snapshot]:
        """Snapshots by view: one per role (``sidecar``, ``gateway``) and one per distinct sidecar scope in use
        (``sidecar~<id>``, see :mod:`~trafficmgr.core.translate.scopes`); deterministic for equal inputs."""
        start = time.perf_counter()
        self.stats = BuildStats()
        changes = self.services.update(model)
        shared = self.clusters.translate(changes, self._context(SHARED, model))
        self.inbound.count(changes)
        snapshots: dict[str, cache.Snapshot] = {}
        scoped: dict[str, cache.Snapshot] = {}
        for role in ROLES:
            ctx = self._context(role, model)
            resources: dict[str, Any] = {t: [] for t in cache.TYPE_ORDER}
            resources.update(shared)
            # Resources of a type every view shares (clusters, endpoints) that only this view has.
            extras: dict[str, dict[str, cache.Resource]] = {}
            if role == SIDECAR:
                out = self.outbound.translate(self.planner.plan(changes), ctx)
                resources[cache.LISTENER].append(out.listener)
                resources[cache.ROUTE].extend(out.routes)
                if self.options.explicit_proxy:
                    resources[cache.LISTENER].append(self.proxy.listener(ctx))
                    resources[cache.ROUTE].append(self.proxy.routes(out.vhosts, ctx, out.clusters))
                elif inbound_port(self.options):
                    resources[cache.LISTENER].append(self.inbound.listener(ctx))
                    extras[cache.CLUSTER] = dict(self.inbound.clusters(ctx))
            for res in self.hooks.resources(ctx):
                if res.type_url == cache.SECRET and role != GATEWAY:
                    log.error("a plugin contributed secret %r to the %s view: dropped (secrets go to gateways only)", res.name, role)
                    continue
                if isinstance(resources[res.type_url], cache.TypeSet):
                    extras.setdefault(res.type_url, {})[res.name] = res
                else:
                    resources[res.type_url].append(res)
            if role == GATEWAY:
                overrides = self.gateway_clusters.overrides(resources[cache.ROUTE], shared[cache.CLUSTER])
                if overrides:
                    extras.setdefault(cache.CLUSTER, {}).update(overrides)
            for type_url, extra in extras.items():
                resources[type_url] = self._with_extras(role, resources[type_url], extra)
            snapshots[role] = cache.Snapshot.build(resources, self._previous.get(role))
            if role == SIDECAR:
                scoped = self.scoped.build(model, out, resources, shared, extras, lambda view: self._view_context(view, model))
                for view in [v for v in self._view_resources if v not in scoped]:
                    del self._view_resources[view]
        snapshots.update(scoped)
        self._previous = snapshots
        self.stats.seconds = time.perf_counter() - start
        self.stats.resources = sum(s.resource_count() for s in snapshots.values())
        metrics.BUILD_DURATION.observe(self.stats.seconds)
        return snapshots

    def resource(self, message: Message, name: str, refs: Iterable[tuple[str, str]] = (),
                 kept: dict[tuple[str, str], cache.Resource] | None = None) -> cache.Resource:
        """Serialize once; keep the previous Resource object when the bytes are unchanged. ``kept``: where
        the previous objects are kept (a scoped view's own, whose listener and route configurations share
        names with the full view's, with other content); the builder's own table by default."""
        res = cache.Resource.from_message(message, name, refs)
        type_short = cache.short_name(res.type_url)
        self.stats.serialized[type_short] = self.stats.serialized.get(type_short, 0) + 1
        metrics.RESOURCES_SERIALIZED.labels(type=type_short).inc()
        kept = self._resources if kept is None else kept
        key = (res.type_url, name)
        old = kept.get(key)
        if old is not None and old.body == res.body and old.refs == res.refs:
            return old
        kept[key] = res
        return res

    def _view_context(self, view: str, model: Model) -> BuildContext:
        return BuildContext(SIDECAR, model, self.options, self.hooks, self._memos[SIDECAR],
                            lambda message, name, refs=(): self.resource(message, name, refs, self._view_resources.setdefault(view, {})),
                            self.reporter, filters=self.filters)

    def _context(self, role: str, model: Model) -> BuildContext:
        return BuildContext(role, model, self.options, self.hooks, self._memos[role], self.resource, self.reporter,
                            filters=None if role == SHARED else self.filters)

    def _with_extras(self, role: str, base: cache.TypeSet, extra: dict[str, cache.Resource]) -> cache.TypeSet:
        """``base`` (a TypeSet every view shares) plus this view's own resources of its type (the
        sidecar's inbound clusters, plugin resources), derived in O(extras) and reused while neither
        ``base`` nor the extras' versions change, so a plugin's resource (the tracing plugin's collector
        cluster) does not undo the O(changes) builds."""
        versions = {name: r.version for name, r in extra.items()}
        return self._extras.get((role, base.type_url), (base, versions), base.derive, extra)
