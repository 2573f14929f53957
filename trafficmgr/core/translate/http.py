"""HTTP connection managers: the role's HTTP filters in order, the router last, then the HCM hooks."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from trafficmgr.core.contrib import HttpFilter, NetworkFilter
from trafficmgr.core.model import Service, ServicePort
from trafficmgr.core.protos import ads_config_source, pack
from trafficmgr.core.translate.context import BuildContext
from trafficmgr.core.translate.hooks import Hooks

log = logging.getLogger(__name__)

#: The terminal HTTP filter of every connection manager (immutable by convention: it is only copied).
ROUTER_FILTER = hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))

Filters = list[hcm_pb2.HttpFilter]
#: A request (or an upgraded connection, a gRPC or server-sent-events stream) with no bytes either way
#: for this long is ended; a stream that keeps sending lasts as long as it needs to.
STREAM_IDLE_TIMEOUT_S = 300


class HttpFilters:
    """The packed HTTP filter list of each role. The same contributions (attrs equality, configs compared
    as messages) keep the same list object, which the listener and chain memos recognise; nothing is
    packed for an unchanged set."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self._by_role: dict[str, tuple[tuple[HttpFilter, ...], Filters]] = {}
        self._current: dict[str, tuple[BuildContext, Filters]] = {}

    def for_role(self, ctx: BuildContext) -> Filters:
        """The role's filters, router last; the hook is called once per build of a role."""
        current = self._current.get(ctx.role)
        if current is not None and current[0] is ctx:
            return current[1]
        ordered_filters = ordered(self.hooks.http_filters(ctx), "HTTP")
        prev = self._by_role.get(ctx.role)
        if prev is not None and prev[0] == ordered_filters:
            filters = prev[1]
        else:
            filters = [hcm_pb2.HttpFilter(name=f.name, typed_config=pack(f.config)) for f in ordered_filters]
            filters.append(ROUTER_FILTER)
            self._by_role[ctx.role] = (ordered_filters, filters)
        self._current[ctx.role] = (ctx, filters)
        return filters

    def hcm(self, ctx: BuildContext, stat_prefix: str, filters: Filters, routes: str | route_pb2.RouteConfiguration | None,
            listener_name: str, service: Service | None = None, port: ServicePort | None = None,
            **fields: Any) -> hcm_pb2.HttpConnectionManager:
        """A connection manager with ``filters`` and its routes by RDS name (or inline), after the
        ``trafficmgr_http_connection_manager`` hooks."""
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix, codec_type=hcm_pb2.HttpConnectionManager.AUTO, **fields)
        # WebSocket (HTTP/1.1 Upgrade) passes through every connection manager, as it would without a
        # proxy; an upgraded connection lasts until either side closes it or it is idle for
        # STREAM_IDLE_TIMEOUT_S (Envoy's default, stated here so it is a documented choice).
        hcm.upgrade_configs.add(upgrade_type="websocket")
        hcm.stream_idle_timeout.FromSeconds(STREAM_IDLE_TIMEOUT_S)
        hcm.http_filters.extend(filters)
        if isinstance(routes, str):
            hcm.rds.config_source.CopyFrom(ads_config_source())
            hcm.rds.route_config_name = routes
        elif routes is not None:
            hcm.route_config.CopyFrom(routes)
        self.hooks.http_connection_manager(hcm, listener_name, service, port, ctx)
        return hcm


F = TypeVar("F", HttpFilter, NetworkFilter)


def ordered(contributed: Iterable[F], what: str) -> tuple[F, ...]:
    """Contributed filters by (order, name); a name contributed twice is dropped the second time (logged).
    (Orders from ``ORDER_ROUTER`` on were already refused when the plugin returned them.)"""
    names: set[str] = set()
    out: list[F] = []
    for f in sorted(contributed, key=lambda f: (f.order, f.name)):
        if f.name in names:
            log.error("%s filter %r contributed twice: the second one was dropped", what, f.name)
            continue
        names.add(f.name)
        out.append(f)
    return tuple(out)
