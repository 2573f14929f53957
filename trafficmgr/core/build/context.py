"""What hooks receive: the build context, HTTP filter contributions, extra watched kinds."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Container, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from google.protobuf.message import Message

from trafficmgr.core.model import Model, ObjectRef

if TYPE_CHECKING:
    from trafficmgr.core.cache import Resource

# HTTP filter order (lower runs first). Conventional bands, so plugins that do not know each other still
# compose: 100-199 change the request before anything admits it (fault injection), 200-299 admit or
# reject it (rate limits), 300-399 shape the admitted traffic (bandwidth), ORDER_DEFAULT for the rest.
# The router is always last.
ORDER_DEFAULT = 500
ORDER_ROUTER = 10_000


@attrs.frozen(slots=True)
class HttpFilter:
    """An HTTP filter for the connection managers of one role.

    ``name`` is the HCM filter name *and* the key of its ``typed_per_filter_config`` entries (Envoy
    silently ignores per-route config under any other key). ``config`` is the filter's typed config.
    """

    name: str
    order: int
    config: Message


@attrs.frozen(slots=True)
class WatchKind:
    """A Kubernetes kind a plugin needs watched.

    ``convert(raw, ctx)`` turns one raw object dict into an IR object (or None to ignore it); it is the
    only place a plugin sees a raw Kubernetes dict. ``ctx`` offers ``ctx.labels`` (the registry) and
    ``ctx.report(ref, message)`` for Warning Events.
    """

    kind: str
    api_version: str
    plural: str
    convert: Callable[[dict[str, Any], Any], Any]
    namespaced: bool = True
    field_selector: str = ""
    label_selector: str = ""
    #: Optional ``keep(extra) -> container of (namespace, name)``: called with every plugin kind's converted
    #: objects (``{kind: {(namespace, name): obj}}``) each time the model is assembled; only the objects
    #: of this kind whose key it returns appear in ``ctx.model.extra`` (e.g. only Secrets some Ingress
    #: references). Keep it cheap.
    keep: Callable[[Mapping[str, Mapping[tuple[str, str], Any]]], Container[tuple[str, str]]] | None = None

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


@attrs.frozen(slots=True)
class ObjectStatus:
    """Desired content of one object's ``status`` subresource (see ``trafficmgr_object_status``).

    ``path`` is the object's API path without ``/status`` (e.g.
    ``/apis/networking.k8s.io/v1/namespaces/default/ingresses/web``); ``status`` is merged into the
    current status with a JSON merge patch (lists are replaced whole). ``resource_version`` is the version
    the plugin saw: the core writes a given status at most once per version.
    """

    path: str
    status: dict[str, Any] = attrs.field(eq=False)
    resource_version: str = ""
    ref: ObjectRef | None = None


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
