"""What hooks receive: the build context, HTTP filter contributions, extra watched kinds."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Container, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from google.protobuf.message import Message

from trafficmgr.core.model import Endpoint, Model, ObjectRef

if TYPE_CHECKING:
    from trafficmgr.core.cache import Resource

from trafficmgr.core.contrib import ORDER_DEFAULT, ORDER_ROUTER, HttpFilter, ObjectStatus, WatchKind  # noqa: F401 (re-exported)


@attrs.frozen(slots=True)
class EndpointPair:
    """One ready :class:`~trafficmgr.core.model.Endpoint` and the ``LbEndpoint`` message built from it
    (see ``trafficmgr_endpoints``). The message is the live one in the assignment: change it in place."""

    endpoint: Endpoint
    lb_endpoint: Any


class BuildContext:
    """Passed to every build hook. Attributes:

    - ``role``: ``sidecar`` or ``gateway``;
    - ``model``: the whole :class:`~trafficmgr.core.model.Model`;
    - ``options``: parsed command-line options (``trafficmgr_add_arguments``);
    - ``listener_name``: the listener being built (HCM and listener hooks);
    - ``memo``: a dict kept across builds for this role, for plugins to cache their own work.
    """

    def __init__(
        self,
        role: str,
        model: Model,
        options: argparse.Namespace,
        resource_factory: Callable[..., Resource],
        route_hooks: Callable[..., None],
        reporter: Callable[[ObjectRef, str, str], None],
        memo: dict[str, Any],
        hcm_factory: Callable[..., Any] | None = None,
        listener_hooks: Callable[..., None] | None = None,
    ) -> None:
        self.role = role
        self.model = model
        self.options = options
        self.listener_name = ""
        self.service: Any = None
        self.port: Any = None
        self.memo = memo
        self._resource = resource_factory
        self._route_hooks = route_hooks
        self._reporter = reporter
        self._hcm_factory = hcm_factory
        self._listener_hooks = listener_hooks

    def resource(self, message: Message, name: str, refs: Iterable[tuple[str, str]] = ()) -> Resource:
        """Serialize ``message`` as resource ``name``; returns the previous Resource object when the bytes
        did not change, so unchanged resources keep their identity and version."""
        return self._resource(message, name, refs)

    def apply_route_hooks(self, route: Any, service: Any, port: Any) -> None:
        """Run every plugin's ``trafficmgr_route`` on ``route`` (for routes a plugin builds itself,
        such as Ingress paths), with the usual error isolation."""
        self._route_hooks(route, service, port, self)

    def http_connection_manager(self, stat_prefix: str, route_config_name: str) -> Any:
        """A new HttpConnectionManager for ``ctx.role``: the role's HTTP filters in order (router last),
        routes ``route_config_name`` fetched over ADS, after every plugin's
        ``trafficmgr_http_connection_manager`` ran on it (for listeners a plugin builds itself, such as
        the ingress gateway's). Set ``ctx.listener_name`` first."""
        if self._hcm_factory is None:
            raise RuntimeError("this BuildContext cannot make connection managers")
        return self._hcm_factory(self, stat_prefix, route_config_name)

    def apply_listener_hooks(self, listener: Any) -> None:
        """Run every plugin's ``trafficmgr_listener`` on ``listener`` (for listeners a plugin builds
        itself), with the usual error isolation. Set ``ctx.listener_name`` first."""
        if self._listener_hooks is not None:
            self._listener_hooks(listener, self)

    def report(self, ref: ObjectRef, message: str, reason: str = "TrafficConfigError") -> None:
        """Report a problem with a user object as a Warning Event (deduplicated by the core)."""
        self._reporter(ref, message, reason)
