"""The trafficmgr plugin contract.

Every hook is named ``trafficmgr_*`` and documented below: when it is called (its phase), its call style,
and what happens when it raises. Implementations import what they need from ``trafficmgr.plugin``.

Call styles:

- *mutate*: the hook receives an Envoy message (``xds-protos``) plus the IR objects it was made from,
  changes the message in place and returns ``None``;
- *contribute*: the hook returns a list of items that the core merges (labels, kinds to watch, HTTP
  filters, whole resources, object status);
- *setup*: the hook changes plain Python data (an argument parser, a bootstrap dict).

An implementation declares only the arguments it uses (pluggy passes them by name), so adding an
argument to a hook never breaks existing plugins. Implementations are plain functions: pluggy's
``wrapper``/``hookwrapper`` implementations are refused at registration (the core calls each
implementation itself, to isolate errors per plugin), and no hook is ``firstresult`` or ``historic``.

Rules for implementations:

- Do nothing when your labels are absent. Never add the same filter twice.
- A mutate hook depends only on its arguments (and ``ctx.options``): the translators cache its result
  while those are unchanged and call it again only when they change. It never reads ``ctx.model``.
- What happens when an implementation raises (or a contribute hook returns anything but a list of its
  item type) is stated per hook below and listed in ``trafficmgr.core.plugins.HOOK_POLICY``; every
  failure is counted in ``trafficmgr_plugin_errors_total{plugin,hook}``:

  - *errors are isolated*: the core restores the message to what it was before the call (mutate) or
    leaves that plugin's items out (contribute), logs the error with its traceback once per plugin, hook
    and message (``plugin 'x' hook trafficmgr_route failed for ...; serving continues``) and serving
    continues: every other plugin's change and every other resource is built and pushed as usual;
  - *last good*: as isolated, but the plugin's last successful items for the same call (hook and role)
    are used again, so its part of the config stays as it was instead of disappearing;
  - *startup error*: the hook runs when a command starts or a bootstrap is made, where leaving the
    plugin's part out would silently change what runs: the command stops with one line,
    ``trafficmgr: error: plugin 'x' failed in trafficmgr_labels: <error> (fix or upgrade the plugin, or
    deselect it with --plugins / TRAFFICMGR_PLUGINS)``, exit status 1. A plugin that fails to import
    stops the command the same way (``plugin 'x' (module) failed to import: ...``).
- A plugin's hooks run before those of the plugins it depends on (``TRAFFICMGR_DEPENDS``).
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

    from trafficmgr.core.cache import Resource
    from trafficmgr.core.contrib import HttpFilter, NetworkFilter, ObjectStatus, ServiceRoutes, WatchKind
    from trafficmgr.core.labels import LabelSpec
    from trafficmgr.core.model import Endpoint, Model, Service, ServicePort
    from trafficmgr.core.translate.context import BuildContext, EndpointPair

PROJECT = "trafficmgr"
hookspec = pluggy.HookspecMarker(PROJECT)


# ---------------------------------------------------------------------------------------------------
# Phase: startup. Called once, when plugins are loaded or before command-line arguments are parsed.
# ---------------------------------------------------------------------------------------------------


@hookspec
def trafficmgr_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add command-line options to ``trafficmgr <command>``.

    Call style: setup; errors are not isolated: a startup error (an option that clashes with another,
    argparse's "conflicting option string", too), before the command's own options are read.

    ``command`` is ``"serve"`` (the control plane: build hooks read the options as ``ctx.options``),
    ``"agent"`` or ``"bootstrap"`` (both pass the options to ``trafficmgr_bootstrap``). Add only the
    options that command reads, so its ``--help`` stays true; an implementation without the
    ``command`` parameter is called for every command. Use option names that carry your plugin's name
    to avoid clashes.
    """


@hookspec
def trafficmgr_labels() -> list[LabelSpec]:
    """Declare the ``traffic.*`` labels this plugin owns.

    Call style: contribute; errors are not isolated: a startup error (an item that is not a
    :class:`LabelSpec` too), for every command that loads plugins. A key declared by two plugins is a
    startup error too.

    Parsed values appear in ``Service.labels``, ``Pod.labels`` and ``Endpoint.labels``; invalid values
    never do.
    """


@hookspec
def trafficmgr_watch_kinds() -> list[WatchKind]:
    """Declare extra Kubernetes kinds to watch (for example Ingress or Secret).

    Call style: contribute; errors are not isolated: a startup error (an item that is not a
    :class:`WatchKind` too) when ``serve`` starts (its control plane would otherwise run without the
    plugin's objects).

    At run time ``convert`` and ``keep`` errors are isolated (metric hook label
    ``trafficmgr_watch_kinds.convert`` / ``.keep``): a failed ``convert`` leaves that object out of the
    model (as returning None does), a failed ``keep`` leaves every object of the kind out for that build.

    Only kinds of loaded plugins are watched. Each :class:`WatchKind` converts raw objects into IR
    objects, which appear in ``model.extra[kind]``.
    """


# ---------------------------------------------------------------------------------------------------
# Phase: model. Called once per build with the whole model, before any Envoy resource is made.
# ---------------------------------------------------------------------------------------------------


@hookspec
def trafficmgr_port_protocols(model: Model, options: argparse.Namespace) -> list[tuple[str, str, int | str, str]]:
    """Declare traffic protocols implied by other objects: ``(namespace, service, port, protocol)``.

    Call style: contribute; errors are isolated, last good: the plugin's previous protocols are used again
    (ports it made ``http`` stay routed). Called on every build: keep it cheap.

    ``port`` is a service port number or name; ``protocol`` is one of ``PROTOCOLS``: ``http``, ``http2``
    or ``grpc`` (routed per request; ``http2``/``grpc`` upstreams speak HTTP/2), ``tcp`` or ``direct``. An
    explicit ``traffic.port.<port>`` label on the Service wins. (The ingress plugin uses this so that
    backends of an Ingress count as ``http`` without any label; the gateway_api plugin declares
    GRPCRoute backends ``grpc``.)
    """


# ---------------------------------------------------------------------------------------------------
# Phase: cached mutate. Called when a translator (re)builds a resource, and again only when the
# arguments change. Depend on the arguments only (and ctx.options); never read ctx.model.
# ---------------------------------------------------------------------------------------------------


@hookspec
def trafficmgr_cluster(cluster: Cluster, service: Service, port: ServicePort, role: str, ctx: BuildContext) -> None:
    """Mutate the Envoy cluster built for one service port.

    Call style: mutate; errors are isolated (the cluster is built as if the plugin had not run).
    ``role`` is always ``shared``: one cluster serves every view.

    ``cluster.type`` tells whether it is EDS, ORIGINAL_DST (headless) or STATIC (direct); leave fields the
    type does not allow (an ORIGINAL_DST cluster must keep ``CLUSTER_PROVIDED``).
    """


@hookspec
def trafficmgr_endpoints(
    assignment: ClusterLoadAssignment,
    service: Service,
    port: ServicePort,
    pairs: tuple[EndpointPair, ...],
    endpoints: tuple[Endpoint, ...],
    role: str,
    ctx: BuildContext,
) -> None:
    """Mutate the ClusterLoadAssignment of one EDS cluster.

    Call style: mutate; errors are isolated (the assignment keeps every endpoint and weight the earlier
    plugins set). ``role`` is always ``shared``.

    ``pairs`` holds one :class:`EndpointPair` ``(endpoint, lb_endpoint)`` per lb_endpoint still in the
    assignment when your implementation is called: an earlier plugin may have removed some, and the
    pairs are matched by address, so they stay right. Set weights on ``pair.lb_endpoint``; to remove one,
    delete it from ``assignment.endpoints[i].lb_endpoints``. ``endpoints`` are the ready endpoints the
    assignment was first built from, in order (do not zip them with the lb_endpoints: use ``pairs``).
    """


@hookspec
def trafficmgr_virtual_host(vhost: VirtualHost, service: Service, port: ServicePort, role: str, ctx: BuildContext) -> None:
    """Mutate the virtual host that routes HTTP to one service port.

    Call style: mutate; errors are isolated (the virtual host is restored). ``role`` is ``sidecar`` (the gateway's virtual hosts are
    by host name, not by service).

    Per-filter config belongs in ``typed_per_filter_config`` keyed by the HCM filter's name (see
    :class:`HttpFilter`).
    """


@hookspec
def trafficmgr_route(route: Route, service: Service, port: ServicePort, role: str, ctx: BuildContext) -> None:
    """Mutate one route whose action targets the cluster of ``service``/``port``.

    Call style: mutate; errors are isolated (the route is restored). ``role`` is ``sidecar`` or ``gateway``
    (Ingress routes).

    Typical changes: ``route.route.hash_policy``, ``retry_policy``, ``timeout``. A route-level
    ``typed_per_filter_config`` entry replaces the virtual host's entry for that filter.
    """


@hookspec
def trafficmgr_http_connection_manager(
    hcm: HttpConnectionManager,
    role: str,
    listener_name: str,
    service: Service | None,
    port: ServicePort | None,
    ctx: BuildContext,
) -> None:
    """Mutate an HTTP connection manager of ``role`` (for example to enable tracing).

    Call style: mutate; errors are isolated (the connection manager is restored).

    Called after the filter chain is assembled. ``listener_name`` names the listener (``outbound``,
    ``inbound``, ``outbound_proxy``, or a plugin's, such as ``ingress``). For a sidecar chain that serves
    one service port, ``service`` and ``port`` name it; for a shared connection manager they are None.
    The sidecar's ``inbound`` connection manager (requests arriving at the pod, shared by every sidecar)
    has only the router and the HTTP filters of ``trafficmgr_network_filters`` (role ``inbound``): filters
    of ``trafficmgr_http_filters`` are not in it.
    """


@hookspec
def trafficmgr_listener(listener: Listener, role: str, listener_name: str, ctx: BuildContext) -> None:
    """Mutate a listener of ``role`` after its filter chains are made (the core's, and those plugins build
    and pass on with ``ctx.apply_listener_hooks``).

    Call style: mutate; errors are isolated (the listener is restored).
    """


# ---------------------------------------------------------------------------------------------------
# Phase: per role. Called on every build of a view (sidecar, gateway); may read the whole model.
# ---------------------------------------------------------------------------------------------------


@hookspec
def trafficmgr_http_filters(role: str, ctx: BuildContext) -> list[HttpFilter]:
    """Contribute HTTP filters for the HTTP connection managers of ``role``.

    Call style: contribute; errors are isolated, last good: the plugin's previous filters for ``role`` are
    used again (per-route config that names them keeps working). Items must be :class:`HttpFilter` with a
    non-empty name, an int order below ``ORDER_ROUTER`` and a protobuf config. Called once per build and
    role.

    Return :class:`HttpFilter` items with an explicit ``order`` (below ``ORDER_ROUTER``; see
    ``trafficmgr.plugin`` for the bands); the core sorts them and appends the router. Filters should be
    no-ops by default and be configured per virtual host or route.
    """


@hookspec
def trafficmgr_network_filters(role: str, ctx: BuildContext) -> list[NetworkFilter | HttpFilter]:
    """Contribute filters for the filter chains of listener ``role``: today only ``inbound`` (the sidecar's
    shared inbound listener, in the sidecar view; it is built only when it exists).

    Call style: contribute; errors are isolated, last good: the plugin's previous filters for ``role`` are
    used again (a policy that denies stays in force instead of disappearing). Items must be
    :class:`NetworkFilter` (non-empty name, int order, protobuf config, ``applies_to`` ``all`` or ``tcp``)
    or :class:`HttpFilter` (as for ``trafficmgr_http_filters``). Called once per build of the view: keep
    it cheap or memoize with ``ctx.memo``.

    A :class:`NetworkFilter` goes before the terminal filter (``tcp_proxy`` or the HTTP connection
    manager) of every chain it ``applies_to`` (``tcp``: the chains that pass bytes through, which also
    get HTTP the HTTP inspector did not recognise within its timeout, so a policy for an HTTP port
    belongs there too); an :class:`HttpFilter` goes into the listener's HTTP connection managers, before
    the router. Filters of ``trafficmgr_http_filters`` are not in the inbound listener. The listener is
    rebuilt when the contributed filters change (compared by content).
    """


@hookspec
def trafficmgr_resources(role: str, model: Model, ctx: BuildContext) -> list[Resource]:
    """Contribute whole resources to the view of ``role`` (gateway listeners, secrets, ...).

    Call style: contribute; errors are isolated, last good: the plugin's previous resources for ``role`` are
    used again (a gateway listener stays as it was instead of disappearing); items must be
    :class:`Resource`. Called on every build of the view: keep it cheap or
    memoize with ``ctx.memo`` (across builds) or ``ctx.scratch`` (within this build).

    Make them with ``ctx.resource(message, name, refs=...)``, which serializes once and caches by
    content. Secrets are accepted for the gateway view only.
    """


@hookspec
def trafficmgr_service_routes(role: str, model: Model, ctx: BuildContext) -> list[ServiceRoutes]:
    """Contribute the routes of sidecar virtual hosts: each :class:`ServiceRoutes` replaces the default
    route of one Service port's virtual host (``role`` is ``sidecar``; the explicit proxy of local mode
    serves the same virtual hosts).

    Call style: contribute; errors are isolated, last good: the plugin's previous items are used again
    (routing stays as it was). Called once per sidecar build: keep it cheap (return the same tuple
    objects while nothing changed; the core then skips even the comparison). The core compares each
    item's routes with the previous build's (serialized) and rebuilds only the virtual hosts whose
    routes changed; an item for a Service port the sidecar does not route as HTTP is ignored; two
    items for the same Service port: the first wins (the other is logged).

    The routes are final: the core runs no ``trafficmgr_route`` on them; call ``ctx.apply_route_hooks``
    (with the Service whose policies apply) while building them. ``trafficmgr_virtual_host`` still
    runs on the virtual host.
    """


# ---------------------------------------------------------------------------------------------------
# Phase: bootstrap. Called when an Envoy bootstrap is generated (node agent, local mode, tests).
# ---------------------------------------------------------------------------------------------------


@hookspec
def trafficmgr_bootstrap(bootstrap: dict[str, Any], role: str, options: argparse.Namespace) -> None:
    """Mutate an Envoy bootstrap (a JSON-able dict) generated for a proxy of ``role``.

    Call style: setup; errors are not isolated: a startup error; the bootstrap is not written (``trafficmgr bootstrap``
    exits 1 with the one-line message; the node agent starts no sidecar for that pod, reports the message as a
    Warning Event on it and retries with backoff).

    For settings Envoy reads only at startup (for example static runtime keys).
    """


# ---------------------------------------------------------------------------------------------------
# Phase: after publish. Called by the control plane after each published build, in the sync loop.
# ---------------------------------------------------------------------------------------------------


@hookspec
def trafficmgr_object_status(model: Model, options: argparse.Namespace) -> list[ObjectStatus]:
    """Declare the desired ``status`` of Kubernetes objects this plugin owns (e.g. Ingress load-balancer
    addresses).

    Call style: contribute; errors are isolated (no status of this plugin is written after that build; the
    next build asks again). Keep it cheap, no I/O.

    Return an :class:`ObjectStatus` only for objects whose current status (as read into your IR) differs
    from the desired one. The core writes each with a JSON merge patch to the object's ``/status``
    subresource from a background thread (never blocking the build), at most once per
    ``(path, resource_version, status)``, retrying a few times on errors. Without a Kubernetes client
    nothing is written.
    """


# ---------------------------------------------------------------------------------------------------
# Phase: on request. Called from the admin endpoint's thread when someone asks for a view, not by builds.
# ---------------------------------------------------------------------------------------------------


@hookspec
def trafficmgr_dashboard_routes(model: Model, options: argparse.Namespace) -> list[dict[str, Any]]:
    """Describe the routes this plugin serves (Ingress rules, Gateway API routes) for the dashboard's
    routes table (``GET /debug/dashboard/data``, ``routes``).

    Call style: contribute; errors are isolated (the dashboard shows no rows of this plugin for that
    request; the next request asks again). Called only while someone reads the dashboard's data, from the
    admin endpoint's thread, with a copy of the last published model: read it, change nothing, no I/O.

    Return one dict per route object: ``kind`` (``Ingress``, ``HTTPRoute``, ``GRPCRoute``), ``namespace``,
    ``name``, ``hosts``, ``matches`` and ``backends`` (lists of short strings, e.g. ``PathPrefix /api``,
    ``reviews:9080 (weight 80)``) and ``status`` (a short text: ``Accepted``, or why not). A row without
    a str ``kind`` and ``name`` is left out.
    """


@hookspec
def trafficmgr_dashboard_endpoint_columns(endpoints: tuple[Endpoint, ...], model: Model,
                                          options: argparse.Namespace) -> list[dict[str, Any]]:
    """Add columns to the dashboard's upstream rows (``GET /debug/dashboard/data``,
    ``services[].upstreams[]``): what this plugin makes of each endpoint (e.g. ``lb``: its effective
    weight). The core knows no column: it shows the ones plugins give, in plugin call order.

    Call style: contribute; errors are isolated (the dashboard shows none of this plugin's columns for that
    request; the next request asks again). Called once per request for the data, only while someone reads
    it, from the admin endpoint's thread, with a copy of the last published model: read it, change
    nothing, no I/O.

    ``endpoints``: the endpoint of each upstream row, in row order (one row per pod and Service: a pod
    behind two Services is there twice). Return one dict per column: ``name`` (the row's key, also the
    column's id: ``[a-z][a-z0-9_]{0,31}``, not one of the core's keys ``pod``, ``address``, ``rps``,
    ``error_rate``), ``title`` (a short heading, cut to 40 characters; default: the name) and ``values``: a list as long as
    ``endpoints``, one value per row in the same order, each an int, a float, a str (cut to 200
    characters) or None (shown as "no data yet"). A column that breaks these rules, or whose name an
    earlier plugin's column has, is left out (logged at warning level, once per name and reason).
    """
