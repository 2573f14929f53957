"""What plugins contribute besides mutations: HTTP filters, watched kinds, object status.

Kept below the translators and the Kubernetes layer, which both consume these.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from typing import Any

import attrs
from google.protobuf.message import Message

from trafficmgr.core.model import ObjectRef

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


#: :attr:`NetworkFilter.applies_to` values: every filter chain of the listener (TCP and HTTP), or only the
#: chains that pass bytes through (``tcp_proxy``: the default chain, which also gets HTTP the inspector
#: did not recognise in time).
ALL_CHAINS, TCP_CHAINS = "all", "tcp"


@attrs.frozen(slots=True)
class NetworkFilter:
    """A network filter for the filter chains of one listener (see ``trafficmgr_network_filters``).

    The core puts it before the chain's terminal filter (``tcp_proxy`` or the HTTP connection manager),
    in ``order`` (lower first, then by name), on the chains ``applies_to`` names (:data:`ALL_CHAINS` or
    :data:`TCP_CHAINS`). ``config`` is the filter's typed config.
    """

    name: str
    order: int
    config: Message
    applies_to: str = ALL_CHAINS


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
    #: objects (``{kind: {(namespace, name): obj}}``, read-only) when the model is assembled after an object
    #: of any plugin kind changed (its result is reused while none did: it must depend on ``extra`` only);
    #: only the objects of this kind whose key it returns appear in ``ctx.model.extra`` (e.g. only Secrets
    #: some Ingress references). Keep it cheap.
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


@attrs.frozen(slots=True, eq=False)
class ServiceRoutes:
    """What ``trafficmgr_service_routes`` returns: the routes that replace the default route (everything
    to the Service's own cluster) in the sidecar virtual host of ``namespace``/``name`` port ``port``
    (the Service port number), in order (Envoy takes the first match; a request matching none gets 404).

    ``routes`` are Envoy ``Route`` messages, final: the core runs no ``trafficmgr_route`` on them (a
    plugin applies the Services' route policies itself with ``ctx.apply_route_hooks``), then every
    plugin's ``trafficmgr_virtual_host`` on the virtual host as usual. Return the same tuple object while
    nothing changed: the core keeps the previous serialization for it.

    ``caller_namespace``: None (the default) applies the routes to every sidecar; a namespace restricts
    them to the sidecars of pods in that namespace, where they win over an item without one for the same
    Service port (Gateway API consumer routes). Those sidecars get a view of their own (see
    :mod:`~trafficmgr.core.translate.scopes`); every other sidecar's view is unchanged."""

    namespace: str
    name: str
    port: int
    routes: tuple[Any, ...]
    caller_namespace: str | None = None
