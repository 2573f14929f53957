"""What build hooks receive besides their arguments: the per-role build context."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from google.protobuf.message import Message

from trafficmgr.core.model import Endpoint, Model, ObjectRef, Service, ServicePort

if TYPE_CHECKING:
    from envoy.config.listener.v3.listener_pb2 import Listener
    from envoy.config.route.v3.route_components_pb2 import Route
    from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
        HttpConnectionManager,
    )

    from trafficmgr.core.cache import Resource
    from trafficmgr.core.translate.hooks import Hooks


class EndpointPair(NamedTuple):
    """One ready :class:`~trafficmgr.core.model.Endpoint` and the ``LbEndpoint`` message built from it
    (see ``trafficmgr_endpoints``); ``for endpoint, lb in pairs`` works too. The message is the live one
    in the assignment: change it in place."""

    endpoint: Endpoint
    lb_endpoint: Any


class BuildContext:
    """Passed to every build hook as ``ctx``. Read-only attributes:

    - ``role``: the view being built, ``sidecar`` or ``gateway``; ``shared`` for clusters and endpoints,
      which every view shares;
    - ``model``: the whole :class:`~trafficmgr.core.model.Model` (read it only in per-role hooks:
      ``trafficmgr_resources``, ``trafficmgr_http_filters``; mutate hooks are cached on their arguments);
    - ``options``: parsed command-line options (``trafficmgr_add_arguments``);
    - ``memo``: a dict kept across builds for this role, for plugins to cache their own work (key it by
      your plugin's name);
    - ``scratch``: a dict emptied before each build of this role, for work shared by several hooks of
      one build.
    """

    __slots__ = ("role", "model", "options", "memo", "scratch", "_hooks", "_resource", "_reporter", "_filters")

    def __init__(self, role: str, model: Model, options: argparse.Namespace, hooks: Hooks | None = None,
                 memo: dict[str, Any] | None = None, resource: Any = None, reporter: Any = None, filters: Any = None) -> None:
        """The translators make contexts; tests of a single hook may pass only what the hook uses."""
        self.role = role
        self.model = model
        self.options = options
        self.memo = {} if memo is None else memo
        self.scratch: dict[str, Any] = {}
        self._hooks = hooks
        self._resource = resource
        self._reporter = reporter
        self._filters = filters

    def resource(self, message: Message, name: str, refs: Iterable[tuple[str, str]] = ()) -> Resource:
        """Serialize ``message`` as resource ``name``; returns the previous Resource object when the bytes
        did not change, so unchanged resources keep their identity and version."""
        return self._resource(message, name, refs)  # type: ignore[no-any-return]

    def apply_route_hooks(self, route: Route, service: Service, port: ServicePort) -> None:
        """Run every plugin's ``trafficmgr_route`` on ``route`` (for routes a plugin builds itself,
        such as Ingress paths), with the usual error isolation."""
        if self._hooks is not None:
            self._hooks.route(route, service, port, self)

    def http_connection_manager(self, stat_prefix: str, route_config_name: str, listener_name: str) -> HttpConnectionManager:
        """A new HttpConnectionManager for this role: the role's HTTP filters in order (router last),
        routes ``route_config_name`` fetched over ADS, after every plugin's
        ``trafficmgr_http_connection_manager`` ran on it with ``listener_name`` (for listeners a plugin
        builds itself, such as the ingress gateway's)."""
        if self._filters is None:
            raise RuntimeError(f"the {self.role} context makes no connection managers")
        hcm: HttpConnectionManager = self._filters.hcm(self, stat_prefix, self._filters.for_role(self), route_config_name, listener_name)
        return hcm

    def apply_listener_hooks(self, listener: Listener, listener_name: str = "") -> None:
        """Run every plugin's ``trafficmgr_listener`` on ``listener`` (for listeners a plugin builds
        itself), with the usual error isolation."""
        if self._hooks is not None:
            self._hooks.listener(listener, listener_name or listener.name, self)

    def report(self, ref: ObjectRef, message: str, reason: str = "TrafficConfigError") -> None:
        """Report a problem with a user object as a Warning Event (deduplicated by the core)."""
        self._reporter(ref, message, reason)
