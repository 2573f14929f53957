"""The trafficmgr plugin contract.

Every hook is named ``trafficmgr_*``. Two call styles:

- *mutate-in-place* hooks receive an Envoy message (``xds-protos``) plus the IR objects it was made from,
  change the message and return ``None``;
- *contribution* hooks return a list of items that the core merges (labels, kinds to watch, HTTP filters,
  whole resources).

Rules for implementations:

- Do nothing when your labels are absent. Never add the same filter twice.
- A mutate hook must depend only on its arguments (and ``ctx.options``): the builder caches the result
  while those are unchanged and calls the hook again only when they change.
- If a hook raises, the core restores the message to what it was before the call, skips that plugin's
  contribution for that resource, logs the error once and counts it in ``trafficmgr_plugin_errors``;
  serving continues.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
    from envoy.config.listener.v3.listener_pb2 import Listener
    from envoy.config.route.v3.route_components_pb2 import Route, VirtualHost
    from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
        HttpConnectionManager,
    )

    from trafficmgr.core.translate.context import BuildContext, HttpFilter, ObjectStatus, WatchKind
    from trafficmgr.core.cache import Resource
    from trafficmgr.core.labels import LabelSpec
    from trafficmgr.core.model import Endpoint, Model, Service, ServicePort

PROJECT = "trafficmgr"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def trafficmgr_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add command-line options to ``trafficmgr <command>``.

    ``command`` is ``"serve"`` (the control plane: build hooks read the options as ``ctx.options``),
    ``"agent"`` or ``"bootstrap"`` (both pass the options to ``trafficmgr_bootstrap``). Add only the
    options that command reads, so its ``--help`` stays true; an implementation without the
    ``command`` parameter is called for every command. Called once at startup, before arguments are
    parsed; use option names that carry your plugin's name to avoid clashes.
    """


@hookspec
def trafficmgr_labels() -> list[LabelSpec]:
    """Declare the ``traffic.*`` labels this plugin owns.

    Called once when plugins are loaded. A key declared by two plugins is a startup error. Parsed values
    appear in ``Service.labels``, ``Pod.labels`` and ``Endpoint.labels``; invalid values never do.
    """


@hookspec
def trafficmgr_watch_kinds() -> list[WatchKind]:
    """Declare extra Kubernetes kinds to watch (for example Ingress or Secret).

    Called once at startup. Only kinds of loaded plugins are watched. Each :class:`WatchKind` converts
    raw objects into IR objects, which appear in ``ctx.model.extra[kind]``.
    """


@hookspec
def trafficmgr_port_protocols(model: Model, options: argparse.Namespace) -> list[tuple[str, str, int | str, str]]:
    """Declare traffic protocols implied by other objects: ``(namespace, service, port, protocol)``.

    ``options`` are the parsed command-line options (an implementation may leave the argument out).

    ``port`` is a service port number or name; ``protocol`` is ``http``, ``tcp`` or ``direct``. An
    explicit ``traffic.port.<port>`` label on the Service wins. (The ingress plugin uses this so that
    backends of an Ingress count as ``http`` without any label.) Called on every build: keep it cheap.
    """


@hookspec
def trafficmgr_cluster(cluster: Cluster, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """Mutate the Envoy cluster built for one service port (shared by every proxy role).

    ``cluster.type`` tells whether it is EDS, ORIGINAL_DST (headless) or STRICT_DNS/STATIC (direct);
    leave fields the type does not allow (an ORIGINAL_DST cluster must keep ``CLUSTER_PROVIDED``).
    Called again only when ``service`` or ``port`` changes.
    """


@hookspec
def trafficmgr_endpoints(
    assignment: ClusterLoadAssignment,
    service: Service,
    port: ServicePort,
    endpoints: tuple[Endpoint, ...],
    ctx: BuildContext,
) -> None:
    """Mutate the ClusterLoadAssignment of one EDS cluster.

    ``assignment.endpoints[0].lb_endpoints[i]`` was built from ``endpoints[i]`` (ready endpoints only, in
    order). A plugin may set weights or remove lb_endpoints. Called again only when the service, the
    port or its endpoints change.
    """


@hookspec
def trafficmgr_virtual_host(vhost: VirtualHost, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """Mutate the virtual host that routes HTTP to one service port.

    ``ctx.role`` is ``sidecar`` or ``gateway``. Per-filter config belongs in
    ``typed_per_filter_config`` keyed by the HCM filter's name (see :class:`HttpFilter`).
    """


@hookspec
def trafficmgr_route(route: Route, service: Service, port: ServicePort, ctx: BuildContext) -> None:
    """Mutate one route whose action targets the cluster of ``service``/``port``.

    Called for sidecar routes and for gateway (Ingress) routes; ``ctx.role`` tells which. Typical
    changes: ``route.route.hash_policy``, ``retry_policy``, ``timeout``. A route-level
    ``typed_per_filter_config`` entry replaces the virtual host's entry for that filter.
    """


@hookspec
def trafficmgr_http_filters(ctx: BuildContext) -> list[HttpFilter]:
    """Contribute HTTP filters for the HTTP connection managers of ``ctx.role``.

    Return :class:`HttpFilter` items with an explicit ``order`` (see ``trafficmgr.core.translate.context``
    for the well-known values); the core sorts them and appends the router. Filters should be no-ops by
    default and be configured per virtual host or route. Called once per build and role.
    """


@hookspec
def trafficmgr_http_connection_manager(hcm: HttpConnectionManager, ctx: BuildContext) -> None:
    """Mutate every HTTP connection manager built for ``ctx.role`` (for example to enable tracing).

    Called after the filter chain is assembled. ``ctx.listener_name`` names the listener; for a sidecar
    chain that serves one service port, ``ctx.service`` and ``ctx.port`` name it (else they are None).
    The sidecar's ``inbound`` connection manager (requests arriving at the pod, shared by every sidecar)
    has only the router: filters of ``trafficmgr_http_filters`` are not in it.
    """


@hookspec
def trafficmgr_listener(listener: Listener, ctx: BuildContext) -> None:
    """Mutate a listener built by the core for ``ctx.role`` (after its filter chains are made)."""


@hookspec
def trafficmgr_resources(ctx: BuildContext) -> list[Resource]:
    """Contribute whole resources to the view of ``ctx.role`` (gateway listeners, secrets, ...).

    Make them with ``ctx.resource(message, name, refs=...)``, which serializes once and caches by
    content. Read the whole model from ``ctx.model``. Called on every build of the role's view, so keep
    it cheap or memoize with ``ctx.memo``.
    """


@hookspec
def trafficmgr_bootstrap(bootstrap: dict[str, Any], role: str, options: argparse.Namespace) -> None:
    """Mutate an Envoy bootstrap (a JSON-able dict) generated for a proxy of ``role``.

    Used by the node agent, local mode and tests; for settings Envoy reads only at startup (for example
    static runtime keys).
    """


@hookspec
def trafficmgr_object_status(model: Model, options: argparse.Namespace) -> list[ObjectStatus]:
    """Declare the desired ``status`` of Kubernetes objects this plugin owns (e.g. Ingress load-balancer
    addresses).

    Called by the control plane after each published build (in the sync loop: keep it cheap, no I/O).
    Return an :class:`ObjectStatus` only for objects whose current status (as read into your IR) differs
    from the desired one. The core writes each with a JSON merge patch to the object's ``/status``
    subresource from a background thread (never blocking the build), at most once per
    ``(path, resource_version, status)``, retrying a few times on errors. Without a Kubernetes client
    nothing is written.
    """
